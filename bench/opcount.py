"""Count the torch operations a piece of code dispatches (a bench helper).

Every counted operation is a call through PyTorch's dispatcher, so host time on any machine, and
all but the views (`view`, `t`, `expand`, ...) launch a kernel on a GPU. Counting is a figure a
CPU-only machine can measure for a GPU run, where the host must feed the card faster than the
card runs the kernels.
"""

from __future__ import annotations

import collections

from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """Counts the operations dispatched while it is entered. Modes are thread-local; autograd
    carries them into its backward threads, other threads (readers, writers) are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.ops[str(func)] += 1
        self.views += bool(getattr(func, "is_view", False))
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())
