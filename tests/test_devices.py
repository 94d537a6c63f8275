"""GPU picking (dsf.devices) on a CPU-only machine: the GPU count is injected."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dsf import devices
from dsf.devices import amp_dtype, claim_gpu, gpu_index, pick_device, use_device
from dsf.errors import ConfigError


@pytest.fixture(autouse=True)
def _no_held_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts as a fresh process that holds no GPU lock."""
    monkeypatch.setattr(devices, "_HELD", {})


def test_cpu_and_auto_without_gpu_are_the_cpu(tmp_path: Path) -> None:
    assert pick_device("cpu", "pretrain.device", gpu_count=4, folder=tmp_path).type == "cpu"
    assert pick_device("auto", "pretrain.device", gpu_count=0, env={}).type == "cpu"


def test_cuda_without_gpu_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"finetune\.device is cuda but no GPU is visible"):
        pick_device("cuda", "finetune.device", gpu_count=0, env={})
    with pytest.raises(ConfigError, match=r"pretrain\.device must be one of auto, cpu, cuda"):
        pick_device("gpu", "pretrain.device", gpu_count=1, env={})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the real count on a CPU machine")
def test_real_count_on_this_cpu_machine() -> None:
    assert pick_device("auto", "pretrain.device").type == "cpu"
    with pytest.raises(ConfigError, match="pretrain.device"):
        pick_device("cuda", "pretrain.device")


def test_cuda_visible_devices_is_respected(tmp_path: Path) -> None:
    env = {"CUDA_VISIBLE_DEVICES": "3,2"}
    # the job was given its cards: the first visible one, and no lock is taken
    assert pick_device("cuda", "pretrain.device", gpu_count=2, env=env, folder=tmp_path) == (
        torch.device("cuda", 0)
    )
    assert not list(tmp_path.iterdir())
    # an empty CUDA_VISIBLE_DEVICES hides every GPU (torch then counts none)
    assert pick_device("auto", "k", gpu_count=0, env={"CUDA_VISIBLE_DEVICES": ""}).type == "cpu"


def test_torchrun_rank_and_slurm_gpus_win(tmp_path: Path) -> None:
    assert gpu_index(4, {"LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "0,1"}, tmp_path) == 1
    assert gpu_index(4, {"LOCAL_RANK": "1", "SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "0,1"}) == 1
    slurm = {"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "3,1"}
    assert gpu_index(4, slurm, tmp_path) == 3
    assert gpu_index(4, slurm | {"SLURM_STEP_GPUS": "2"}, tmp_path) == 2
    assert gpu_index(4, slurm | {"CUDA_VISIBLE_DEVICES": "3"}, tmp_path) == 0
    assert not list(tmp_path.iterdir())


def test_ranks_without_assigned_cards_lock_theirs(tmp_path: Path) -> None:
    """A local multi-GPU pretraining beside other GPU jobs: each rank locks a card no job
    holds (not simply card LOCAL_RANK, which a fine-tuning job may hold); none free: an error,
    since DDP ranks cannot share."""
    import subprocess
    import sys

    other = claim_gpu(4, tmp_path)  # a fine-tuning job holds card 0
    assert other is not None and other.index == 0
    code = (
        "import sys; from pathlib import Path; from dsf.devices import gpu_index; "
        "print(gpu_index(4, {'LOCAL_RANK': sys.argv[1]}, Path(sys.argv[2])))"
    )
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", code + "; sys.stdin.read()", str(r), str(tmp_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for r in range(2)
    ]
    got = sorted(int(p.stdout.readline()) for p in ranks)  # each holds its lock until exit
    assert got == [1, 2]
    rest = claim_gpu(4, tmp_path)  # the fourth card
    with pytest.raises(ConfigError, match="rank 0 found all 4 GPUs locked.*cannot share"):
        gpu_index(4, {"LOCAL_RANK": "0"}, tmp_path)
    for p in ranks:
        p.communicate("")
    assert rest is not None
    rest.release()
    other.release()


def test_one_gpu_needs_no_lock(tmp_path: Path) -> None:
    assert gpu_index(1, {}, tmp_path) == 0
    assert not list(tmp_path.iterdir())


def test_two_lockers_get_different_gpus(tmp_path: Path) -> None:
    first, second = claim_gpu(3, tmp_path), claim_gpu(3, tmp_path)
    assert first is not None and second is not None
    assert {first.index, second.index} == {0, 1}
    third = claim_gpu(3, tmp_path)
    assert third is not None and third.index == 2
    assert claim_gpu(3, tmp_path) is None  # all held
    second.release()
    again = claim_gpu(3, tmp_path)
    assert again is not None and again.index == 1
    for lock in (first, third, again):
        lock.release()


def test_the_lock_is_held_for_the_process_lifetime(tmp_path: Path) -> None:
    env = {devices.LOCK_DIR_ENV: str(tmp_path)}
    one = pick_device("auto", "pretrain.device", gpu_count=2, env=env)
    # the same process asking again keeps its card rather than taking the other one
    assert pick_device("auto", "pretrain.device", gpu_count=2, env=env) == one
    assert one == torch.device("cuda", 0)
    # a concurrent process (a second local job) gets the other card ...
    code = textwrap.dedent(
        f"""
        from pathlib import Path
        from dsf.devices import pick_device
        print(pick_device("auto", "k", gpu_count=2, env={{}}, folder=Path({str(tmp_path)!r})))
        """
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert other.returncode == 0, other.stderr
    assert other.stdout.strip() == "cuda:1"
    # ... and once that process has exited its card is free again
    again = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert again.stdout.strip() == "cuda:1"
    # with every card locked, a third job shares one instead of failing
    held = claim_gpu(2, tmp_path)
    assert held is not None and held.index == 1
    shared = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert shared.returncode == 0 and shared.stdout.strip() in ("cuda:0", "cuda:1")
    assert "all 2 GPUs are locked" in shared.stderr
    held.release()


def test_use_device_picks_and_makes_the_card_current(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert use_device("auto", "pretrain.device").type == "cpu"
    with pytest.raises(ConfigError, match="pretrain.device is cuda"):
        use_device("cuda", "pretrain.device")
    current: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")  # cards given: the rank's own
    assert use_device("auto", "infer.device") == torch.device("cuda", 2)
    assert current == [torch.device("cuda", 2)]  # not left on GPU 0


def test_local_rank_beyond_the_visible_cards() -> None:
    # one card shown per rank: that card; more ranks than cards: an error naming the fix
    assert gpu_index(1, {"LOCAL_RANK": "3", "CUDA_VISIBLE_DEVICES": "3"}) == 0
    with pytest.raises(ConfigError, match="LOCAL_RANK is 4 but only 2 GPUs.*nproc-per-node"):
        gpu_index(2, {"LOCAL_RANK": "4"})


@pytest.mark.parametrize(
    ("major", "dtype"), [(9, torch.bfloat16), (8, torch.bfloat16), (7, torch.float16)]
)
def test_amp_dtype_is_native_to_the_card(
    monkeypatch: pytest.MonkeyPatch, major: int, dtype: torch.dtype
) -> None:
    seen: list[torch.device] = []

    def capability(device: torch.device) -> tuple[int, int]:
        seen.append(device)
        return major, 0

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    gpu = torch.device("cuda", 1)
    assert amp_dtype(gpu, True) is dtype
    assert seen == [gpu]  # the job's card, not the current one
    assert amp_dtype(gpu, False) is None
    assert amp_dtype(torch.device("cpu"), True) is None
