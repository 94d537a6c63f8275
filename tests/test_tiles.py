"""The training tiles' Dataset and its DataLoader workers (`dsf.tiles`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Sampler

from dsf.tiles import TileDataset, collate_batch, loader_worker_init

from conftest import noise_store


class _Endless(Sampler[int]):
    """Indices for ever: the workers always have a batch in hand."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):  # noqa: ANN204
        i = 0
        while True:
            yield i % self.n
            i += 1


def test_the_loader_stops_its_workers_while_they_still_prefetch(tmp_path: Path) -> None:
    """Stopping the workers mid-prefetch (as `Trainer.close` does after the last epoch) ends
    them cleanly: before the workers skipped finalization, one aborted there ("terminate called
    without an active exception") and the stop raised 'killed by signal: Aborted'."""
    data = TileDataset([noise_store(tmp_path / "noise.zarr")])
    for _ in range(2):
        loader = DataLoader(
            data,
            batch_size=4,
            sampler=_Endless(len(data)),
            num_workers=2,
            collate_fn=collate_batch,
            worker_init_fn=loader_worker_init,
            persistent_workers=True,
            multiprocessing_context="spawn",
        )
        it = iter(loader)
        first = next(it)
        assert first.shape == (4, 1024, 1024, 3) and first.dtype == torch.uint8
        next(it)
        workers = list(it._workers)
        it._shutdown_workers()  # raises when a worker died by a signal
        assert [w.exitcode for w in workers] == [0, 0]


def test_the_worker_set_up_refuses_the_main_process() -> None:
    """Its exit handler would end the main process with status 0, hiding a failure."""
    with pytest.raises(RuntimeError, match="for workers only"):
        loader_worker_init(0)
