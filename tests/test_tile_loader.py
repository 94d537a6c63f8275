"""The pretraining tile loader: worker processes reading into a ring of shared slots."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from dsf.errors import ConfigError
from dsf.tile_loader import TileLoader
from dsf.tiles import TileDataset

from conftest import noise_store


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> TileDataset:
    """12 noise tiles of 64 px in one store plus 6 in another: batches span both."""
    d = tmp_path_factory.mktemp("tiles")
    return TileDataset([noise_store(d / "a.zarr", 12, 64), noise_store(d / "b.zarr", 6, 64)])


def _order(epoch: int) -> list[int]:
    return torch.randperm(18, generator=torch.Generator().manual_seed(epoch)).tolist()


def _expected(data: TileDataset, epoch: int, k: int, b: int = 4) -> torch.Tensor:
    return data.read(_order(epoch)[k * b : (k + 1) * b])


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_come_in_order_and_equal_direct_reads(data: TileDataset, workers: int) -> None:
    """Whatever order the workers finish in, epoch e's batch k is tiles order(e)[4k:4k+4]; a
    batch held back keeps its tiles while later ones are read (its slot is not reused)."""
    loader = TileLoader(data, _order, 4, workers, epochs=3)
    try:
        assert len(loader) == 4  # 18 tiles: whole batches only
        held = None
        for e in range(3):
            for k, (slot, tiles) in enumerate(loader.epoch(e)):
                assert tiles.shape == (4, 64, 64, 3) and tiles.dtype == torch.uint8
                assert torch.equal(tiles, _expected(data, e, k)), (e, k)
                if (e, k) == (0, 1):
                    held = slot, tiles, tiles.clone()
                else:
                    loader.release(slot)
        assert held is not None and torch.equal(held[1], held[2])
        loader.release(held[0])
    finally:
        loader.close()
    assert not mp.active_children()


def test_the_next_epoch_is_read_ahead_and_any_epoch_can_follow(data: TileDataset) -> None:
    """The next epoch's first batches are queued while an epoch ends; an epoch left early, or
    one out of turn (a resumed run), still gives the right tiles."""
    loader = TileLoader(data, _order, 4, 2, steps_per_epoch=3, epochs=10)
    try:
        assert len(loader) == 3
        for slot, _ in loader.epoch(0):
            loader.release(slot)
        assert [task[1:3] for task in loader._queue][:2] == [(1, 0), (1, 1)]
        for k, (slot, tiles) in enumerate(loader.epoch(1)):
            assert torch.equal(tiles, _expected(data, 1, k))
            loader.release(slot)
            break  # left after one batch
        for e in (2, 7, 0):
            got = []
            for slot, tiles in loader.epoch(e):
                got.append(tiles.clone())
                loader.release(slot)
            assert len(got) == 3
            for k, tiles in enumerate(got):
                assert torch.equal(tiles, _expected(data, e, k)), (e, k)
    finally:
        loader.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_resumed_mid_way_starts_at_its_next_batch(data: TileDataset, workers: int) -> None:
    """A run resumed after k steps of an epoch reads that epoch from batch k, then the next
    epochs whole (it had read the epoch from its first batch again)."""
    loader = TileLoader(data, _order, 4, workers, epochs=3)
    try:
        for e, start in ((1, 3), (2, 0)):
            got = []
            for slot, tiles in loader.epoch(e, start):
                got.append(tiles.clone())
                loader.release(slot)
            assert len(got) == 4 - start
            for k, tiles in enumerate(got, start):
                assert torch.equal(tiles, _expected(data, e, k)), (e, k)
    finally:
        loader.close()


def test_waited_counts_the_consumers_wait_for_batches(data: TileDataset) -> None:
    """`waited` grows by the time `epoch` blocks for a batch: in this process with no workers
    (the reads themselves), next to nothing when workers have read ahead of a slow consumer."""
    inline = TileLoader(data, _order, 4, 0, epochs=1)
    assert inline.waited == 0.0
    for _ in inline.epoch(0):
        pass
    assert inline.waited > 0.0
    loader = TileLoader(data, _order, 4, 2, epochs=2)
    try:
        for slot, _ in loader.epoch(0):  # the workers start: the consumer waits
            loader.release(slot)
        started = loader.waited
        assert started > 0.0
        for slot, _ in loader.epoch(1):
            time.sleep(0.3)  # a step far slower than reading 4 small tiles
            loader.release(slot)
        assert loader.waited - started < 0.3  # at most a fraction of one step, in all
    finally:
        loader.close()


def test_a_batch_past_the_last_epoch_is_still_read(data: TileDataset) -> None:
    loader = TileLoader(data, _order, 6, 1, epochs=1)
    try:
        for e in (0, 1, 2):
            tiles = [(s, t.clone()) for s, t in loader.epoch(e)]
            for slot, _ in tiles:
                loader.release(slot)
            assert [torch.equal(t, data.read(_order(e)[k * 6 : k * 6 + 6])) for k, (_, t) in
                    enumerate(tiles)] == [True] * 3  # fmt: skip
    finally:
        loader.close()


def test_a_tile_that_cannot_be_read_names_its_store(tmp_path: Path) -> None:
    store = noise_store(tmp_path / "broken.zarr", 4, 64)
    chunk = next(p for p in (store / "tiles").rglob("*") if p.is_file() and p.name == "0")
    chunk.write_bytes(b"not a compressed chunk")
    loader = TileLoader(TileDataset([store]), lambda e: [0, 1, 2, 3], 4, 1)
    try:
        # the worker's error reaches the trainer as the one-line ConfigError, not a traceback
        with pytest.raises(ConfigError, match=r"broken\.zarr: tile \d could not be read.*rerun"):
            next(loader.epoch(0))
    finally:
        loader.close()


def test_workers_leave_stop_signals_to_the_training_process(data: TileDataset) -> None:
    """SLURM signals every process of a job (Ctrl-C, the process group): a worker dying of it
    made each DDP rank stop at its own step. Workers ignore stop signals and keep reading;
    the training process, which checkpoints at an agreed step, stops them when it closes."""
    loader = TileLoader(data, _order, 4, 2, epochs=3)
    try:
        # at once, while the workers still start (signals are blocked until they ignore them)
        for p in loader._procs:
            os.kill(p.pid, signal.SIGTERM)
        batches = loader.epoch(0)
        slot, _ = next(batches)
        loader.release(slot)
        for p in loader._procs:
            for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
                os.kill(p.pid, signum)
        for k, (slot, tiles) in enumerate(batches, 1):
            assert torch.equal(tiles, _expected(data, 0, k))
            loader.release(slot)
        assert all(p.is_alive() for p in loader._procs)
    finally:
        loader.close()
    assert not mp.active_children()


def test_a_dead_worker_raises_instead_of_hanging(data: TileDataset) -> None:
    loader = TileLoader(data, _order, 4, 2, epochs=4)
    try:
        slot, _ = next(loader.epoch(0))
        loader.release(slot)
        victim = loader._procs[1]
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(timeout=10)
        with pytest.raises(RuntimeError, match="worker 1 exited with code -9.*pretrain.workers"):
            for e in range(4):
                for slot, _ in loader.epoch(e):
                    loader.release(slot)
    finally:
        loader.close()
    assert not mp.active_children()


def test_close_stops_workers_that_are_still_reading(tmp_path: Path) -> None:
    """Closing while the workers read ahead (megabyte tiles, an open-ended plan) ends every
    worker cleanly (exit code 0) and promptly; closing twice is harmless."""
    loader = TileLoader(TileDataset([noise_store(tmp_path / "n.zarr", 12, 1024)]),
                        lambda e: list(range(12)), 2, 2)  # fmt: skip
    slot, tiles = next(loader.epoch(0))
    assert tiles.shape == (2, 1024, 1024, 3)
    procs = list(loader._procs)
    loader.close()
    assert [p.exitcode for p in procs] == [0, 0] and not mp.active_children()
    loader.close()
    with pytest.raises(RuntimeError, match="closed"):
        next(loader.epoch(1))


def test_holding_every_slot_is_an_error_not_a_hang(data: TileDataset) -> None:
    loader = TileLoader(data, _order, 1, 1, epochs=2)
    try:
        with pytest.raises(RuntimeError, match="every tile loader slot is held"):
            list(loader.epoch(0))  # never released
    finally:
        loader.close()


def test_too_little_shared_memory_is_a_config_error(
    data: TileDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Tiny:
        f_bavail, f_frsize = 10, 4096

    monkeypatch.setattr("dsf.tile_loader.os.statvfs", lambda _: Tiny())
    with pytest.raises(ConfigError, match=r"shared memory.*pretrain\.workers.*--shm-size"):
        TileLoader(data, _order, 4, 2)
    assert not mp.active_children()


def test_workers_exit_when_the_training_process_is_killed(tmp_path: Path) -> None:
    """SIGKILL (the OOM killer, a scheduler, kill -9) runs no clean-up: the workers notice
    their parent is gone within a poll and exit, giving back the ring's shared memory (they
    had waited for tasks forever, holding it)."""
    import subprocess
    import sys

    store = noise_store(tmp_path / "k.zarr", 12, 64)
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from dsf.tile_loader import TileLoader
from dsf.tiles import TileDataset
loader = TileLoader(TileDataset([{str(store)!r}]), lambda e: list(range(12)), 2, 2)
slot, _ = next(loader.epoch(0))
print("PIDS", *(p.pid for p in loader._procs), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    log = tmp_path / "out.txt"
    with log.open("w") as out:  # a file, not a pipe: a worker left alive would hold a pipe open
        done = subprocess.run([sys.executable, "-c", script], stdout=out, stderr=out, timeout=120)
    assert done.returncode == -signal.SIGKILL, log.read_text()
    line = next(ln for ln in log.read_text().splitlines() if ln.startswith("PIDS "))
    pids = [int(p) for p in line.split()[1:]]
    assert len(pids) == 2

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        # a zombie is gone too (its init has not reaped it yet)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"

    deadline = time.monotonic() + 30
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p for p in pids if alive(p)]
    for p in left:  # do not leave them behind if the check fails
        os.kill(p, signal.SIGKILL)
    assert not left, f"workers {left} outlived the killed training process"
