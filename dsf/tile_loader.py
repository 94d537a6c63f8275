"""Batches of training tiles, read by worker processes straight into shared, pinned memory.

Pretraining moves about 100 MB of tiles per step (32 tiles of 1024 px, DESIGN section 6).
torch's DataLoader hands every batch over in a fresh shared-memory segment, which the worker
fills page fault by page fault after the kernel has zeroed it (measured: 77 ms per 100 MB batch,
as long as decoding its 32 tiles), and which a thread of the main process then copies once more
into pinned memory, holding the GIL against the training loop. Here the main process allocates
a ring of batch slots once, in shared memory, registered as pinned memory when the batches go to
a GPU; workers decode tiles straight into a free slot, and a slot returns to the ring when its
copy to the device is done: one write per tile on the host, one DMA to the card.

Batches come in the order `order(epoch)` gives, whatever order the workers finish in, and the
next epoch's first batches are read while the current epoch ends (DataLoader starts each epoch
from empty). Workers are spawned, open their own Zarr stores (`TileDataset` never carries an
open handle) and decode on one thread each; only small messages cross their queues, so they
end normally (their locks unregistered) once told to stop. A failed read raises in the main
process with the worker's traceback; a worker that dies (the out-of-memory killer, say) raises
too, instead of a hang.
"""

from __future__ import annotations

import collections
import logging
import math
import multiprocessing
import os
import queue
import signal
import sys
import time
import traceback
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as tmp

from dsf.errors import ConfigError, DsfError
from dsf.tiles import TileDataset, decode_on_one_thread

log = logging.getLogger(__name__)

#: batches each worker may have queued or in progress (DataLoader's prefetch_factor)
PREFETCH = 2
#: slots the consumer holds besides the workers' (the batch in the step, the next one being
#: augmented, one whose copy to the device is in flight)
HELD = 3
SHM = Path("/dev/shm")
#: seconds between a waiting worker's checks that the training process still lives
PARENT_POLL_S = 1.0


def _next_task(tasks: Any, parent: Any) -> Any:
    """The next task, or None when told to stop or when the training process is gone (killed
    by SIGKILL, the OOM killer or a scheduler: nothing ran its clean-up, and a worker left
    waiting would hold its share of the ring in /dev/shm until killed by hand)."""
    while True:
        try:
            return tasks.get(timeout=PARENT_POLL_S)
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                raise _OrphanedError from None


#: Signals that stop a training run: the training process acts on them, its workers never.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class _OrphanedError(Exception):
    """The process that started this worker has died."""


def _work(data: TileDataset, ring: torch.Tensor, tasks: Any, done: Any) -> None:
    """A worker: read each task's tiles into its slot of the ring until told to stop (None),
    or until the training process is gone."""
    code = 0
    parent = multiprocessing.parent_process()
    # a stop signal (SLURM's to every process of the job, Ctrl-C to the process group) is the
    # training process's to act on: it checkpoints and stops at a step all DDP ranks agree on,
    # then stops its workers. A worker dying of it first made each rank stop on its own, one
    # possibly waiting in a collective for another that had left. The signals were blocked
    # from the worker's start (`TileLoader._start`): ignored now, those pending are dropped
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    try:
        decode_on_one_thread()
        torch.set_num_threads(1)
        slots = ring.numpy()
        while (task := _next_task(tasks, parent)) is not None:
            seq, slot, indices = task
            try:
                data.read_into(slots[slot, : len(indices)], indices)
                done.put((seq, None))
            except DsfError as exc:  # a damaged store: its one-line message, raised as such
                done.put((seq, ("dsf", str(exc))))
            except Exception:  # noqa: BLE001 - sent to the main process, which raises it
                done.put((seq, ("traceback", traceback.format_exc())))
    except _OrphanedError:  # nobody reads the results: do not wait to flush them
        code = 1
        done.cancel_join_thread()
    finally:
        done.close()
        done.join_thread()  # flushed (unless cancelled): the process then exits normally
    sys.exit(code)


def _done(event: Any) -> bool:
    return event is None or event.query()


def _stop(workers: list[Any], tasks: Any, results: Any, pinned: list[int]) -> None:
    """Stop the workers (a None task each, then kill what is left: they ignore SIGTERM) and
    unpin the ring."""
    for _ in workers:
        try:
            tasks.put(None)
        except (OSError, ValueError):  # queue already closed
            break
    for p in workers:
        p.join(timeout=5)
        if p.is_alive():  # still reading (workers ignore SIGTERM): ended outright
            p.kill()
            p.join(timeout=5)
    workers.clear()
    for q in (tasks, results):
        q.cancel_join_thread()
        q.close()
    while pinned:
        rc = int(torch.cuda.cudart().cudaHostUnregister(pinned.pop()))
        if rc != 0:
            log.warning("unpinning the tile loader's ring failed (cudaError %d)", rc)


class TileLoader:
    """Batches of `batch_size` tiles from `data` in the order `order(epoch)` gives, through
    `workers` processes and a ring of shared-memory slots (`workers` 0: read in this process).

    `epoch(e)` yields (slot, tiles) for the epoch's first `steps_per_epoch` batches (all whole
    batches when None); tiles is a view of the slot, valid until `release(slot, event)` gives it
    back (after the event, e.g. the end of the copy to the device, when one is given). Epochs
    up to `epochs` are read ahead; `pin` registers the ring as pinned memory for the GPU copy.
    `waited` counts the seconds the consumer spent in `epoch` waiting for a batch (with no
    workers: reading it), so a training loop can tell whether it is fed fast enough.
    """

    def __init__(
        self,
        data: TileDataset,
        order: Callable[[int], list[int]],
        batch_size: int,
        workers: int,
        *,
        steps_per_epoch: int | None = None,
        epochs: int | None = None,
        pin: bool = False,
    ) -> None:
        self.data, self.order, self.batch_size = data, order, batch_size
        self.workers = workers
        n = len(order(0)) // batch_size
        self.batches_per_epoch = min(n, steps_per_epoch) if steps_per_epoch else n
        self.epochs = epochs
        self.waited = 0.0
        self._procs: list[Any] = []
        self._pinned: list[int] = []
        self.ring: torch.Tensor | None = None
        if workers > 0:
            self._start(pin)

    def __len__(self) -> int:
        return self.batches_per_epoch

    # -- workers and the ring --------------------------------------------------------------
    def _start(self, pin: bool) -> None:
        slots = self.workers * PREFETCH + HELD
        shape = (slots, self.batch_size, *self.data.tile_shape)
        nbytes = math.prod(shape)
        if SHM.is_dir():  # a segment larger than /dev/shm's room dies of SIGBUS on use
            st = os.statvfs(SHM)
            room = st.f_bavail * st.f_frsize
            if nbytes > room:
                raise ConfigError(
                    f"the tile loader needs {nbytes / 2**30:.1f} GiB of shared memory for "
                    f"{slots} batches of {self.batch_size} tiles, and {SHM} has "
                    f"{room / 2**30:.1f} GiB free: lower pretrain.workers or "
                    "pretrain.batch_size, or give the job more shared memory (docker: "
                    "--shm-size)"
                )
        self.ring = torch.empty(shape, dtype=torch.uint8).share_memory_()
        if pin:
            ptr = self.ring.data_ptr()
            rc = int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 1))  # 1: portable
            if rc != 0:
                self.ring = None
                raise RuntimeError(
                    f"pinning the tile loader's {nbytes / 2**30:.1f} GiB of shared memory "
                    f"failed (cudaError {rc}): lower pretrain.workers or pretrain.batch_size"
                )
            self._pinned.append(ptr)
        ctx = tmp.get_context("spawn")
        self._tasks, self._results = ctx.Queue(), ctx.Queue()
        # blocked while the workers start (a spawned process keeps the mask), so a stop signal
        # in the seconds before a worker ignores them cannot end it (`_work`); the signals of
        # this process are delivered when they are unblocked
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            for i in range(self.workers):
                p = ctx.Process(
                    target=_work,
                    args=(self.data, self.ring, self._tasks, self._results),
                    name=f"dsf-tile-loader-{i}",
                    daemon=True,
                )
                p.start()
                self._procs.append(p)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        self._finalizer = weakref.finalize(
            self, _stop, self._procs, self._tasks, self._results, self._pinned
        )
        self._free = collections.deque(range(slots))
        self._releasing: collections.deque[tuple[int, Any]] = collections.deque()
        self._queue: collections.deque[tuple[int, int, int, int]] = collections.deque()
        self._done: dict[int, str | None] = {}
        self._plan: Iterator[tuple[int, int, list[int]]] = iter(())
        self._next: tuple[int, int, list[int]] | None = None
        self._seq = 0

    def close(self) -> None:
        """Stop the workers and give back the ring now (also at exit); twice is harmless."""
        if self._procs or self._pinned:
            self._finalizer()
        self.ring = None

    # -- planning ---------------------------------------------------------------------------
    def _batches(self, first: int, start: int = 0) -> Iterator[tuple[int, int, list[int]]]:
        """(epoch, batch number, tile indices) from batch `start` of epoch `first` on, up to
        `epochs`."""
        e, last = first, max(first + 1, self.epochs or 0)  # at least the epoch asked for
        while self.epochs is None or e < last:
            order, b = self.order(e), self.batch_size
            for k in range(start if e == first else 0, self.batches_per_epoch):
                yield e, k, order[k * b : (k + 1) * b]
            e += 1

    def _peek(self) -> tuple[int, int, list[int]] | None:
        """The next planned batch not yet given to a worker, None when the plan is done."""
        if self._next is None:
            self._next = next(self._plan, None)
        return self._next

    def _head(self) -> tuple[int, int] | None:
        """(epoch, batch number) of the next batch to hand out, None when the plan is done."""
        if self._queue:
            return self._queue[0][1:3]
        planned = self._peek()
        return None if planned is None else planned[:2]

    def _submit(self, block: bool) -> None:
        """Give free slots to the next planned batches; with `block`, wait for a slot in
        release (its copy) when none is free, so the batch the consumer wants gets read."""
        while True:
            while self._releasing and _done(self._releasing[0][1]):
                self._free.append(self._releasing.popleft()[0])
            if not self._free and block and not self._queue and self._releasing:
                slot, event = self._releasing.popleft()
                event.synchronize()
                self._free.append(slot)
            if not self._free:
                if block and not self._queue and self._head() is not None:
                    raise RuntimeError(
                        "every tile loader slot is held: release(slot) each batch once its "
                        "tiles are copied"
                    )
                return
            planned = self._peek()
            if planned is None:
                return
            epoch, k, indices = planned
            self._next = None
            slot = self._free.popleft()
            self._tasks.put((self._seq, slot, indices))
            self._queue.append((self._seq, epoch, k, slot))
            self._seq += 1

    def _check_workers(self) -> None:
        """Raise when a worker has ended: its batches would never come."""
        for i, p in enumerate(self._procs):
            if p.exitcode is not None:
                raise RuntimeError(
                    f"tile loader worker {i} exited with code {p.exitcode} (negative: killed by "
                    "that signal, -9 often by the out-of-memory killer: lower pretrain.workers "
                    "or pretrain.batch_size)"
                )

    def _wait(self, seq: int) -> None:
        """Until batch `seq` is read; a worker's error or death raises here."""
        while seq not in self._done:
            try:
                got, error = self._results.get(timeout=1.0)
            except queue.Empty:
                self._check_workers()
                continue
            self._done[got] = error
        error = self._done.pop(seq)
        if error is not None:
            kind, text = error
            if kind == "dsf":
                raise ConfigError(text)
            raise RuntimeError(f"a tile loader worker failed to read a batch:\n{text}")

    def _drop_until(self, epoch: int) -> None:
        """Discard the read-ahead batches of epochs before `epoch` (once read: a worker may
        still be writing their slots)."""
        while self._queue and self._queue[0][1] < epoch:
            seq, _, _, slot = self._queue.popleft()
            self._wait(seq)
            self._free.append(slot)

    # -- the consumer's side ----------------------------------------------------------------
    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
        """The epoch's batches in order as (slot, tiles (B, T, T, 3) uint8), from batch `start`
        (a run resumed mid-epoch); `release` each."""
        if self.workers == 0:
            b = self.batch_size
            order = self.order(epoch)
            for k in range(start, self.batches_per_epoch):
                t0 = time.perf_counter()
                tiles = self.data.read(order[k * b : (k + 1) * b])
                self.waited += time.perf_counter() - t0
                yield -1, tiles
            return
        if self.ring is None:
            raise RuntimeError("the tile loader is closed")
        self._check_workers()
        self._drop_until(epoch)
        if self._head() != (epoch, start):  # first use, or not the batch read ahead: start over
            self._drop_until(sys.maxsize)
            self._plan, self._next = self._batches(epoch, start), None
        for _ in range(start, self.batches_per_epoch):
            t0 = time.perf_counter()
            self._submit(block=True)
            seq, _, _, slot = self._queue.popleft()
            self._wait(seq)
            self.waited += time.perf_counter() - t0
            self._submit(block=False)  # the slot just read: the workers go on meanwhile
            yield slot, self.ring[slot]

    def release(self, slot: int, event: Any = None) -> None:
        """Give a batch's slot back, at once or once `event` (a CUDA event) has completed."""
        if slot >= 0:
            self._releasing.append((slot, event))
