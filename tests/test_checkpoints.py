"""Training checkpoints (`dsf.checkpoints`): what a resume restores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dsf.checkpoints import resume_training, save_training
from dsf.errors import ConfigError


def test_resume_restores_the_model_optimiser_and_fp16_loss_scale(tmp_path: Path) -> None:
    """With fp16 (GPUs without bf16) the GradScaler's scale and growth count are part of the
    exact resume (DESIGN section 4): a fresh scaler would start at 65536 again and skip steps
    while it backs off to where the run had been."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.load_state_dict(scaler.state_dict() | {"_growth_tracker": 7})
    hyper = {"lr": 1e-3}
    path = tmp_path / "checkpoint.pt"
    save_training(path, model, opt, scaler, epoch=3, hyper=hyper)

    fresh_model = torch.nn.Linear(4, 2)
    fresh_opt = torch.optim.Adam(fresh_model.parameters(), lr=1e-3)
    fresh_scaler = torch.amp.GradScaler("cpu")
    state = resume_training(path, hyper, fresh_model, fresh_opt, fresh_scaler)
    assert state is not None and state["epoch"] == 3
    for a, b in zip(model.state_dict().values(), fresh_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    moments = fresh_opt.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(moments, opt.state_dict()["state"][0]["exp_avg"])
    assert fresh_scaler.state_dict()["scale"] == 1024.0
    assert fresh_scaler.state_dict()["_growth_tracker"] == 7


def test_a_damaged_checkpoint_says_to_delete_it(tmp_path: Path) -> None:
    """A checkpoint cut short had been reported as an artifact to rebuild by rerunning its
    stage, which reads it again and fails the same way: the fix is to delete it."""
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    path = tmp_path / "checkpoint.pt"
    save_training(path, model, opt, scaler, epoch=1, hyper={"lr": 1e-3})
    os.truncate(path, path.stat().st_size // 2)
    what = r"checkpoint .*checkpoint\.pt cannot be read .*delete it"
    with pytest.raises(ConfigError, match=what):
        resume_training(path, {"lr": 1e-3}, model, opt, scaler)


def test_the_advice_after_a_non_finite_loss_names_amp_only_in_mixed_precision(
    tmp_path: Path,
) -> None:
    """A CPU run (fp32) had been told to turn pretrain.amp off, which changes nothing there."""
    from dsf.checkpoints import nonfinite_weights, restart_advice

    path = tmp_path / "checkpoint.pt"
    assert restart_advice(path, "pretrain", amp=False).startswith("Lower pretrain.lr and rerun;")
    assert "pretrain.amp off" in restart_advice(path, "pretrain", amp=True)
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    why = nonfinite_weights(model, path, "finetune", "epoch 1", amp=False)
    assert why is not None and "weight" in why and "amp" not in why
