"""Input normalisation computed from the training tiles (dsf.norm; DESIGN section 5)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dsf.errors import ConfigError
from dsf.norm import check_settings, given_stats, main, read_stats, store_stats, tile_stats
from dsf.stores import open_store


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory, make_store) -> list[Path]:  # noqa: ANN001
    d = tmp_path_factory.mktemp("norm")
    return [
        make_store(d, name, seed, block=16, scale=2, stride=24)
        for name, seed in (("A", 1), ("B", 2))
    ]


def _exact(tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = tiles.reshape(-1, 3).astype(np.float64) / 255
    return x.mean(0), x.std(0)


def test_tile_stats_are_exact_whatever_the_chunks() -> None:
    tiles = np.random.default_rng(0).integers(0, 256, (3, 20, 20, 3), dtype=np.uint8)
    tiles[..., 2] //= 3  # channels differ
    mean, std = tile_stats(tiles)
    ref_mean, ref_std = _exact(tiles)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-12)
    np.testing.assert_allclose(std, ref_std, rtol=1e-12)
    assert tile_stats(iter([tiles[:1], torch.from_numpy(tiles[1:])])) == (mean, std)
    with pytest.raises(ValueError, match="uint8"):
        tile_stats(tiles.astype(np.float32))


def test_every_tile_counts_when_there_are_fewer_than_asked(stores: list[Path]) -> None:
    stats = store_stats(stores, 10_000, seed=0, progress=False)
    every = np.concatenate([open_store(s)["tiles"][:] for s in stores])
    ref_mean, ref_std = _exact(every)
    np.testing.assert_allclose(stats.mean, ref_mean, rtol=1e-10)
    np.testing.assert_allclose(stats.std, ref_std, rtol=1e-10)
    assert stats.tiles == stats.tiles_total == len(every) and stats.slides == ["A", "B"]


def test_a_sample_is_seeded(stores: list[Path]) -> None:
    total = store_stats(stores, 10_000, seed=0, progress=False).tiles_total
    assert total > 6
    a, b = (store_stats(stores, 3, seed=1, progress=False) for _ in range(2))
    others = {tuple(store_stats(stores, 3, seed=s, progress=False).mean) for s in range(2, 6)}
    assert a == b and a.tiles == 3 and a.tiles_total == total
    assert others - {tuple(a.mean)}  # other seeds draw other tiles


def test_cli_writes_the_statistics_of_the_training_slides_only(
    stores: list[Path], tmp_path: Path
) -> None:
    folds = tmp_path / "folds.tsv"
    folds.write_text("slide\tgroup\tfold\nA\tA\t0\nB\tB\t1\n")
    out = tmp_path / "norm" / "fold1.json"
    args = ["--stores", str(stores[0]), "--folds", str(folds), "--fold", "1", "--out", str(out)]
    assert main([*args, "--no-progress"]) == 0
    data = json.loads(out.read_text())
    assert data["slides"] == ["A"] and data["seed"] == 0
    alone = store_stats([stores[0]], 10_000, seed=0, progress=False)
    assert (data["mean"], data["std"]) == (alone.mean, alone.std)
    assert read_stats(out) == (alone.mean, alone.std)
    # B is fold 1's validation slide: refused, and nothing written
    bad = tmp_path / "bad.json"
    assert (
        main(
            ["--stores", *map(str, stores), "--folds", str(folds), "--fold", "1"]
            + ["--out", str(bad)]
        )
        == 2
    )
    assert not bad.exists() and not list(tmp_path.glob("bad*"))
    # --fold without --folds (or the reverse) would leave no slide out: refused, as in pretrain
    from dsf import pretrain

    for stage, out_opt in ((main, ["--out", str(bad)]), (pretrain.main, ["--out-dir", str(bad)])):
        for half in (["--fold", "1"], ["--folds", str(folds)]):
            with pytest.raises(SystemExit) as stop:
                stage(["--stores", *map(str, stores), *half, *out_opt])
            assert stop.value.code == 2 and not bad.exists()


def test_settings_and_files_that_cannot_be_used_are_named(tmp_path: Path) -> None:
    assert check_settings({"mean": None, "std": None}) is True
    assert check_settings({"mean": [0.5] * 3, "std": [0.2] * 3}) is False
    with pytest.raises(ConfigError, match="pretrain.mean and pretrain.std"):
        check_settings({"mean": [0.5] * 3, "std": None})
    missing = tmp_path / "gone.json"
    with pytest.raises(ConfigError, match=r"gone.json not found: write it with `dsf norm"):
        read_stats(missing)
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"mean": [0.5] * 3, "std": [0.2, 0.0, 0.2]}))
    with pytest.raises(ConfigError, match="flat.json: mean and std must be"):
        read_stats(flat)
    with pytest.raises(ConfigError, match="given twice"):
        given_stats([0.5] * 3, [0.2] * 3, flat)
    assert given_stats([0.5] * 3, [0.2] * 3, None) == ([0.5] * 3, [0.2] * 3)
    assert given_stats(None, None, None) is None  # nothing given: the run counts them
