"""Pretraining: fold isolation, resume equivalence, NaN stop, DDP on CPU, the CLI artifacts."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
import zarr

from dsf.cli import TORCHRUN_SHUTDOWN_S, pretrain_command
from dsf.config import defaults
from dsf.errors import ConfigError
from dsf.pretrain import LOG_COLUMNS, Trainer, TrainingError, main, training_stores

from conftest import DEVICE


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory, make_store) -> list[Path]:  # noqa: ANN001
    """Two tiny patch stores (32 px tiles: 16 px blocks, scale 2) cut from synthetic slides.

    Scale 2 (4 blocks) keeps the fusion heads small; the 16-block model is covered in
    test_models."""
    d = tmp_path_factory.mktemp("stores")
    return [
        make_store(d, name, seed, block=16, scale=2, stride=24)
        for name, seed in (("A", 1), ("B", 2))
    ]


def _settings(**kw: object) -> dict:
    return (
        defaults("pretrain")
        | {
            "epochs": 2,
            "steps_per_epoch": 2,
            "batch_size": 4,
            "out_size": 32,
            "workers": 0,
            "device": DEVICE,
            "checkpoint_every": 1,
            "seed": 3,
            "backbone": "efficientnet_b0",
        }
        | kw
    )


def test_a_fold_never_trains_on_its_validation_slides(stores: list[Path]) -> None:
    folds = pd.DataFrame({"slide": ["A", "B"], "group": ["A", "B"], "fold": [0, 1]})
    assert training_stores(folds, 1, [stores[0]]) == [stores[0]]
    with pytest.raises(ConfigError, match="slide 'A' of validation fold 0"):
        training_stores(folds, 0, stores)


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_resume_continues_exactly(stores: list[Path], tmp_path: Path) -> None:
    straight = Trainer(_settings(), stores, tmp_path / "a")
    (tmp_path / "a").mkdir()
    straight.fit(progress=False)
    (tmp_path / "b").mkdir()
    first = Trainer(_settings(epochs=1), stores, tmp_path / "b")
    first.fit(progress=False)
    resumed = Trainer(_settings(), stores, tmp_path / "b")
    assert resumed.resume() and resumed.epoch == 1
    resumed.fit(progress=False)
    a, b = _params(straight), _params(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert [r["loss"] for r in straight.history] == [r["loss"] for r in resumed.history]
    # a finished run under a changed setting trains anew (Snakemake reruns it for the change:
    # it had been refused, after Snakemake had deleted its encoders)
    changed = Trainer(_settings(lr=0.01), stores, tmp_path / "b")
    assert not changed.resume() and changed.epoch == 0 and not changed.history
    # an unfinished run's changed setting is refused, naming it (it would mix two runs)
    _unfinish(tmp_path / "b" / "checkpoint.pt")
    with pytest.raises(ConfigError, match="lr"):
        changed.resume()


def _unfinish(path: Path) -> None:
    """Make a checkpoint one of a run with epochs still to go (as one killed between
    checkpoints is)."""
    state = torch.load(path, weights_only=False)
    state["settings"] = {**state["settings"], "epochs": state["epoch"] + 3}
    torch.save(state, path)


#: How long the stopped run's last read takes (`test_a_stop_signal_writes_...`).
SLOW_READ_S = 1.5


def test_a_stop_signal_writes_a_checkpoint_and_the_rerun_goes_on(
    stores: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SLURM's SIGTERM at a job's time limit or on preemption: the run checkpoints where it is
    mid-epoch and stops (not losing up to checkpoint_every epochs), and the rerun goes on from
    the next step, to exactly the straight run's weights and losses (it had run that epoch
    again from its first step: never done, where an epoch outlasts a job). The signal handlers
    are the process's own again after."""
    import os
    import signal

    from dsf.pretrain import StoppedError

    before = signal.getsignal(signal.SIGTERM)
    straight = Trainer(_settings(checkpoint_every=5), stores, tmp_path / "straight")
    (tmp_path / "straight").mkdir()
    straight.fit(progress=False)
    out = tmp_path / "run"
    out.mkdir()
    trainer = Trainer(_settings(checkpoint_every=5), stores, out)
    read, calls = trainer.data.read, []

    def read_then_signal(indices: list[int]) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 3:  # epoch 2's first batch (2 steps an epoch)
            time.sleep(SLOW_READ_S)  # a slow first part: log.tsv's seconds count it
            os.kill(os.getpid(), signal.SIGTERM)
        return read(indices)

    trainer.data.read = read_then_signal  # type: ignore[method-assign]
    with pytest.raises(StoppedError, match=r"SIGTERM in epoch 2 after 1 steps.*--resume"):
        trainer.fit(progress=False)
    assert signal.getsignal(signal.SIGTERM) == before
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    stop = state["interrupted"]
    assert state["epoch"] == 1 and (stop["epoch"], stop["steps"], len(stop["sums"])) == (2, 1, 5)
    assert 0 <= stop["waited"] <= stop["seconds"] and stop["seconds"] >= SLOW_READ_S
    torch.testing.assert_close(state["model"], trainer.model.state_dict(), rtol=0, atol=0)
    assert len(state["history"]) == 1  # epoch 1 finished, checkpoint_every 5 had not saved it
    # epochs lowered to those finished: the weights are past them (they had been exported)
    shorter = Trainer(_settings(checkpoint_every=5, epochs=1), stores, out)
    with pytest.raises(ConfigError, match=r"1 epochs and 1 steps of epoch 2, past pretrain.epo"):
        shorter.resume()
    resumed = Trainer(_settings(checkpoint_every=5), stores, out)
    with caplog.at_level(logging.INFO, logger="dsf.pretrain"):
        assert resumed.resume() and resumed.epoch == 1
    assert "stopped after 1 steps: it goes on from the next step" in caplog.text
    resumed.fit(progress=False)
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    # the resumed epoch's time is the whole epoch's, both parts
    assert resumed.history[1]["seconds"] >= stop["seconds"] >= SLOW_READ_S
    assert 0 <= resumed.history[1]["data_wait"] <= 1
    assert not torch.load(out / "checkpoint.pt", weights_only=False).get("interrupted")
    a, b = _params(straight), _params(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    for key in ("loss", "context", "target", "fusion", "z_std"):
        want = [r[key] for r in straight.history]
        assert [r[key] for r in resumed.history] == pytest.approx(want, rel=1e-6), key


def test_a_slurm_job_stops_itself_before_its_time_limit(stores: list[Path], tmp_path: Path) -> None:
    """Where SLURM tracks a job's processes by cgroup, its signal before the time limit ends
    Snakemake's job step and the training with it: pretraining in a SLURM job or allocation
    checkpoints and stops on its own shortly before the time SLURM says it has left (inside
    `salloc` that is the allocation's, not the rule's runtime), a run outside SLURM never."""
    import time

    from dsf.deadline import job_deadline, slurm_duration
    from dsf.pretrain import StoppedError

    slurm = {"SLURM_JOB_ID": "7"}
    left = {"7": 24 * 3600.0}.get
    assert job_deadline(None, now=0.0, env=slurm, time_left=left) == 24 * 3600 - 600
    assert job_deadline(None, now=0.0, env=slurm, time_left={"7": 1800.0}.get) == 1800 - 180
    assert job_deadline(None, now=0.0, env=slurm, time_left=lambda job: None) is None
    assert job_deadline(None, now=0.0, env={}, time_left=left) is None  # no SLURM: no limit
    assert job_deadline(30, now=0.0, env={}) == 30 * 60 - 180  # --time-limit by hand
    assert [slurm_duration(t) for t in ("1-02:03:04", "02:03:04", "03:04", "UNLIMITED", "")] == [
        93784.0, 7384.0, 184.0, None, None,
    ]  # fmt: skip
    out2 = tmp_path / "run2"
    out2.mkdir()
    trainer = Trainer(_settings(checkpoint_every=5), stores, out2)
    trainer.deadline = time.time() - 1  # past: stops after the first step
    with pytest.raises(StoppedError, match=r"time limit in epoch 1 after 1 steps.*next step"):
        trainer.fit(progress=False)
    state = torch.load(out2 / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 0 and state["interrupted"]["steps"] == 1


def test_a_checkpoint_past_the_epochs_is_refused(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    """Lowering epochs (or forcing a finished run) had handed back the longer run's weights as
    the new run's, silently."""
    from dsf.checkpoints import check_epochs

    path = tmp_path / "checkpoint.pt"
    with pytest.raises(ConfigError, match=r"holds 6 epochs, more than pretrain.epochs 2.*rm "):
        check_epochs(path, 6, 2, "pretrain")
    with caplog.at_level("WARNING"):
        check_epochs(path, 2, 2, "finetune")
    assert "holds all 2 epochs of finetune.epochs: nothing is left to train" in caplog.text
    caplog.clear()
    check_epochs(path, 1, 2, "pretrain")  # an unfinished run resumes quietly
    assert not caplog.text


def test_resume_on_rebuilt_stores_is_refused(stores: list[Path], tmp_path: Path) -> None:
    """A checkpoint knows the stores it trained on: after Snakemake rebuilt one (a tissue or
    patch setting changed) or the slides changed, resuming, which with no epoch left would
    re-export the old weights as the new run's encoders, is refused naming the slides; the
    stores as they were resume."""
    import shutil

    import zarr

    from dsf.checkpoints import check_stores

    copies = [tmp_path / s.name for s in stores]
    for s, c in zip(stores, copies, strict=True):
        shutil.copytree(s, c)
    ids = [zarr.open_group(str(c), mode="r").attrs["store_id"] for c in copies]
    assert len(set(ids)) == 2 and all(len(i) == 32 for i in ids)  # one fresh id per store
    out = tmp_path / "run"
    out.mkdir()
    Trainer(_settings(epochs=1), copies, out).fit(progress=False)
    assert Trainer(_settings(epochs=1), copies, out).resume()  # the same stores: resumed
    # the finished run's checkpoint on other stores: trained anew (Snakemake reran the job
    # because the stores changed; it had been refused after Snakemake deleted the encoders)
    assert not Trainer(_settings(epochs=1), copies[:1], out).resume()
    _unfinish(out / "checkpoint.pt")  # an unfinished run's: refused
    with pytest.raises(ConfigError, match=r"other patch stores \(gone: B\).*delete the"):
        Trainer(_settings(epochs=1), copies[:1], out).resume()
    zarr.open_group(str(copies[0]), mode="r+").attrs["store_id"] = "rebuilt"
    with pytest.raises(ConfigError, match=r"other patch stores \(rebuilt since: A\)"):
        Trainer(_settings(epochs=1), copies, out).resume()
    # checkpoints from before stores had ids cannot tell, and resume
    check_stores(out / "checkpoint.pt", None, {"A": "x"})


@pytest.mark.parametrize(("check_every", "steps_run"), [(1, 1), (50, 2)])
def test_nan_loss_stops_with_a_clear_error(
    stores: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    check_every: int,
    steps_run: int,
) -> None:
    """Checked every `CHECK_EVERY` steps and at the end of the epoch (2 steps here)."""
    monkeypatch.setattr("dsf.pretrain.CHECK_EVERY", check_every)
    (tmp_path / "n").mkdir()
    trainer = Trainer(_settings(epochs=3), stores, tmp_path / "n")
    trainer.st = trainer.st | {"epochs": 1}
    trainer.fit(progress=False)
    assert trainer.checkpoint_path.exists()
    good = trainer.checkpoint_path.read_bytes()
    forward = trainer.net.forward
    calls: list[int] = []

    def poisoned(*args: object, **kw: object) -> dict:
        calls.append(1)
        out = forward(*args, **kw)
        return out | {"loss": out["loss"] * float("nan")}

    monkeypatch.setattr(trainer.net, "forward", poisoned)
    trainer.st = trainer.st | {"epochs": 3}
    with pytest.raises(
        TrainingError,
        match=f"non-finite pretraining loss within the first {steps_run} steps "
        "of epoch 2.*pretrain.lr.*last good checkpoint.*delete it too",
    ) as stop:
        trainer.fit(progress=False)
    # AMP is advised off only to a run in mixed precision (never on the CPU)
    assert ("pretrain.amp off" in str(stop.value)) == (trainer.amp is not None)
    assert len(calls) == steps_run  # stopped at the first check after the bad step
    assert trainer.checkpoint_path.read_bytes() == good  # the last good checkpoint is kept


def test_a_stop_signal_after_the_weights_went_non_finite_keeps_the_good_checkpoint(
    stores: list[Path], tmp_path: Path
) -> None:
    """The loss is checked every CHECK_EVERY steps: a time limit's SIGTERM arriving before the
    next check after the weights went NaN had written them as the checkpoint the rerun resumes
    from. Non-finite weights are never written; the error says so and gives the advice."""
    import os
    import signal

    (tmp_path / "n").mkdir()
    trainer = Trainer(_settings(epochs=1), stores, tmp_path / "n")
    trainer.fit(progress=False)
    good = trainer.checkpoint_path.read_bytes()
    read, calls = trainer.data.read, []

    def spoil_then_signal(indices: list[int]) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 1:
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("nan"))
            os.kill(os.getpid(), signal.SIGTERM)
        return read(indices)

    trainer.data.read = spoil_then_signal  # type: ignore[method-assign]
    trainer.st = trainer.st | {"epochs": 3}
    with pytest.raises(
        TrainingError, match=r"non-finite weights after epoch 2 .*no checkpoint written.*lr"
    ):
        trainer.fit(progress=False)
    assert trainer.checkpoint_path.read_bytes() == good


def _ddp_worker(rank: int, port: int, stores: list[str], out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    trainer = Trainer(_settings(epochs=1, steps_per_epoch=2), [Path(s) for s in stores], Path(out))
    trainer.fit(progress=False)
    flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    torch.save(flat, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_process_ddp_keeps_replicas_equal(stores: list[Path], tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, [str(s) for s in stores], str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(r0, r1)
    before = Trainer(_settings(), stores, tmp_path / "fresh")
    init = torch.cat([p.detach().flatten() for p in before.model.parameters()])
    assert not torch.equal(init, r0)  # the replicas trained, and stayed equal


def _ddp_deadline_worker(rank: int, port: int, stores: list[str], out: str) -> None:
    import time

    from dsf.pretrain import StoppedError

    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    settings = _settings(epochs=3, steps_per_epoch=2, checkpoint_every=5)
    trainer = Trainer(settings, [Path(s) for s in stores], Path(out))
    trainer.deadline = time.time() - 1  # the job's time limit is near
    try:
        trainer.fit(progress=False)
        said = "trained on"
    except StoppedError as exc:
        said = str(exc)
    (Path(out) / f"rank{rank}.txt").write_text(said)
    torch.distributed.destroy_process_group()


def test_ddp_stops_at_the_time_limit_even_with_short_epochs(
    stores: list[Path], tmp_path: Path
) -> None:
    """Under DDP the ranks agree on a stop every 50 steps: epochs of fewer steps (BCSS folds of
    under 1,600 tiles at batch 32) had trained through the time limit until SLURM killed the
    job. Every rank now also checks at each epoch's end, and the checkpoint holds that epoch."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_deadline_worker, args=(port, [str(s) for s in stores], str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        said = (tmp_path / f"rank{rank}.txt").read_text()
        assert "stopped by its job's coming time limit after epoch 1" in said, said
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 1 and not state.get("interrupted")


def test_ddp_through_torchrun_as_the_workflow_starts_it(stores: list[Path], tmp_path: Path) -> None:
    """pretrain.gpus 2: the rule's command, `dsf pretrain --gpus=2`, starts itself again as
    one process per GPU through torchrun, here on the CPU (gloo); the global batch is split
    over the processes. A cohort's store paths reach the processes in a file (torchrun starts
    each with its arguments: past 2 MiB, 'Argument list too long'), and torchrun gives them
    TORCHRUN_SHUTDOWN_S to checkpoint after a signal (its default: 30 s)."""
    from dsf.cli import torchrun_argv

    cmd = pretrain_command(2)
    assert cmd == ["dsf", "pretrain", "--gpus=2"] and pretrain_command(1)[-1] == "--gpus=1"
    assert TORCHRUN_SHUTDOWN_S < 300  # SLURM's signal comes 300 s before the time limit
    launch = torchrun_argv("dsf.pretrain", 2, ["--stores", "a.zarr"], tmp_path)
    assert launch[1:3] == ["-m", "torch.distributed.run"] and "--nproc-per-node=2" in launch
    assert launch[-3:] == ["dsf.pretrain", "--stores", "a.zarr"]  # short: as they are
    bin_dir = Path(sys.executable).parent
    out = tmp_path / "ddp"
    deep = "/".join(["."] * 2000)  # 4 kB naming each store, as a cohort's paths add up
    cohort = []  # 28 slides' stores (a store given twice is refused): copies, renamed
    for i in range(14):
        for s in stores:
            copy = tmp_path / "cohort" / f"{s.stem}{i}.zarr"
            shutil.copytree(s, copy)
            zarr.open_group(str(copy), mode="r+").attrs["slide_id"] = f"{s.stem}{i}"
            cohort.append(copy)
    named = [f"{s.parent}/{deep}/{s.name}" for s in cohort]
    done = subprocess.run(
        [str(bin_dir / cmd[0]), *cmd[1:], "--stores", *named, "--out-dir", str(out),
         "--epochs", "2", "--steps-per-epoch", "1", "--batch-size", "4", "--out-size", "32",
         "--workers", "0", "--device", "cpu", "--no-progress", "--backbone", "efficientnet_b0"],
        capture_output=True, text=True, timeout=600,
        env=os.environ | {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pretraining on 2 GPUs: one process each, through torchrun" in done.stderr
    assert "DDP: 2 processes, 2 tiles per process and step" in done.stderr
    spilled = json.loads((out / ".torchrun-args.json").read_text())
    assert spilled[spilled.index("--stores") + 1 :][: len(named)] == named
    log_tsv = pd.read_csv(out / "log.tsv", sep="\t")
    assert list(log_tsv["epoch"]) == [1, 2]  # written once (rank 0), not once per process
    assert not (out / "log.running.tsv").exists()  # the epochs so far: only while it runs
    enc = torch.load(out / "encoders.pt", weights_only=True)
    assert enc["epochs"] == 2 and (out / "checkpoint.pt").exists()
    assert "gpus" not in enc.get("settings", {})  # how it was started is no setting


def test_batches_queue_the_next_augmentation_and_keep_the_draws(
    stores: list[Path], tmp_path: Path
) -> None:
    """`Trainer.batches` augments batch i + 1 before it hands out batch i (on a GPU, on a side
    stream while step i runs), gives each loader slot back once its tiles are copied, and gives
    the views that the generator seeded for each step gives (`step_seed`: a resumed run
    draws from any step what the straight run drew)."""
    from dsf.pretrain import step_seed

    trainer = Trainer(_settings(), stores, tmp_path)
    order = trainer.sampler.order(0)
    tiles = [trainer.data.read(order[k * 4 : (k + 1) * 4]) for k in range(4)]
    pulled: list[int] = []
    released: list[int] = []

    class Loader:
        n = 3

        def epoch(self, epoch: int, start: int = 0):  # noqa: ANN202
            for i, t in enumerate(tiles[: self.n]):
                pulled.append(i)
                yield i, t

        def release(self, slot: int, event: object = None) -> None:
            assert event is None or trainer.device.type == "cuda"
            released.append(slot)

        def __len__(self) -> int:
            return self.n

        def close(self) -> None:
            pass

    trainer.loader = Loader()  # type: ignore[assignment]
    dev = trainer.device
    gen = torch.Generator(device=dev).manual_seed(5)
    handed = []
    for n, views in trainer.batches(gen):
        assert n == 4
        handed.append((len(pulled), list(released), views))
    assert [p for p, _, _ in handed] == [2, 3, 3]  # one ahead, and nothing past the epoch
    assert [r for _, r, _ in handed] == [[0, 1], [0, 1, 2], [0, 1, 2]]
    ref = torch.Generator(device=dev)
    for k, (t, (_, _, views)) in enumerate(zip(tiles, handed, strict=False)):
        ref.manual_seed(step_seed(trainer.st["seed"], trainer.epoch, k, trainer.rank, 0))
        one = trainer.views(t.to(dev), ref)
        for a, b in zip(views, one, strict=True):
            assert torch.equal(a, b)
    Loader.n = 0
    assert list(trainer.batches(gen)) == []


def test_batches_through_loader_workers_equal_direct_reads(
    stores: list[Path], tmp_path: Path
) -> None:
    """With worker processes (on a GPU: the pinned ring, a slot freed once its copy is done)
    the views are those of the tiles read directly, over epochs read ahead."""
    trainer = Trainer(_settings(workers=2, steps_per_epoch=3, epochs=3), stores, tmp_path)
    plain = Trainer(_settings(steps_per_epoch=3, epochs=3), stores, tmp_path / "plain")
    try:
        for epoch in range(3):
            trainer.epoch = plain.epoch = epoch
            gens = [torch.Generator(device=trainer.device).manual_seed(epoch) for _ in "ab"]
            got = list(trainer.batches(gens[0]))
            want = list(plain.batches(gens[1]))
            assert len(got) == len(want) == 3
            for (n, views), (m, ref) in zip(got, want, strict=True):
                assert n == m == 4
                for a, b in zip(views, ref, strict=True):
                    assert torch.equal(a, b)
    finally:
        trainer.close()
    assert not mp.active_children()


def test_close_stops_the_loader_workers(stores: list[Path], tmp_path: Path) -> None:
    trainer = Trainer(_settings(epochs=1, steps_per_epoch=1, workers=1), stores, tmp_path)
    trainer.fit(progress=False)
    procs = list(trainer.loader._procs)
    assert procs and all(p.is_alive() for p in procs)  # the worker outlives the epoch
    trainer.close()
    assert not any(p.is_alive() for p in procs)
    trainer.close()  # twice is harmless


def test_the_log_says_how_long_the_step_waited_for_tiles(
    stores: list[Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """log.tsv's data_wait is the share of each epoch spent waiting for tiles; a run whose
    loader cannot keep up is told once (after the first epoch, which starts the workers) to
    raise pretrain.workers, and a run it feeds is told nothing. The slow reads take 1000 s of a
    fake clock each, so the shares do not depend on how busy the machine is."""
    slow = Trainer(_settings(epochs=3), stores, tmp_path / "slow")
    read = slow.data.read
    real = time.perf_counter
    lost = [0.0]  # seconds the fake clock is ahead

    def read_slowly(indices: list[int]) -> torch.Tensor:
        lost[0] += 1000.0
        return read(indices)

    slow.data.read = read_slowly  # type: ignore[method-assign]
    monkeypatch.setattr(time, "perf_counter", lambda: real() + lost[0])
    with caplog.at_level(logging.WARNING, logger="dsf.pretrain"):
        slow.fit(progress=False)
    monkeypatch.undo()
    log = pd.read_csv(tmp_path / "slow" / "log.running.tsv", sep="\t")
    assert list(log.columns) == LOG_COLUMNS and len(log) == 3
    assert ((log["data_wait"] > 0.5) & (log["data_wait"] < 1)).all()
    assert (log["data_wait"] * log["seconds"] >= 2 * 1000).all()  # 2 batches of 1000 s each
    said = [r.getMessage() for r in caplog.records if "waited for tiles" in r.getMessage()]
    assert len(said) == 1 and "epoch 2" in said[0] and "pretrain.workers (now 0" in said[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dsf.pretrain"):
        Trainer(_settings(), stores, tmp_path / "fed").fit(progress=False)
    assert not [r for r in caplog.records if "waited for tiles" in r.getMessage()]
    fed = pd.read_csv(tmp_path / "fed" / "log.running.tsv", sep="\t")
    # the first epoch reads every tile cold (0.22 once on a busy CI machine), still well below
    assert fed["data_wait"].max() < log["data_wait"].min()


def test_the_global_batch_must_split_over_the_processes(
    stores: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="pretrain.batch_size 5 does not split evenly over the 2"):
        Trainer(_settings(batch_size=5), stores, tmp_path)


def test_cli_writes_encoders_checkpoint_and_log(
    stores: list[Path], tmp_path: Path, norm_bars: list[bool | None]
) -> None:
    folds = tmp_path / "folds.tsv"
    folds.write_text("slide\tgroup\tfold\nA\tA\t0\nB\tB\t1\n")
    out = tmp_path / "fold1"
    args = [
        "--stores",
        str(stores[0]),
        "--folds",
        str(folds),
        "--fold",
        "1",
        "--out-dir",
        str(out),
        "--epochs",
        "1",
        "--steps-per-epoch",
        "1",
        "--batch-size",
        "4",
        "--out-size",
        "32",
        "--workers",
        "0",
        "--device",
        DEVICE,
        "--no-progress",
        "--backbone",
        "efficientnet_b0",
    ]
    assert main(args) == 0
    assert norm_bars == [True]  # --no-progress reaches the normalisation counted by hand
    enc = torch.load(out / "encoders.pt", weights_only=True)
    assert enc["backbone"] == "efficientnet_b0" and enc["slides"] == ["A"] and enc["fold"] == 1
    assert set(enc["context"]) == set(enc["target"]) and len(enc["context"]) > 10
    log = pd.read_csv(out / "log.tsv", sep="\t")
    assert list(log.columns) == LOG_COLUMNS and len(log) == 1
    assert np.isfinite(log["loss"]).all() and -6.6 <= log["loss"][0] <= 6.6
    assert (out / "checkpoint.pt").exists()
    bad = list(args)
    bad[1] = str(stores[1])  # B is fold 1's validation slide
    assert main(bad) == 2
    # --resume under a changed setting trains anew: stopped midway, it leaves no earlier result
    from dsf import pretrain

    def stopped(self, progress: bool = True) -> None:  # noqa: ANN001
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as m:
        m.setattr(pretrain.Trainer, "fit", stopped)
        with pytest.raises(KeyboardInterrupt):
            main([*args, "--resume", "--lr", "0.01"])
    assert not (out / "encoders.pt").exists() and not (out / "log.tsv").exists()


def test_tile_dataset_batches_match_single_reads(stores: list[Path]) -> None:
    import pickle

    from dsf.tiles import TileDataset

    data = TileDataset(stores)
    n = len(data)
    assert n == sum(int(__import__("zarr").open_group(str(s)).attrs["n_tiles"]) for s in stores)
    idx = [n - 1, 0, 5, n // 2, 5]
    batch = data.__getitems__(idx)
    assert batch.shape == (5, *data.tile_shape) and batch.dtype == torch.uint8
    for k, i in enumerate(idx):
        assert torch.equal(batch[k], data[i])
    clone = pickle.loads(pickle.dumps(data))  # what a DataLoader worker receives
    assert clone._arrays is None and torch.equal(clone[3], data[3])
    with pytest.raises(IndexError):
        data[n]


def test_compile_trains_the_same_model_and_saves_its_plain_weights(
    stores: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pretrain.compile` wires torch.compile into training only: the losses follow the eager
    run's and the checkpoint and encoders hold the model's own weights (no `_orig_mod.` keys),
    so resume and fine-tuning read them. The graph is compiled with the `aot_eager` backend
    (dynamo and autograd tracing, no code generation, which takes minutes on the CPU)."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compile_(m, backend="aot_eager"))
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"compile-{compiled}"
        trainer = Trainer(_settings(epochs=1, steps_per_epoch=2, compile=compiled), stores, out)
        assert (trainer.net is not trainer.model) == compiled
        trainer.fit(progress=False)
        trainer.export_encoders()
        runs[compiled] = trainer.history[0]["loss"]
        state = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
        assert state.keys() == trainer.model.state_dict().keys()
        assert not any("_orig_mod" in k for k in state)
    assert runs[True] == pytest.approx(runs[False], rel=1e-4)


def test_the_normalisation_comes_from_the_norm_file_or_the_training_tiles(
    stores: list[Path], tmp_path: Path
) -> None:
    from dsf.norm import store_stats

    computed = Trainer(_settings(), stores, tmp_path / "t")
    sample = store_stats(stores, _settings()["norm_tiles"], 3, progress=False)
    assert (computed.st["mean"], computed.st["std"]) == (sample.mean, sample.std)
    norm = tmp_path / "norm.json"
    norm.write_text(json.dumps({"mean": [0.6, 0.5, 0.4], "std": [0.2, 0.25, 0.3]}))
    out = tmp_path / "cli"
    args = ["--stores", str(stores[0]), "--out-dir", str(out), "--epochs", "1"]
    args += ["--steps-per-epoch", "1", "--batch-size", "4", "--out-size", "32", "--workers", "0"]
    args += ["--device", DEVICE, "--no-progress", "--backbone", "efficientnet_b0"]
    assert main([*args, "--norm", str(norm)]) == 0
    enc = torch.load(out / "encoders.pt", weights_only=True)
    assert (enc["settings"]["mean"], enc["settings"]["std"]) == ([0.6, 0.5, 0.4], [0.2, 0.25, 0.3])
    # numbers and a file at once: refused before anything is written
    twice = [
        *args,
        "--norm",
        str(norm),
        "--mean",
        "0.5",
        "0.5",
        "0.5",
        "--std",
        "0.2",
        "0.2",
        "0.2",
    ]
    twice[twice.index(str(out))] = str(tmp_path / "twice")
    assert main(twice) == 2 and not (tmp_path / "twice").exists()


def test_missing_stores_are_named_before_anything_is_written(tmp_path: Path) -> None:
    """A store that is not there is named, and the output folder is not made (an empty one
    had been left behind)."""
    out = tmp_path / "p"
    argv = ["--stores", str(tmp_path / "a.zarr"), "--out-dir", str(out), "--device", "cpu"]
    assert main(argv) == 2
    assert not out.exists()


def test_a_replaced_weights_file_restarts_a_finished_pretraining(
    stores: list[Path], tmp_path: Path
) -> None:
    """pretrain.weights is an input: Snakemake reruns a pretraining whose file was replaced,
    and the rerun (with --resume, as the workflow runs it) trains from the new file instead of
    re-exporting the finished run's encoders; the same file resumes as before."""
    import torchvision.models as tvm

    weights = tmp_path / "effnet.pth"
    torch.manual_seed(1)
    torch.save(tvm.efficientnet_b0(weights=None).state_dict(), weights)
    out = tmp_path / "run"
    out.mkdir()
    first = Trainer(_settings(epochs=1, weights=str(weights)), stores, out)
    first.fit(progress=False)
    same = Trainer(_settings(epochs=1, weights=str(weights)), stores, out)
    assert same.resume() and same.epoch == 1  # finished: nothing left to train
    torch.manual_seed(2)
    torch.save(tvm.efficientnet_b0(weights=None).state_dict(), weights)  # replaced
    again = Trainer(_settings(epochs=1, weights=str(weights)), stores, out)
    assert not again.resume() and again.epoch == 0
