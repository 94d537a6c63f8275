"""Fine-tuning: selection never reads the validation fold, artifacts, exact resume, losses, the
NaN stop, the context loss weight, the random-block U-Net variant and the ImageNet init."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch.utils.data import DataLoader

from dsf.config import defaults
from dsf.errors import ConfigError
from dsf.finetune import HISTORY_COLUMNS, FineTuner, _shared_jitter_flip, main
from dsf.metrics import soft_dice_loss
from dsf.pretrain import TrainingError
from dsf.tile_labels import LabelledStore

from conftest import DEVICE

CLASSES = ["ignore", "TUM", "STR", "LYM"]


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory, make_store) -> tuple[list[LabelledStore], Path]:  # noqa: ANN001
    """Three labelled stores (A in fold 0; B, C in fold 1), 64 px blocks, scale 4 (the smallest
    block whose hook crop falls on whole cells: the centre 1/4 must be 8 px cells)."""
    d = tmp_path_factory.mktemp("ftune")
    stores = [
        make_store(d, name, seed, block=64, stride=64, labelled=True)
        for name, seed in (("A", 1), ("B", 2), ("C", 3))
    ]
    folds = d / "folds.tsv"
    folds.write_text("slide\tgroup\tfold\nA\tA\t0\nB\tB\t1\nC\tC\t1\n")
    return stores, folds


def _args(stores: list[LabelledStore], folds: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--stores",
        *(str(s.tiles) for s in stores),
        "--label-stores",
        *(str(s.labels) for s in stores),
        "--folds",
        str(folds),
        "--fold",
        "0",
        "--out-dir",
        str(out),
        "--epochs",
        "2",
        "--steps-per-epoch",
        "2",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--device",
        DEVICE,
        "--classes",
        *CLASSES,
        *extra,
    ]


def test_a_fold_the_folds_table_lacks_is_named(three, tmp_path, capsys) -> None:  # noqa: ANN001
    """`--fold 5` with folds 0 and 1 had been told "fold 5 has 1 training group(s)"."""
    stores, folds = three
    args = _args(stores[1:], folds, tmp_path / "ft")
    args[args.index("--fold") + 1] = "5"
    assert main(args) == 2
    assert "--fold 5 is not a fold of" in capsys.readouterr().err
    assert not (tmp_path / "ft").exists()


def test_a_store_of_a_slide_the_folds_table_lacks_is_refused(three, tmp_path, capsys) -> None:  # noqa: ANN001
    """Such a store had been opened and then left out of the split without a word."""
    stores, folds = three
    partial = tmp_path / "folds.tsv"
    partial.write_text("slide\tgroup\tfold\nA\tA\t0\nB\tB\t1\n")  # no C
    assert main(_args(stores[1:], partial, tmp_path / "ft")) == 2
    assert "stores of slides ['C'] were given, but" in capsys.readouterr().err
    assert not (tmp_path / "ft").exists()


def test_fit_and_selection_stores_of_other_geometries_are_refused(three, tmp_path, capsys) -> None:  # noqa: ANN001
    """B fits and C selects (or the reverse): a C cut at another target mpp had been scored
    by a model of B's geometry, without a word."""
    import shutil

    import zarr

    stores, folds = three
    coarse = tmp_path / "C.zarr"
    shutil.copytree(stores[2].tiles, coarse)
    zarr.open_group(str(coarse), mode="r+").attrs["requested_target_mpp"] = 2.0
    odd = LabelledStore("C", coarse, stores[2].labels)
    assert main(_args([stores[1], odd], folds, tmp_path / "ft")) == 2
    assert "were cut with other geometries" in capsys.readouterr().err
    assert not (tmp_path / "ft" / "model.pt").exists()


def test_a_resume_with_nothing_to_resume_drops_an_earlier_runs_results(  # noqa: ANN001
    three, tmp_path, monkeypatch, capsys, norm_bars
) -> None:
    """Training anew under --resume (no checkpoint) and stopped midway had left the earlier
    run's model.pt and history.tsv beside the new checkpoint, looking like its results."""
    stores, folds = three
    out = tmp_path / "ft"
    out.mkdir()
    for name in ("model.pt", "history.tsv"):
        (out / name).write_text("an earlier run's")

    def stopped(self: FineTuner, progress: object = None) -> None:
        raise ConfigError("stopped midway")

    monkeypatch.setattr(FineTuner, "fit", stopped)
    assert main([*_args(stores[1:], folds, out), "--resume", "--no-progress"]) == 2
    assert "stopped midway" in capsys.readouterr().err
    assert not (out / "model.pt").exists() and not (out / "history.tsv").exists()
    assert norm_bars == [True]  # --no-progress reaches the normalisation counted by hand


def test_cli_fits_on_training_slides_and_selects_on_held_out_ones(three, tmp_path, capsys) -> None:  # noqa: ANN001
    stores, folds = three
    out = tmp_path / "ft"
    assert main(_args(stores[1:], folds, out, "--context-weight", "0.5")) == 0
    assert "epoch 1:" not in capsys.readouterr().err  # no bar in a log file (not a terminal)
    model = torch.load(out / "model.pt", weights_only=True)
    assert model["fold"] == 0 and "A" not in model["fit_slides"] + model["select_slides"]
    assert (model["backbone"], model["target_block"], model["context_weight"]) == (
        "resnet18",
        "centre",
        0.5,
    )
    assert sorted(model["fit_slides"] + model["select_slides"]) == ["B", "C"]
    assert len(model["select_slides"]) == 1 and 1 <= model["epoch"] <= 2
    hist = pd.read_csv(out / "history.tsv", sep="\t")
    assert list(hist.columns) == HISTORY_COLUMNS and len(hist) == 2
    assert not (out / "checkpoint.pt").exists()  # only kept while a run is unfinished
    assert not (out / "history.running.tsv").exists()  # the epochs so far, while it runs
    assert model["select_macro_f1"] == pytest.approx(hist["select_macro_f1"].max())
    # a validation slide's store is refused
    assert main(_args(stores, folds, tmp_path / "bad")) == 2


@pytest.mark.parametrize(
    "variant",
    [{}, {"init": "unet", "target_block": "random"}],
    ids=["hooknet", "unet-random-block"],
)
def test_resume_is_exact(three, tmp_path, variant) -> None:  # noqa: ANN001
    stores, _ = three
    st = defaults("finetune") | {
        "epochs": 2,
        "steps_per_epoch": 2,
        "batch_size": 4,
        "workers": 0,
        "device": DEVICE,
        **variant,
    }

    def tuner(out: Path, **kw: object) -> FineTuner:
        out.mkdir(exist_ok=True)
        return FineTuner(st | kw, [stores[1]], [stores[2]], 0.5, CLASSES, out)

    a = tuner(tmp_path / "a")
    a.fit()
    b = tuner(tmp_path / "b", epochs=1)
    b.fit()
    c = tuner(tmp_path / "b")
    assert c.resume() and c.epoch == 1
    c.fit()
    for k, v in a.model.state_dict().items():
        torch.testing.assert_close(v, c.model.state_dict()[k], rtol=0, atol=0, msg=k)
    assert a.best["epoch"] == c.best["epoch"]


def test_resume_under_changed_settings_is_refused(three, tmp_path) -> None:  # noqa: ANN001
    from dsf.errors import ConfigError

    stores, _ = three
    st = defaults("finetune") | {
        "epochs": 1,
        "steps_per_epoch": 1,
        "batch_size": 4,
        "workers": 0,
        "device": DEVICE,
    }
    first = FineTuner(st, [stores[1]], [stores[2]], 1.0, CLASSES, tmp_path)
    first.fit()
    again = FineTuner(st | {"lr": 0.01}, [stores[1]], [stores[2]], 1.0, CLASSES, tmp_path)
    with pytest.raises(ConfigError, match=r"lr: \[0\.001\] then, \[0\.01\] now"):
        again.resume()
    # other stores (here another selection slide): refused, naming the slides
    other = FineTuner(st, [stores[1]], [stores[0]], 1.0, CLASSES, tmp_path)
    slides = [s.slide for s in stores]
    with pytest.raises(
        ConfigError, match=rf"other patch or labels stores \(new: {slides[0]}; gone: {slides[2]}\)"
    ):
        other.resume()


def _settings(**kw: object) -> dict[str, object]:
    """Settings of the loss-formula tests: on the CPU everywhere, since they compare the
    training loss with fp32 formulas that mixed precision on a GPU would not match."""
    return defaults("finetune") | {
        "epochs": 1,
        "steps_per_epoch": 1,
        "batch_size": 4,
        "workers": 0,
        "device": "cpu",
        **kw,
    }


def _batch(tuner: FineTuner) -> tuple[torch.Tensor, ...]:
    ctx, tgt, lab, clab = next(iter(DataLoader(tuner.select, batch_size=4)))
    return (*tuner._inputs(ctx, tgt), lab, clab)


def test_cross_entropy_ignores_class_0_and_trains(three, tmp_path, capsys) -> None:  # noqa: ANN001
    stores, _ = three
    tuner = FineTuner(_settings(loss="ce"), [stores[1]], [stores[2]], 1.0, CLASSES, tmp_path)
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]], [[1.0, 3.0]], [[0.5, 0.5]]]])  # (1,4,1,2)
    labels = torch.tensor([[[0, 2]]])  # the first pixel is unlabelled
    expected = -torch.log_softmax(logits[0, :, 0, 1], 0)[2]  # the labelled pixel only
    torch.testing.assert_close(tuner._loss(logits, labels), expected)
    torch.testing.assert_close(
        tuner._loss(logits, labels), F.cross_entropy(logits, labels, ignore_index=0)
    )
    # nothing labelled: 0, not the NaN of an empty mean
    assert tuner._loss(logits, torch.zeros_like(labels)).item() == 0.0
    ctx, tgt, lab, clab = _batch(tuner)
    with torch.no_grad():
        out = tuner.model((ctx - tuner.mean) / tuner.std, (tgt - tuner.mean) / tuner.std)[0]
        torch.testing.assert_close(
            tuner.batch_loss(ctx, tgt, lab, clab),
            F.cross_entropy(out, lab.long(), ignore_index=0),
        )
    tuner.fit(progress=True)
    loss = tuner.history[0]["train_loss"]
    assert torch.isfinite(torch.tensor(loss)) and loss > 0
    # a bar per epoch, counting its steps (hours of fine-tuning show their progress)
    steps = min(tuner.st["steps_per_epoch"] or len(tuner.loader), len(tuner.loader))
    err = capsys.readouterr().err
    assert "epoch 1: 100%" in err and f"| {steps}/{steps} [" in err


def test_context_weight_adds_the_context_loss(three, tmp_path) -> None:  # noqa: ANN001
    stores, _ = three
    tuner = FineTuner(_settings(), [stores[1]], [stores[2]], 1.0, CLASSES, tmp_path)
    ctx, tgt, lab, clab = _batch(tuner)
    assert (clab > 0).any()
    with torch.no_grad():
        t_out, c_out = tuner.model((ctx - tuner.mean) / tuner.std, (tgt - tuner.mean) / tuner.std)
        target_only = soft_dice_loss(t_out, lab)
        context = soft_dice_loss(c_out, clab)
        assert tuner.st["context_weight"] == 0.0  # the paper: lambda 1, target loss only
        torch.testing.assert_close(tuner.batch_loss(ctx, tgt, lab, clab), target_only)
        tuner.st["context_weight"] = 0.5
        weighted = tuner.batch_loss(ctx, tgt, lab, clab)
    torch.testing.assert_close(weighted, target_only + 0.5 * context)
    assert abs(float(weighted - target_only)) > 1e-4


@pytest.mark.parametrize(("check_every", "steps_run"), [(1, 1), (50, 2)])
def test_nan_loss_stops_with_a_clear_error(
    three,  # noqa: ANN001
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    check_every: int,
    steps_run: int,
) -> None:
    """Checked every `CHECK_EVERY` steps and at the end of the epoch (2 steps here); neither
    selection nor a checkpoint follows the bad epoch."""
    monkeypatch.setattr("dsf.finetune.CHECK_EVERY", check_every)
    stores, _ = three
    tuner = FineTuner(
        _settings(steps_per_epoch=2), [stores[1]], [stores[2]], 1.0, CLASSES, tmp_path
    )
    tuner.fit()
    good = tuner.checkpoint_path.read_bytes()
    calls: list[int] = []
    batch_loss = tuner.batch_loss

    def poisoned(*args: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return batch_loss(*args) * float("nan")

    monkeypatch.setattr(tuner, "batch_loss", poisoned)
    tuner.st = tuner.st | {"epochs": 3}
    with pytest.raises(
        TrainingError,
        match=f"non-finite fine-tuning loss within the first {steps_run} steps of epoch 2.*"
        "finetune.lr.*delete it too",
    ) as stop:
        tuner.fit()
    assert ("finetune.amp off" in str(stop.value)) == (tuner.amp is not None)
    assert len(calls) == steps_run  # stopped at the first check after the bad step
    assert tuner.checkpoint_path.read_bytes() == good and len(tuner.history) == 1


def test_flip_is_shared_by_both_label_maps() -> None:
    ctx, tgt = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    lab = torch.arange(32, dtype=torch.uint8).view(2, 4, 4)
    clab = torch.arange(32, 64, dtype=torch.uint8).view(2, 4, 4)
    st = {"jitter": [0.4, 0.4, 0.4], "jitter_p": 0.0, "flip_p": 1.0}
    gen = torch.Generator().manual_seed(0)
    c2, t2, l2, cl2 = _shared_jitter_flip(ctx, tgt, lab, clab, st, gen)
    assert torch.equal(l2, lab.flip(-1)) and torch.equal(cl2, clab.flip(-1))
    assert torch.allclose(c2, ctx.flip(-1)) and torch.allclose(t2, tgt.flip(-1))
    st["flip_p"] = 0.0
    _, _, l3, cl3 = _shared_jitter_flip(ctx, tgt, lab, clab, st, gen)
    assert torch.equal(l3, lab) and torch.equal(cl3, clab)
    # finetune.jitter sets the strengths: none leaves the colours as they are, some change them
    st |= {"jitter_p": 1.0, "jitter": [0.0, 0.0, 0.0]}
    c4, t4, *_ = _shared_jitter_flip(ctx, tgt, lab, clab, st, gen)
    assert torch.allclose(c4, ctx) and torch.allclose(t4, tgt)
    st["jitter"] = [0.4, 0.0, 0.0]
    c5, *_ = _shared_jitter_flip(ctx, tgt, lab, clab, st, gen)
    assert not torch.allclose(c5, ctx)
    # a strength over 1 draws brightness from [0, 1 + s], as torchvision's: never a negative
    # factor, which had made a quarter of grey tiles black at strength 2
    grey = torch.full((400, 3, 4, 4), 0.5)
    st["jitter"] = [2.0, 0.0, 0.0]
    out, *_ = _shared_jitter_flip(
        grey, grey, lab[:1].expand(400, -1, -1), lab[:1].expand(400, -1, -1), st, gen
    )
    black = (out.flatten(1).amax(1) == 0).float().mean()
    assert black < 0.01 and out.amax() > 0.99  # factors up to 3, clamped to 1


def test_colour_jitter_transforms_the_target_as_its_pixels_in_the_context() -> None:
    """The target block is part of the tile the context shows: jittered, each target pixel
    must equal its pixel in the context, so both share one contrast pivot (the tile's mean
    grey; each input's own mean had given the two branches different colours)."""
    torch.manual_seed(0)
    ctx = torch.rand(3, 3, 8, 8)
    # the target: the context's centre 4 x 4, each pixel repeated 2 x 2 (same field of view)
    tgt = ctx[:, :, 2:6, 2:6].repeat_interleave(2, -1).repeat_interleave(2, -2)
    lab = torch.zeros(3, 8, 8, dtype=torch.uint8)
    st = {"jitter": [0.4, 0.4, 0.4], "jitter_p": 1.0, "flip_p": 0.0}
    c2, t2, _, _ = _shared_jitter_flip(ctx, tgt, lab, lab, st, torch.Generator().manual_seed(1))
    assert not torch.allclose(c2, ctx)
    centre = c2[:, :, 2:6, 2:6].repeat_interleave(2, -1).repeat_interleave(2, -2)
    torch.testing.assert_close(t2, centre)
    assert float(c2.min()) >= 0 and float(c2.max()) <= 1


def test_colour_jitter_is_torchvisions_in_a_random_order_per_sample() -> None:
    """The context is jittered as torchvision's ColorJitter would (brightness, contrast about
    its own mean grey, saturation, each clamped), its ops in an order drawn per sample (a fixed
    order had made the model see only one of the six compositions)."""
    from torchvision.transforms.v2 import functional as tvf

    b = 12
    ctx = torch.rand(b, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    lab = torch.zeros(b, 8, 8, dtype=torch.uint8)
    st = {"jitter": [0.4, 0.4, 0.4], "jitter_p": 1.0, "flip_p": 0.0}
    c2, *_ = _shared_jitter_flip(ctx, ctx.clone(), lab, lab, st, torch.Generator().manual_seed(3))
    # the same draws, in the function's order: on, factors, op order
    gen = torch.Generator().manual_seed(3)
    torch.rand(b, generator=gen)
    f = 1 + (torch.rand(b, 3, generator=gen) * 2 - 1) * torch.tensor([0.4, 0.4, 0.4])
    order = torch.rand(b, 3, generator=gen).argsort(dim=1)
    assert len({tuple(o) for o in order.tolist()}) > 1
    ops = (tvf.adjust_brightness, tvf.adjust_contrast, tvf.adjust_saturation)
    for i in range(b):
        x = ctx[i]
        for k in order[i].tolist():
            x = ops[k](x, float(f[i, k]))
        torch.testing.assert_close(c2[i], x, atol=2e-3, rtol=0)


def test_random_target_block_is_refused_for_hooknet(three, tmp_path) -> None:  # noqa: ANN001
    stores, _ = three
    for init in ("random", "imagenet", "dsf"):
        with pytest.raises(ConfigError, match=r"finetune\.target_block random is for init unet"):
            FineTuner(
                _settings(init=init, target_block="random"),
                [stores[1]],
                [stores[2]],
                1.0,
                CLASSES,
                tmp_path,
            )


def test_imagenet_init_loads_the_local_weights_file(three, tmp_path) -> None:  # noqa: ANN001
    import torchvision

    stores, _ = three
    with pytest.raises(ConfigError, match=r"finetune\.weights.*resnet18-f37072fd\.pth"):
        FineTuner(_settings(init="imagenet"), [stores[1]], [stores[2]], 1.0, CLASSES, tmp_path)
    with pytest.raises(ConfigError, match=r"finetune\.weights .*missing\.pth is not a file"):
        FineTuner(
            _settings(init="imagenet", weights=str(tmp_path / "missing.pth")),
            [stores[1]],
            [stores[2]],
            1.0,
            CLASSES,
            tmp_path,
        )
    torch.manual_seed(11)
    wrong = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), wrong)
    with pytest.raises(ConfigError, match=r"finetune\.weights: .*does not fit backbone"):
        FineTuner(
            _settings(init="imagenet", weights=str(wrong)),
            [stores[1]],
            [stores[2]],
            1.0,
            CLASSES,
            tmp_path,
        )
    file_state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(file_state, path)
    tuner = FineTuner(
        _settings(init="imagenet", weights=str(path)),
        [stores[1]],
        [stores[2]],
        1.0,
        CLASSES,
        tmp_path,
    )
    for encoder in (tuner.model.context_encoder, tuner.model.target_encoder):
        own = encoder.state_dict()
        for tv_key, our_key in encoder.key_map.items():
            assert torch.equal(own[our_key], file_state[tv_key]), tv_key
    tuner.fit()
    # until model.pt is written no history.tsv looks finished: the epochs so far are apart
    assert not (tmp_path / "history.tsv").exists()
    assert len(pd.read_csv(tmp_path / "history.running.tsv", sep="\t")) == tuner.epoch
    tuner.export()
    model = torch.load(tmp_path / "model.pt", weights_only=True)
    assert model["init"] == "imagenet" and model["settings"]["weights"] == str(path)

    # a resume starts from the same file's weights: other weights under its name are refused
    def again() -> FineTuner:
        st = _settings(init="imagenet", weights=str(path))
        return FineTuner(st, [stores[1]], [stores[2]], 1.0, CLASSES, tmp_path)

    assert again().resume()
    torch.manual_seed(12)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ConfigError, match="trained from other starting weights"):
        again().resume()


def test_normalisation_follows_the_encoders_unless_given(three, tmp_path, caplog) -> None:  # noqa: ANN001
    from dsf.models.dsf import DSFModel
    from dsf.norm import store_stats

    stores, _ = three
    fit, select = [stores[1]], [stores[2]]
    # no encoders, nothing given: computed from the fit stores
    tuner = FineTuner(_settings(init="random"), fit, select, 1.0, CLASSES, tmp_path / "r")
    sample = store_stats(
        [s.tiles for s in fit], defaults("pretrain")["norm_tiles"], 0, progress=False
    )
    assert tuner.mean.flatten().tolist() == pytest.approx(sample.mean)
    assert tuner.std.flatten().tolist() == pytest.approx(sample.std)
    # encoders that record their pretraining's statistics: those
    encoders = tmp_path / "encoders.pt"
    state = DSFModel("resnet18", n_blocks=16, method="simsiam").encoder_state()
    own = {"mean": [0.6, 0.5, 0.4], "std": [0.2, 0.25, 0.3]}
    torch.save(state | {"settings": own}, encoders)
    tuner = FineTuner(_settings(init="dsf"), fit, select, 1.0, CLASSES, tmp_path / "d", encoders)
    assert tuner.mean.flatten().tolist() == pytest.approx(own["mean"])
    assert tuner.std.flatten().tolist() == pytest.approx(own["std"])
    # given ones win, with a warning when they differ from the encoders'
    given = ([0.7, 0.5, 0.6], [0.2, 0.2, 0.2])
    with caplog.at_level(logging.WARNING, logger="dsf"):
        tuner = FineTuner(
            _settings(init="dsf"), fit, select, 1.0, CLASSES, tmp_path / "g", encoders, norm=given
        )
    assert tuner.mean.flatten().tolist() == pytest.approx(given[0])
    assert "was pretrained with mean" in caplog.text


def test_resume_from_other_encoders_or_statistics_is_refused(three, tmp_path) -> None:  # noqa: ANN001
    """A fine-tuning killed before pretraining was redone must not resume on the new encoders
    (its weights grew from the old ones), nor under another normalisation; the same encoders
    resume."""
    from dsf.models.dsf import DSFModel

    stores, _ = three
    fit, select = [stores[1]], [stores[2]]
    stats = {"mean": [0.6, 0.5, 0.4], "std": [0.2, 0.25, 0.3]}
    old, new = tmp_path / "old.pt", tmp_path / "new.pt"
    for seed, path in ((0, old), (1, new)):
        torch.manual_seed(seed)
        state = DSFModel("resnet18", n_blocks=16, method="simsiam").encoder_state()
        torch.save(state | {"settings": stats}, path)
    out = tmp_path / "ft"
    out.mkdir()

    def tuner(encoders: Path, **kw: object) -> FineTuner:
        st = _settings(init="dsf", epochs=1)
        return FineTuner(st, fit, select, 1.0, CLASSES, out, encoders, **kw)  # type: ignore[arg-type]

    tuner(old).fit()
    assert tuner(old).resume()
    with pytest.raises(ConfigError, match="trained from other starting weights"):
        tuner(new).resume()
    with pytest.raises(ConfigError, match=r"other settings \(mean, std"):
        tuner(old, norm=([0.7, 0.5, 0.6], [0.2, 0.2, 0.2])).resume()
    # a checkpoint of an older dsf, which recorded neither, cannot tell: it resumes
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    del ckpt["encoders"], ckpt["hyper"]["mean"], ckpt["hyper"]["std"]
    torch.save(ckpt, out / "checkpoint.pt")
    assert tuner(new, norm=([0.7, 0.5, 0.6], [0.2, 0.2, 0.2])).resume()


def test_encoders_of_another_fold_are_refused(three, tmp_path) -> None:  # noqa: ANN001
    """Fold 1's encoders were pretrained on fold 0's validation slide: fine-tuning fold 0 from
    them is refused naming both folds; fold 0's own and scope-all encoders (no fold) are used."""
    from dsf.models.dsf import DSFModel

    stores, folds = three
    state = DSFModel("resnet18", n_blocks=16, method="simsiam").encoder_state()
    for fold in (1, 0, None):
        enc = tmp_path / f"enc{fold}.pt"
        torch.save(state | {"fold": fold, "slides": ["A", "B", "C"]}, enc)
        args = _args(stores[1:], folds, tmp_path / f"ft{fold}", "--init", "dsf", "--encoders",
                     str(enc), "--epochs", "1", "--steps-per-epoch", "1")  # fmt: skip
        if fold == 1:
            with pytest.raises(ConfigError, match="pretrained for fold 1.*fold 0's validation"):
                FineTuner(_settings(init="dsf"), stores[1:2], stores[2:], 1.0, CLASSES,
                          tmp_path / "x", enc, {"fold": 0})  # fmt: skip
            assert main(args) == 2 and not (tmp_path / f"ft{fold}" / "model.pt").exists()
        else:
            assert main(args) == 0 and (tmp_path / f"ft{fold}" / "model.pt").exists()


def test_held_out_0_fits_every_training_slide_and_keeps_the_last_epoch(three, tmp_path) -> None:  # noqa: ANN001
    """finetune.held_out 0 (the paper's fit on the whole training set): no selection slide,
    the last epoch's weights kept, selection scores NaN in history.tsv and model.pt."""
    import math

    from dsf.curves import plot_finetune

    stores, folds = three
    out = tmp_path / "all"
    assert main(_args(stores[1:], folds, out, "--held-out", "0")) == 0
    model = torch.load(out / "model.pt", weights_only=True)
    assert model["fit_slides"] == ["B", "C"] and model["select_slides"] == []
    assert model["epoch"] == 2 and math.isnan(model["select_macro_f1"])
    hist = pd.read_csv(out / "history.tsv", sep="\t")
    assert len(hist) == 2 and hist["select_macro_f1"].isna().all()
    plot_finetune(out / "history.tsv", tmp_path / "curve.png", "random", 1.0, 0)
    assert (tmp_path / "curve.png").stat().st_size > 0


def test_non_finite_weights_are_never_checkpointed(three, tmp_path) -> None:  # noqa: ANN001
    """A step whose loss was finite can still spoil the weights (a NaN gradient): the epoch's
    checkpoint is then not written, and the last good one stays."""
    stores, _ = three
    tuner = FineTuner(_settings(epochs=1), [stores[1]], [stores[2]], 1.0, CLASSES, tmp_path)
    tuner.save_checkpoint()
    good = tuner.checkpoint_path.read_bytes()
    with torch.no_grad():
        tuner.model.target_head.weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(TrainingError, match=r"non-finite weights .*target_head.weight.*\.lr"):
        tuner.save_checkpoint()
    assert tuner.checkpoint_path.read_bytes() == good


def test_a_new_run_stopped_midway_leaves_no_earlier_result(three, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """Without --resume, an earlier run's model.pt, history and checkpoint in the output folder
    are removed before training (as pretraining does), so a run stopped midway does not leave
    them looking like its own."""
    from dsf import finetune

    stores, folds = three
    out = tmp_path / "ft"
    out.mkdir()
    for name in ("model.pt", "history.tsv", "history.running.tsv", "checkpoint.pt"):
        (out / name).write_text("an earlier run's")

    def stopped(self, progress=None) -> None:  # noqa: ANN001
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune.FineTuner, "fit", stopped)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C while training
        main(_args(stores[1:], folds, out))
    assert sorted(p.name for p in out.iterdir()) == []


def test_a_stop_says_where_it_stood_and_resume_goes_on(  # noqa: ANN001
    three, tmp_path, monkeypatch, capsys
) -> None:
    """SIGTERM (a stopped Snakemake, a time limit) during an epoch ends the run saying which
    epoch the checkpoint holds and that --resume goes on from the next (it logged nothing)."""
    import os
    import signal

    stores, folds = three
    out = tmp_path / "ft"
    real = FineTuner.train_epoch
    stop_in: list[int] = []

    def epoch(self: FineTuner, progress: object = None) -> float:
        if self.epoch + 1 in stop_in:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, progress)

    monkeypatch.setattr(FineTuner, "train_epoch", epoch)
    before = signal.getsignal(signal.SIGTERM)
    try:
        for stop, said in (
            (1, "no epoch had finished"),
            (2, f"{out / 'checkpoint.pt'} holds epoch 1: rerun with --resume"),
        ):
            stop_in[:] = [stop]
            with pytest.raises(SystemExit) as exit:
                main([*_args(stores[1:], folds, out), "--no-progress"])
            err = capsys.readouterr().err
            assert exit.value.code == 128 + signal.SIGTERM
            assert f"stopped before the end of epoch {stop} of 2; {said}" in err
            assert not (out / "model.pt").exists()
        stop_in[:] = []
        assert main([*_args(stores[1:], folds, out), "--no-progress", "--resume"]) == 0
        assert "after epoch 1" in capsys.readouterr().err and (out / "model.pt").exists()
    finally:
        signal.signal(signal.SIGTERM, before)


def test_settings_an_init_does_not_read_do_not_stop_its_resume(tmp_path) -> None:  # noqa: ANN001
    """The workflow writes the settings an init does not read at their defaults (the U-Net's
    context_weight, weights for all but imagenet), and a fine-tuning leaves them out of the
    settings its checkpoint is resumed under: a checkpoint written under other values of them
    resumes, while a changed setting the init reads is still refused."""
    from dsf import checkpoints
    from dsf.inits import unread_settings

    assert unread_settings("unet") == {"context_weight", "weights"}
    assert unread_settings("imagenet") == set() and unread_settings("dsf") == {"weights"}
    saved = {"hyper": {"weights": "/old/resnet18.pth", "context_weight": 0.5, "lr": 0.001}}
    now = {"lr": 0.001}  # a U-Net's settings: neither is compared
    checkpoints._check_resume(tmp_path / "c.pt", saved, now, None, None)
    with pytest.raises(ConfigError, match="lr"):
        checkpoints._check_resume(tmp_path / "c.pt", saved, {"lr": 0.01}, None, None)
