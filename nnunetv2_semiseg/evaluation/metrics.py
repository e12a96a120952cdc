"""Segmentation metrics in the conventions of the semi-supervised segmentation literature.

All functions take two binary masks of the same shape, ``pred`` (the segmentation to evaluate) and ``ref`` (the
reference / ground truth), as numpy arrays (any dtype; non-zero = object). ``spacing`` is given in *array axis
order* (for a SimpleITK array that is (z, y, x), i.e. ``image.GetSpacing()[::-1]``), exactly like MedPy's
``voxelspacing``. ``spacing=None`` measures distances in voxels, which is how the published tables of UA-MT,
SS-Net, MC-Net, BCP, MCF and the other SSL4MIS-lineage papers were computed (their test scripts call MedPy's
``metric.binary`` functions without ``voxelspacing``); passing the image spacing gives millimetres.

Definitions (P = predicted voxels, R = reference voxels, S(X) = surface voxels of X, i.e. the voxels of X that
have at least one face neighbour (connectivity 1, MedPy's default) outside X or lie on the image border,
d(v, S) = Euclidean distance, in voxels or mm, from voxel v to the nearest voxel of S):

- Dice     = 2 |P ∩ R| / (|P| + |R|)                               (MedPy ``binary.dc``)
- Jaccard  = |P ∩ R| / |P ∪ R|                                      (MedPy ``binary.jc``)
- 95HD     = 95th percentile (numpy linear interpolation) of the pooled set
             {d(p, S(R)) : p ∈ S(P)} ∪ {d(r, S(P)) : r ∈ S(R)}       (MedPy ``binary.hd95``)
- ASD      = mean over p ∈ S(P) of d(p, S(R))                       (MedPy ``binary.asd(pred, ref)``)
  This is the *directed* average surface distance from the prediction to the reference. It is what the papers'
  "ASD" column contains (their scripts call ``metric.binary.asd(pred, gt)``), even though several papers call it
  the average *symmetric* surface distance.
- ASSD     = mean of the pooled set {d(p, S(R)) : p ∈ S(P)} ∪ {d(r, S(P)) : r ∈ S(R)}
                                                                    (MedPy ``binary.assd``, MedPy >= 0.5)
  The symmetric variant, reported alongside for users who want a true metric. It weights each direction by its
  number of surface voxels (MedPy < 0.5 averaged the two directed means instead).

Surface distances are computed by MedPy (``medpy.metric.binary``, a maintained library and the one the papers
used). Before calling it, both masks are cropped to the bounding box of their union plus a one-voxel margin
(clipped at the image border). This gives bit-identical results (every surface voxel of both masks lies in the
crop, an exact Euclidean distance transform does not depend on the extent of the array, and the margin keeps
voxels that were not on the image border off the crop border) and makes large, mostly empty volumes cheap.

Empty masks (MedPy raises an error for surface distances of an empty mask), selected by ``empty_convention``:

================================  ======================================  ========================================
case                              ``"nan"`` (default)                     ``"literature"``
================================  ======================================  ========================================
pred and ref both empty           Dice 1, Jaccard 1, 95HD 0, ASD 0        Dice 0, Jaccard 0, 95HD 0, ASD 0
pred empty, ref not empty         Dice 0, Jaccard 0, distances NaN        Dice 0, Jaccard 0, 95HD 0, ASD 0
ref empty, pred not empty         Dice 0, Jaccard 0, distances NaN        Dice 0, Jaccard 0, distances NaN
================================  ======================================  ========================================

``"literature"`` reproduces the UA-MT / SS-Net / SSL4MIS test scripts, which return ``(0, 0, 0, 0)`` whenever the
prediction is empty (``if pred.sum() == 0``) without looking at the reference; those scripts crash (MedPy error)
when the reference is empty and the prediction is not, so no literature value exists there and NaN is used.
With ``"nan"`` a distance is undefined when exactly one mask is empty; NaN values are excluded from means and
the number of excluded values is reported by the evaluation command, so a missed structure never improves the
mean distance silently (under ``"literature"`` it counts as a perfect 0).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np

EMPTY_CONVENTIONS = ("nan", "literature")

# metric keys produced by compute_binary_metrics, in the order used for tables and CSV columns
DISTANCE_METRICS = ("hd95", "asd", "assd")
METRIC_KEYS = ("dice", "jaccard") + tuple(f"{m}_{u}" for u in ("voxel", "mm") for m in DISTANCE_METRICS)


def _as_bool(mask: np.ndarray) -> np.ndarray:
    return np.asarray(mask).astype(bool, copy=False)


def _check_pair(pred: np.ndarray, ref: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    pred = _as_bool(pred)
    ref = _as_bool(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref must have the same shape, got {pred.shape} and {ref.shape}")
    return pred, ref


def _check_spacing(spacing: Optional[Sequence[float]], ndim: int) -> Optional[Tuple[float, ...]]:
    if spacing is None:
        return None
    spacing = tuple(float(s) for s in np.atleast_1d(spacing))
    if len(spacing) == 1:
        spacing = spacing * ndim
    if len(spacing) != ndim:
        raise ValueError(f"spacing {spacing} has {len(spacing)} entries but the masks have {ndim} dimensions")
    if not all(s > 0 and math.isfinite(s) for s in spacing):
        raise ValueError(f"spacing must be positive and finite, got {spacing}")
    return spacing


def dice(pred: np.ndarray, ref: np.ndarray, empty_convention: str = "nan") -> float:
    """Dice similarity coefficient 2|P∩R| / (|P|+|R|) (MedPy ``binary.dc``), in [0, 1].

    Both empty: 1 under ``"nan"`` (nothing to find, nothing found), 0 under ``"literature"`` (the papers' scripts
    score every empty prediction 0). See the module docstring.
    """
    _check_convention(empty_convention)
    pred, ref = _check_pair(pred, ref)
    n_pred, n_ref = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    if n_pred + n_ref == 0:
        return 1.0 if empty_convention == "nan" else 0.0
    return 2.0 * int(np.count_nonzero(pred & ref)) / (n_pred + n_ref)


def jaccard(pred: np.ndarray, ref: np.ndarray, empty_convention: str = "nan") -> float:
    """Jaccard index |P∩R| / |P∪R| (MedPy ``binary.jc``), in [0, 1]; empty masks as for :func:`dice`."""
    _check_convention(empty_convention)
    pred, ref = _check_pair(pred, ref)
    union = int(np.count_nonzero(pred | ref))
    if union == 0:
        return 1.0 if empty_convention == "nan" else 0.0
    return int(np.count_nonzero(pred & ref)) / union


def _check_convention(empty_convention: str) -> None:
    if empty_convention not in EMPTY_CONVENTIONS:
        raise ValueError(f"empty_convention must be one of {EMPTY_CONVENTIONS}, got {empty_convention!r}")


def crop_to_union(pred: np.ndarray, ref: np.ndarray, margin: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of ``pred | ref`` enlarged by ``margin`` voxels (clipped to the array).

    Surface distances computed on the crop equal those on the full arrays (see the module docstring). Both masks
    must contain at least one object voxel in total.
    """
    pred, ref = _check_pair(pred, ref)
    coords = np.nonzero(pred | ref)
    if len(coords[0]) == 0:
        raise ValueError("cannot crop: both masks are empty")
    slicer = tuple(
        slice(max(int(c.min()) - margin, 0), min(int(c.max()) + margin + 1, n)) for c, n in zip(coords, pred.shape)
    )
    return pred[slicer], ref[slicer]


def _medpy_directed_surface_distances():
    """MedPy's helper behind hd95/asd/assd (surface voxels of a → distances to the surface of b), or None."""
    from medpy.metric import binary

    return getattr(binary, "__surface_distances", None)


def _surface_distance_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: Optional[Tuple[float, ...]], connectivity: int
) -> dict:
    """95HD, ASD (pred→ref) and ASSD with MedPy on non-empty masks (already cropped).

    MedPy's public ``hd95``, ``asd`` and ``assd`` each recompute the directed surface distances (five distance
    transforms in total). When MedPy's module-level helper ``__surface_distances`` (the function all three are
    built on) is available, the two directed distance sets are computed once and combined exactly as MedPy does
    (``numpy.percentile(hstack, 95)``, ``mean``, pooled ``mean``); otherwise the public functions are called. The
    tests check both routes against each other and against a brute-force computation.
    """
    from medpy.metric import binary

    directed = _medpy_directed_surface_distances()
    if directed is not None:
        d_pr = np.asarray(directed(pred, ref, spacing, connectivity), dtype=np.float64)
        d_rp = np.asarray(directed(ref, pred, spacing, connectivity), dtype=np.float64)
        pooled = np.hstack((d_pr, d_rp))
        return {"hd95": float(np.percentile(pooled, 95)), "asd": float(d_pr.mean()), "assd": float(pooled.mean())}
    return {
        "hd95": float(binary.hd95(pred, ref, voxelspacing=spacing, connectivity=connectivity)),
        "asd": float(binary.asd(pred, ref, voxelspacing=spacing, connectivity=connectivity)),
        "assd": float(binary.assd(pred, ref, voxelspacing=spacing, connectivity=connectivity)),
    }


def _empty_distances(n_pred: int, n_ref: int, empty_convention: str) -> Optional[float]:
    """The distance value dictated by the empty-mask convention, or None when both masks are non-empty."""
    if n_pred > 0 and n_ref > 0:
        return None
    if n_pred == 0 and n_ref == 0:
        return 0.0
    if n_pred == 0 and empty_convention == "literature":
        return 0.0
    return float("nan")


def surface_distance_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Optional[Sequence[float]] = None,
    connectivity: int = 1,
    empty_convention: str = "nan",
) -> dict:
    """``{"hd95": ..., "asd": ..., "assd": ...}`` for one pair of binary masks (see the module docstring).

    ``spacing`` in array axis order (MedPy ``voxelspacing``); None → voxel units (the papers' convention).
    ``connectivity`` defines surface voxels (MedPy's parameter; 1 = face neighbours, the default everywhere in
    the literature).
    """
    _check_convention(empty_convention)
    pred, ref = _check_pair(pred, ref)
    spacing = _check_spacing(spacing, pred.ndim)
    fallback = _empty_distances(int(np.count_nonzero(pred)), int(np.count_nonzero(ref)), empty_convention)
    if fallback is not None:
        return {k: fallback for k in DISTANCE_METRICS}
    pred, ref = crop_to_union(pred, ref)
    return _surface_distance_metrics(pred, ref, spacing, connectivity)


def hd95(pred, ref, spacing=None, connectivity: int = 1, empty_convention: str = "nan") -> float:
    """95 % Hausdorff distance: 95th percentile of the pooled directed surface distances P→R and R→P.

    Equals MedPy ``binary.hd95(pred, ref, voxelspacing=spacing)``; voxels when ``spacing`` is None (SS-Net's
    ``test_3d_patch.py`` / ``test_ACDC.py`` convention), mm with the spacing in array axis order.
    """
    return surface_distance_metrics(pred, ref, spacing, connectivity, empty_convention)["hd95"]


def asd(pred, ref, spacing=None, connectivity: int = 1, empty_convention: str = "nan") -> float:
    """Average surface distance from the prediction to the reference: mean_{p∈S(P)} d(p, S(R)).

    Equals MedPy ``binary.asd(pred, ref, voxelspacing=spacing)``, the value in the papers' "ASD" columns. It is
    directed (asd(a, b) != asd(b, a) in general); see :func:`assd` for the symmetric version.
    """
    return surface_distance_metrics(pred, ref, spacing, connectivity, empty_convention)["asd"]


def assd(pred, ref, spacing=None, connectivity: int = 1, empty_convention: str = "nan") -> float:
    """Average symmetric surface distance: mean of the pooled surface distances of both directions
    (MedPy ``binary.assd``)."""
    return surface_distance_metrics(pred, ref, spacing, connectivity, empty_convention)["assd"]


def compute_binary_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Optional[Sequence[float]] = None,
    connectivity: int = 1,
    empty_convention: str = "nan",
) -> dict:
    """All metrics for one pair of binary masks.

    Returns a dict with the keys of :data:`METRIC_KEYS` (``dice``, ``jaccard``, ``hd95_voxel``, ``asd_voxel``,
    ``assd_voxel``, ``hd95_mm``, ``asd_mm``, ``assd_mm``) plus ``n_pred`` and ``n_ref`` (voxel counts).
    ``spacing`` (array axis order) is used for the ``*_mm`` values; when it is None the mm values equal the voxel
    values (unit spacing).
    """
    _check_convention(empty_convention)
    pred, ref = _check_pair(pred, ref)
    spacing = _check_spacing(spacing, pred.ndim)
    n_pred, n_ref = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    out = {
        "dice": dice(pred, ref, empty_convention),
        "jaccard": jaccard(pred, ref, empty_convention),
    }
    fallback = _empty_distances(n_pred, n_ref, empty_convention)
    if fallback is not None:
        vox = mm = {k: fallback for k in DISTANCE_METRICS}
    else:
        pc, rc = crop_to_union(pred, ref)
        vox = _surface_distance_metrics(pc, rc, None, connectivity)
        mm = vox if spacing is None or all(s == 1.0 for s in spacing) else \
            _surface_distance_metrics(pc, rc, spacing, connectivity)
    for k in DISTANCE_METRICS:
        out[f"{k}_voxel"] = vox[k]
    for k in DISTANCE_METRICS:
        out[f"{k}_mm"] = mm[k]
    out["n_pred"] = n_pred
    out["n_ref"] = n_ref
    return out
