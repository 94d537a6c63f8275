"""Class rasters traced into polygons (`dsf.trace`): ring geometry and the simplification."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.measure import approximate_polygon, find_contours

from dsf.trace import class_features, component_rings, simplify


def _blobs(seed: int, shape: tuple[int, int] = (120, 160)) -> np.ndarray:
    """Ragged random regions: smoothed noise thresholded, as a barely trained model speckles."""
    noise = np.random.default_rng(seed).random(shape)
    return ndimage.gaussian_filter(noise, 2.0) > 0.5


@pytest.mark.parametrize("tolerance", [0.2, 0.5, 1.5, 4.0])
def test_simplify_keeps_the_points_skimage_keeps(tolerance: float) -> None:
    """The vectorised Douglas-Peucker keeps exactly `approximate_polygon`'s points, on closed
    pixel outlines (ties on the half-pixel grid included) and on an open noisy path."""
    paths = [c for seed in (1, 2) for c in find_contours(_blobs(seed).astype(np.float32), 0.5)]
    paths.append(np.cumsum(np.random.default_rng(3).normal(size=(500, 2)), axis=0))
    assert len(paths) > 20 and max(len(p) for p in paths) > 200
    simplified = 0
    for path in paths:
        ours = simplify(path, tolerance)
        assert np.array_equal(ours, approximate_polygon(path, tolerance))
        simplified += len(ours) < len(path)
    assert simplified > len(paths) // 2


def test_simplify_zero_tolerance_and_short_paths_are_unchanged() -> None:
    path = np.array([[0.0, 0.5], [1.0, 0.5], [2.0, 0.5], [0.0, 0.5]])
    assert np.array_equal(simplify(path, 0.0), path)
    assert np.array_equal(simplify(path[:2], 1.0), path[:2])


def _box(ring: list[list[float]]) -> tuple[float, float, float, float]:
    xy = np.asarray(ring)
    return xy[:, 0].min(), xy[:, 1].min(), xy[:, 0].max(), xy[:, 1].max()


def test_holes_far_from_the_corner_are_traced_where_they_are() -> None:
    """Each hole is traced in its own box: its ring lies on that hole's pixel edges, in level-0
    px, wherever it sits in the component (and a hole under the size limit is filled)."""
    comp = np.ones((60, 90), bool)
    holes = [(5, 8, 3, 4), (40, 70, 6, 9), (50, 10, 4, 4)]  # row, col, height, width
    for r, c, h, w in holes:
        comp[r : r + h, c : c + w] = False
    comp[30, 45] = False  # a one-pixel hole
    offset = (100, 200)  # the crop's top-left in the raster (with its 1 px border)
    ds = 2.0
    rings = component_rings(np.pad(comp, 1), ds, offset, tolerance=0, min_hole_px=2)
    assert len(rings) == 1 + len(holes)
    r0, c0 = offset[0] + 1, offset[1] + 1  # the component's first raster pixel
    assert _box(rings[0]) == (c0 * ds, r0 * ds, (c0 + 90) * ds, (r0 + 60) * ds)
    expected = sorted(
        ((c0 + c) * ds, (r0 + r) * ds, (c0 + c + w) * ds, (r0 + r + h) * ds) for r, c, h, w in holes
    )
    assert sorted(_box(ring) for ring in rings[1:]) == expected
    assert all(ring[0] == ring[-1] for ring in rings)


def test_class_features_cover_every_component_of_each_class() -> None:
    labels = np.where(_blobs(4), 1, 2).astype(np.uint8)
    labels[:10] = 0
    classes = {1: ("TUM", (213, 94, 0)), 2: ("STR", (86, 180, 233))}
    feats = list(class_features(labels, 1.0, classes, tolerance=0.2, min_px=0))
    for cls, (name, _) in classes.items():
        n = ndimage.label(labels == cls)[1]
        assert sum(f["properties"]["classification"]["name"] == name for f in feats) == n


def _area(ring: list[list[float]]) -> float:
    xy = np.asarray(ring)
    return 0.5 * float(np.sum(xy[:-1, 0] * xy[1:, 1] - xy[1:, 0] * xy[:-1, 1]))


def test_rings_simplified_to_no_area_are_left_out() -> None:
    """Specks and one-pixel lines kept with min_px 0: simplified, a ring of 3 positions or no
    area is no GeoJSON ring (QuPath and RFC 7946 refuse it), so it is dropped, and a feature
    left without its outer ring with it; what remains is valid and wound as RFC 7946 asks."""
    rng = np.random.default_rng(0)
    labels = (rng.random((60, 60)) < 0.08).astype(np.uint8)  # single-pixel specks
    labels[30, 5:40] = 1  # a one-pixel line
    labels[5:25, 45:58] = 1  # a block with a one-pixel hole
    labels[15, 50] = 0
    feats = list(class_features(labels, 1.0, {1: ("TUM", (255, 0, 0))}, tolerance=0.5, min_px=0))
    assert feats
    for f in feats:
        for i, ring in enumerate(f["geometry"]["coordinates"]):
            area = _area(ring)
            assert len(ring) >= 4 and ring[0] == ring[-1] and area != 0
            assert (area > 0) == (i == 0)  # outer counterclockwise, holes clockwise


@pytest.mark.parametrize("tolerance", [0.0, 0.5])
def test_rings_follow_the_pixel_edges_and_keep_the_area(tolerance: float) -> None:
    """A pixel is a square, not a diamond: each region's polygon (outer ring less its holes)
    has its pixel count as area, a square's ring is its four corners, and where two parts of a
    region meet only at a corner the ring passes near it twice without touching itself."""
    labels = np.zeros((40, 40), np.uint8)
    labels[2:8, 2:8] = 1  # a square
    labels[12:30, 3:20] = 1  # a block with a hole
    labels[18:22, 8:12] = 0
    labels[3:10, 25:28] = 1  # an L
    labels[8:10, 25:36] = 1
    labels[30:33, 25:28] = 1  # two squares meeting at a corner, joined round the far side
    labels[33:36, 28:31] = 1
    labels[27:30, 25:34] = 1
    labels[27:36, 31:34] = 1
    feats = list(class_features(labels, 1.0, {1: ("TUM", (255, 0, 0))}, tolerance=tolerance))
    comps, n = ndimage.label(labels == 1)
    assert len(feats) == n == 4
    areas = sorted(sum(_area(r) for r in f["geometry"]["coordinates"]) for f in feats)
    assert areas == sorted(float(np.count_nonzero(comps == i)) for i in range(1, n + 1))
    square = min(feats, key=lambda f: len(f["geometry"]["coordinates"][0]))
    assert sorted(map(tuple, square["geometry"]["coordinates"][0][:-1])) == [
        (2.0, 2.0), (2.0, 8.0), (8.0, 2.0), (8.0, 8.0),
    ]  # fmt: skip
    for f in feats:
        for ring in f["geometry"]["coordinates"]:
            body = [tuple(p) for p in ring[:-1]]
            assert len(set(body)) == len(body)  # no vertex twice: the ring never touches itself
