"""Metrics and LCC post-processing: hand-computed values, analytic distances on cubes/plates, and an independent
brute-force surface-distance computation (numpy over surface voxels) cross-checked against the MedPy-backed code."""

import math

import numpy as np
import pytest
from medpy.metric import binary as medpy_binary

from nnunetv2_semiseg.evaluation import metrics as M
from nnunetv2_semiseg.evaluation.postprocessing import (keep_largest_component_per_label,
                                                        largest_connected_component)


# ------------------------------------------------------------------------------------------- independent helpers
def brute_surface_points(mask):
    """Coordinates of surface voxels: object voxels with a face neighbour outside the object or the array."""
    m = np.pad(np.asarray(mask, bool), 1)  # outside the array counts as background
    interior = m.copy()
    for ax in range(m.ndim):
        interior &= np.roll(m, 1, ax) & np.roll(m, -1, ax)
    surface = (m & ~interior)[tuple(slice(1, -1) for _ in range(m.ndim))]
    return np.argwhere(surface).astype(np.float64)


def brute_directed(a, b, spacing):
    """For each surface voxel of a: Euclidean distance (with spacing) to the nearest surface voxel of b."""
    pa, pb = brute_surface_points(a), brute_surface_points(b)
    diff = (pa[:, None, :] - pb[None, :, :]) * np.asarray(spacing, float)
    return np.sqrt((diff ** 2).sum(-1)).min(axis=1)


def brute_metrics(pred, ref, spacing):
    d_pr, d_rp = brute_directed(pred, ref, spacing), brute_directed(ref, pred, spacing)
    return {"hd95": float(np.percentile(np.concatenate([d_pr, d_rp]), 95)),
            "asd": float(d_pr.mean()),
            "assd": float(np.concatenate([d_pr, d_rp]).mean())}


def cube(shape, start, side):
    m = np.zeros(shape, bool)
    m[tuple(slice(s, s + side) for s in start)] = True
    return m


def sphere(shape, center, radius):
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, center)) <= radius ** 2


# ------------------------------------------------------------------------------------------------- Dice / Jaccard
def test_dice_jaccard_hand_built_masks():
    ref = np.zeros((4, 5), np.uint8)
    ref[1, 0:4] = 1          # 4 voxels
    ref[2, 0:2] = 1          # +2 -> 6
    pred = np.zeros((4, 5), np.uint8)
    pred[1, 1:4] = 1         # 3 voxels, all in ref
    pred[3, 4] = 1           # 1 false positive -> 4 voxels
    # |P∩R| = 3, |P| = 4, |R| = 6, |P∪R| = 7
    assert M.dice(pred, ref) == pytest.approx(2 * 3 / 10)
    assert M.jaccard(pred, ref) == pytest.approx(3 / 7)
    assert M.dice(pred, ref) == pytest.approx(medpy_binary.dc(pred, ref))
    assert M.jaccard(pred, ref) == pytest.approx(medpy_binary.jc(pred, ref))
    assert M.dice(ref, ref) == 1.0 and M.jaccard(ref, ref) == 1.0
    assert M.dice(pred, np.zeros_like(ref)) == 0.0


def test_shape_mismatch_and_bad_spacing_raise():
    with pytest.raises(ValueError, match="same shape"):
        M.dice(np.ones((2, 2)), np.ones((2, 3)))
    with pytest.raises(ValueError, match="entries"):
        M.hd95(np.ones((3, 3, 3)), np.ones((3, 3, 3)), spacing=(1.0, 2.0))
    with pytest.raises(ValueError, match="positive"):
        M.hd95(np.ones((3, 3)), np.ones((3, 3)), spacing=(1.0, 0.0))
    with pytest.raises(ValueError, match="empty_convention"):
        M.dice(np.ones((3, 3)), np.ones((3, 3)), empty_convention="zero")


# ------------------------------------------------------------------------------------------- analytic distances
# Two cubes of side 10, the second shifted by 3 voxels along the last axis (x), inside a 16x16x20 array.
# Overlap 10*10*7 = 700 -> Dice 1400/2000 = 0.7, Jaccard 700/1300.
# Surface of a cube: 10^3 - 8^3 = 488 voxels. Directed distances A -> B (by symmetry B -> A is the same):
#   x=0 face (100 voxels): 3; x=1 and x=2 rings (36 each): 2 and 1 (to B's side faces at x=3);
#   rings x=3..9 (7*36 = 252): 0 (they lie on B's side faces);
#   x=9 face interior (8x8 = 64): distance to the nearest face of B = min(y', z', 3) with
#   y' = min(y, 9-y) in {1,1,2,2,3,3,4,4}: 28 voxels at 1, 20 at 2, 16 at 3.
#   => 252 zeros, 64 ones, 56 twos, 116 threes; mean = (64 + 112 + 348) / 488 = 524 / 488;
#   pooled (976 values) 95th percentile at position 926.25 falls in the threes -> 95HD = 3.
# With spacing 2 along x (array order (1, 1, 2)): x=0 face 6, rings 4 and 2, x=9 face interior min(y', z')
#   (x=12 face now 6 mm away): 28 at 1, 20 at 2, 12 at 3, 4 at 4 -> sum 600 + 144 + 72 + 120 = 936,
#   mean 936 / 488; sorted pooled values: 504 zeros, 56 ones, 112 twos, 24 threes, 80 fours, 200 sixes -> 95HD 6.
CUBE_SHAPE = (16, 16, 20)


def shifted_cubes():
    return cube(CUBE_SHAPE, (3, 3, 2), 10), cube(CUBE_SHAPE, (3, 3, 5), 10)


def test_shifted_cubes_voxel_units_analytic():
    a, b = shifted_cubes()
    out = M.compute_binary_metrics(a, b)
    assert out["dice"] == pytest.approx(0.7)
    assert out["jaccard"] == pytest.approx(7 / 13)
    assert out["hd95_voxel"] == pytest.approx(3.0)
    assert out["asd_voxel"] == pytest.approx(524 / 488)
    assert out["assd_voxel"] == pytest.approx(524 / 488)
    assert out["hd95_mm"] == out["hd95_voxel"]  # no spacing: mm == voxel
    assert (out["n_pred"], out["n_ref"]) == (1000, 1000)


def test_shifted_cubes_anisotropic_spacing_mm_analytic():
    a, b = shifted_cubes()
    out = M.compute_binary_metrics(a, b, spacing=(1.0, 1.0, 2.0))
    assert out["hd95_voxel"] == pytest.approx(3.0)  # voxel values ignore the spacing
    assert out["asd_voxel"] == pytest.approx(524 / 488)
    assert out["hd95_mm"] == pytest.approx(6.0)
    assert out["asd_mm"] == pytest.approx(936 / 488)
    assert out["assd_mm"] == pytest.approx(936 / 488)
    # the single-metric functions agree
    assert M.hd95(a, b, spacing=(1, 1, 2)) == pytest.approx(6.0)
    assert M.asd(a, b, spacing=(1, 1, 2)) == pytest.approx(936 / 488)


@pytest.mark.parametrize("spacing", [None, (1.0, 1.0, 2.0), (3.0, 0.7, 1.3)])
def test_shifted_cubes_match_brute_force(spacing):
    a, b = shifted_cubes()
    expected = brute_metrics(a, b, spacing or (1, 1, 1))
    got = M.surface_distance_metrics(a, b, spacing)
    for k in ("hd95", "asd", "assd"):
        assert got[k] == pytest.approx(expected[k], abs=1e-9)


@pytest.mark.parametrize("d,axis,spacing", [(2, 0, None), (4, 1, None), (2, 0, (2.5, 0.8, 0.8)),
                                            (3, 2, (1.0, 1.0, 0.5))])
def test_thin_plates_distance_equals_shift(d, axis, spacing):
    """A one-voxel-thick plate is all surface; shifted by d along its normal every distance is d (times spacing)."""
    shape = (12, 12, 12)
    a = np.zeros(shape, bool)
    b = np.zeros(shape, bool)
    idx_a = [slice(2, 10)] * 3
    idx_b = [slice(2, 10)] * 3
    idx_a[axis] = 3
    idx_b[axis] = 3 + d
    a[tuple(idx_a)] = True
    b[tuple(idx_b)] = True
    expected = d * (1.0 if spacing is None else spacing[axis])
    out = M.compute_binary_metrics(a, b, spacing)
    assert out["dice"] == 0.0 and out["jaccard"] == 0.0
    assert out["hd95_voxel"] == pytest.approx(d) and out["asd_voxel"] == pytest.approx(d)
    assert out["hd95_mm"] == pytest.approx(expected)
    assert out["asd_mm"] == pytest.approx(expected)
    assert out["assd_mm"] == pytest.approx(expected)


def test_nested_cubes_directed_asd_analytic():
    """Cube [3,6]^3 inside cube [0,9]^3: every inner surface voxel is exactly 3 from the outer surface, so
    asd(inner, outer) = 3; the outer surface voxels are at the Euclidean distance to the box [3,6]^3
    (clamp projection), so asd(outer, inner) is their mean: ASD is directed."""
    shape = (10, 10, 10)
    inner, outer = cube(shape, (3, 3, 3), 4), cube(shape, (0, 0, 0), 10)
    pts = brute_surface_points(outer)
    d_outer = np.linalg.norm(pts - np.clip(pts, 3, 6), axis=1)
    d_inner = np.full(4 ** 3 - 2 ** 3, 3.0)
    assert M.asd(inner, outer) == pytest.approx(3.0)
    assert M.asd(outer, inner) == pytest.approx(d_outer.mean())
    assert M.asd(outer, inner) != pytest.approx(M.asd(inner, outer))
    # ASSD pools both directions: (56 * 3 + sum(d_outer)) / (56 + 488)
    assert M.assd(inner, outer) == pytest.approx((56 * 3.0 + d_outer.sum()) / (56 + 488))
    assert M.hd95(inner, outer) == pytest.approx(np.percentile(np.concatenate([d_inner, d_outer]), 95))


@pytest.mark.parametrize("spacing", [None, (2.0, 0.6, 0.6)])
def test_spheres_match_brute_force_and_radius_difference(spacing):
    shape = (22, 22, 22)
    a = sphere(shape, (11, 11, 11), 7)
    b = sphere(shape, (12, 10, 11), 4.5)
    expected = brute_metrics(a, b, spacing or (1, 1, 1))
    got = M.surface_distance_metrics(a, b, spacing)
    for k in ("hd95", "asd", "assd"):
        assert got[k] == pytest.approx(expected[k], abs=1e-9)
    if spacing is None:  # continuous value: radii differ by 2.5, centres by sqrt(2) -> distances within [1, 4]
        assert 1.0 <= got["asd"] <= 4.0 and 2.0 <= got["hd95"] <= 4.5


def test_masks_touching_the_border_crop_is_exact():
    """Object voxels on the array border are surface (MedPy's erosion border); the crop must keep that."""
    rng = np.random.default_rng(0)
    a = rng.random((9, 11, 7)) > 0.55
    b = np.roll(a, 2, axis=1) | (rng.random((9, 11, 7)) > 0.85)
    a[0, :, :] = True  # touch the border
    spacing = (1.7, 0.9, 1.1)
    got = M.surface_distance_metrics(a, b, spacing)
    assert got["hd95"] == pytest.approx(medpy_binary.hd95(a, b, voxelspacing=spacing), abs=1e-12)
    assert got["asd"] == pytest.approx(medpy_binary.asd(a, b, voxelspacing=spacing), abs=1e-12)
    assert got["assd"] == pytest.approx(medpy_binary.assd(a, b, voxelspacing=spacing), abs=1e-12)
    expected = brute_metrics(a, b, spacing)
    assert got["hd95"] == pytest.approx(expected["hd95"], abs=1e-9)
    assert got["asd"] == pytest.approx(expected["asd"], abs=1e-9)


def test_public_medpy_route_gives_the_same_values(monkeypatch):
    """Without MedPy's internal helper the public hd95/asd/assd are called; both routes agree."""
    a, b = sphere((14, 14, 14), (7, 7, 7), 5), sphere((14, 14, 14), (6, 8, 7), 3.5)
    spacing = (2.0, 0.8, 1.0)
    fast = M.surface_distance_metrics(a, b, spacing)
    assert M._medpy_directed_surface_distances() is not None  # the fast route is the one in use
    monkeypatch.setattr(M, "_medpy_directed_surface_distances", lambda: None)
    public = M.surface_distance_metrics(a, b, spacing)
    assert public == pytest.approx(fast, abs=1e-12)


def test_crop_to_union_keeps_margin_and_clips():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[0, 2] = True
    b[4, 6] = True
    pa, pb = M.crop_to_union(a, b)
    assert pa.shape == (6, 7)  # rows 0..5 (clipped at 0), cols 1..7
    assert pa.sum() == 1 and pb.sum() == 1


def test_2d_masks():
    a = np.zeros((20, 20), bool)
    a[5:15, 5:15] = True
    b = np.zeros((20, 20), bool)
    b[5:15, 8:18] = True
    out = M.compute_binary_metrics(a, b, spacing=(1.0, 0.5))
    assert out["dice"] == pytest.approx(0.7)
    expected = brute_metrics(a, b, (1.0, 0.5))
    assert out["hd95_mm"] == pytest.approx(expected["hd95"])
    assert out["asd_mm"] == pytest.approx(expected["asd"])


# ------------------------------------------------------------------------------------------------------ empty masks
def test_empty_conventions_nan_default():
    shape = (8, 8, 8)
    full = cube(shape, (2, 2, 2), 3)
    empty = np.zeros(shape, bool)
    both = M.compute_binary_metrics(empty, empty)
    assert both["dice"] == 1.0 and both["jaccard"] == 1.0
    assert all(both[k] == 0.0 for k in M.METRIC_KEYS if k not in ("dice", "jaccard"))
    for pred, ref in [(empty, full), (full, empty)]:
        out = M.compute_binary_metrics(pred, ref, spacing=(2, 2, 2))
        assert out["dice"] == 0.0 and out["jaccard"] == 0.0
        assert all(math.isnan(out[k]) for k in M.METRIC_KEYS if k not in ("dice", "jaccard"))
    assert math.isnan(M.hd95(empty, full))


def test_empty_conventions_literature():
    shape = (8, 8, 8)
    full = cube(shape, (2, 2, 2), 3)
    empty = np.zeros(shape, bool)
    # UA-MT / SS-Net: an empty prediction scores (0, 0, 0, 0), whatever the reference
    for ref in (full, empty):
        out = M.compute_binary_metrics(empty, ref, empty_convention="literature")
        assert all(out[k] == 0.0 for k in M.METRIC_KEYS)
    # empty reference, non-empty prediction: no literature value (MedPy raises) -> NaN distances
    out = M.compute_binary_metrics(full, empty, empty_convention="literature")
    assert out["dice"] == 0.0 and math.isnan(out["hd95_voxel"]) and math.isnan(out["asd_mm"])
    with pytest.raises(RuntimeError):
        medpy_binary.hd95(full, empty)


# ------------------------------------------------------------------------------------------------------------- LCC
def test_lcc_keeps_only_largest_component():
    m = np.zeros((10, 10, 10), np.uint8)
    m[0:3, 0:3, 0:3] = 1     # 27 voxels
    m[6:8, 6:8, 6:8] = 1     # 8 voxels
    m[9, 0, 9] = 1           # 1 voxel
    out = largest_connected_component(m)
    assert out.dtype == bool and out.sum() == 27 and out[0:3, 0:3, 0:3].all()
    assert largest_connected_component(np.zeros((4, 4), bool)).sum() == 0


def test_lcc_connectivity_full_by_default():
    """skimage.measure.label (SS-Net/BCP) uses full connectivity: diagonal neighbours join components."""
    m = np.zeros((6, 6, 6), bool)
    m[0:2, 0:2, 0:2] = True      # 8 voxels
    m[2, 2, 2] = True            # touches the block by a corner only
    m[3, 2, 2] = True
    m[4:6, 4:6, 0:3] = True      # 12 voxels, separate
    # full connectivity: the corner-touching chain joins the block -> 10 < 12, the separate block wins
    assert largest_connected_component(m).sum() == 12
    m[4:6, 4:6, 2] = False       # separate block now 8 voxels; block + chain = 10 wins with full connectivity
    full = largest_connected_component(m)
    assert full.sum() == 10 and full[3, 2, 2]
    faces = largest_connected_component(m, connectivity=1)  # face connectivity: two blocks of 8 tie
    assert faces.sum() == 8 and faces[0, 0, 0]  # tie -> the first component in raster order


def test_keep_largest_component_per_label():
    seg = np.zeros((8, 8), np.int16)
    seg[0:3, 0:3] = 1
    seg[7, 7] = 1
    seg[5:8, 0:2] = 2
    seg[0, 7] = 2
    out = keep_largest_component_per_label(seg)
    assert out.dtype == seg.dtype
    assert (out == 1).sum() == 9 and (out == 2).sum() == 6
    assert out[7, 7] == 0 and out[0, 7] == 0
    only1 = keep_largest_component_per_label(seg, labels=[1])
    assert only1[0, 7] == 2 and only1[7, 7] == 0
