"""``nnUNetv2_semiseg_evaluate``: compare a folder of predictions with a folder of reference labels using the
metrics and conventions of the semi-supervised segmentation literature (Dice, Jaccard, 95HD, ASD; distances in
voxels as in the papers' tables and in mm from the image spacing).

Python API (used by the accuracy benchmark)::

    from nnunetv2_semiseg.evaluation.evaluate import evaluate_folders
    results = evaluate_folders(ref_folder, pred_folder, labels=None, lcc=False)
    results["foreground_mean"]["dice"], results["mean"]["1"]["hd95_voxel"], results["per_case"][0]["metrics"]

Files are matched by case ID (file name minus its ending: ``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``, ... any
image format SimpleITK reads, see :data:`KNOWN_FILE_ENDINGS`) and read with SimpleITK. Reference and prediction of
a case must have the same size and (within 1e-3 relative) the same spacing; the case sets must be identical
(``chill=True`` / ``--chill`` evaluates only the predicted cases, as nnU-Net's ``--chill``). Violations raise
:class:`EvaluationError` naming the cases and the fix, before any metric is computed.

Conventions (details in :mod:`nnunetv2_semiseg.evaluation.metrics` and ``docs/evaluation.md``):

- Evaluated classes: ``labels`` (ints, or sequences of ints = regions evaluated as the union of those labels), else
  the labels / regions of ``dataset_json``, else every label > 0 found in the reference files.
- Voxel units: MedPy without ``voxelspacing`` (UA-MT / SS-Net / BCP / MCF test scripts); mm: MedPy with the image
  spacing (SimpleITK's (x, y, z) spacing reversed to the (z, y, x) array order).
- "ASD" is MedPy ``asd(pred, ref)`` (directed, the papers' column); ``assd`` is the symmetric average.
- Empty masks: ``empty_convention="nan"`` (default: both empty → Dice/Jaccard 1 and distances 0; exactly one
  empty → Dice/Jaccard 0 and distances NaN, excluded from the means and counted under ``"excluded"``) or
  ``"literature"`` (an empty prediction scores 0 on all metrics, as in the UA-MT / SS-Net scripts).
- Means: per class, mean over cases (NaN excluded); ``foreground_mean`` = mean over the classes of those per-class
  means (ACDC protocol: average of RV, Myo, LV); per case, ``mean_foreground`` = mean over classes.
- ``lcc=True`` keeps only the largest connected component (full connectivity, as skimage's ``label`` in SS-Net/BCP)
  of each evaluated class / region of the prediction, before any metric (SS-Net/BCP LA protocol).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import tempfile
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from nnunetv2_semiseg.evaluation.metrics import EMPTY_CONVENTIONS, METRIC_KEYS, compute_binary_metrics
from nnunetv2_semiseg.evaluation.postprocessing import largest_connected_component

# longest first so that '.nii.gz' wins over '.gz'-less matches
KNOWN_FILE_ENDINGS = (
    ".nii.gz", ".gipl.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".gipl", ".tiff", ".tif", ".png", ".bmp",
)
SPACING_RTOL = 1e-3
# Origin in mm (absolute) and direction cosines: nnU-Net's verify_dataset_integrity compares both with np.allclose;
# these tolerances only absorb the float rounding of header writers.
ORIGIN_ATOL_MM, DIRECTION_ATOL = 1e-3, 1e-4
DEFAULT_OUTPUT_NAME = "summary_semiseg"

Item = Tuple[int, ...]  # one evaluated class: a label (1-tuple) or a region (union of labels)


class EvaluationError(ValueError):
    """Bad input for the evaluation (mismatched folders, geometry, labels); the message names the fix."""


# ----------------------------------------------------------------------------------------------------- labels
def item_key(item: Item) -> str:
    """JSON/CSV key of a label (``"2"``) or region (``"1,2,3"``)."""
    return ",".join(str(i) for i in item)


def parse_label_spec(labels: Iterable[Union[int, str, Sequence[int]]]) -> List[Item]:
    """Normalise a label specification to a list of tuples.

    Accepts ints (``2``), strings (``"2"``, region ``"1,2,3"``) and sequences of ints (region ``(1, 2, 3)``).
    Labels must be integers > 0; duplicates are removed, order is kept.
    """
    items: List[Item] = []
    for spec in labels:
        if isinstance(spec, str):
            parts = [p.strip() for p in spec.split(",") if p.strip() != ""]
            try:
                values = [int(p) for p in parts]
            except ValueError:
                raise EvaluationError(
                    f"invalid label specification {spec!r}: use integers, e.g. '-l 1 2 3', or comma-separated "
                    f"regions, e.g. '-l 1,2,3 2,3 3'") from None
        elif isinstance(spec, (int, np.integer)):
            values = [int(spec)]
        else:
            values = [int(v) for v in spec]
        if not values:
            raise EvaluationError(f"empty label specification {spec!r}")
        if any(v <= 0 for v in values):
            raise EvaluationError(f"label specification {spec!r}: labels must be > 0 (background is not evaluated)")
        item = tuple(sorted(set(values)))
        if item not in items:
            items.append(item)
    if not items:
        raise EvaluationError("no labels to evaluate")
    return items


def dataset_json_values(path: str) -> set:
    """Every voxel value a segmentation of this dataset may hold: all labels, background and ignore."""
    with open(path) as f:
        labels = json.load(f)["labels"]
    values = set()
    for value in labels.values():
        values.update(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return values


def read_dataset_json(path: str) -> Tuple[List[Item], Dict[str, str], Optional[str]]:
    """Labels (or regions), their names and the file ending from an nnU-Net ``dataset.json``."""
    try:
        with open(path) as f:
            dj = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise EvaluationError(f"cannot read dataset.json {path}: {e}") from None
    if not isinstance(dj.get("labels"), dict):
        raise EvaluationError(f"{path} has no 'labels' dictionary (name -> int or list of ints)")
    items: List[Item] = []
    names: Dict[str, str] = {}
    for name, value in dj["labels"].items():
        if name == "ignore":  # nnU-Net's ignore label is not a class
            continue
        values = [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
        values = [v for v in values if v > 0]
        if not values:  # background
            continue
        item = tuple(sorted(set(values)))
        if item not in items:
            items.append(item)
            names[item_key(item)] = name
    if not items:
        raise EvaluationError(f"{path} defines no foreground labels")
    return items, names, dj.get("file_ending")


# ------------------------------------------------------------------------------------------------------ files
def split_case_id(filename: str, file_ending: Optional[str] = None) -> Optional[str]:
    """Case ID of ``filename`` (name minus the image file ending) or None when it is not an image file."""
    if filename.startswith("."):
        return None
    endings = (file_ending,) if file_ending else KNOWN_FILE_ENDINGS
    lower = filename.lower()
    for ending in endings:
        if lower.endswith(ending.lower()) and len(filename) > len(ending):
            return filename[: -len(ending)]
    return None


def find_cases(folder: str, file_ending: Optional[str] = None) -> Dict[str, str]:
    """``{case_id: path}`` for the image files in ``folder`` (other files, e.g. json/npz/pkl, are ignored)."""
    if not os.path.isdir(folder):
        raise EvaluationError(f"folder not found: {folder}")
    cases: Dict[str, str] = {}
    for fn in sorted(os.listdir(folder)):
        path = os.path.join(folder, fn)
        if not os.path.isfile(path):
            continue
        case = split_case_id(fn, file_ending)
        if case is None:
            continue
        if case in cases:
            raise EvaluationError(
                f"case {case!r} appears twice in {folder} ({os.path.basename(cases[case])} and {fn}); keep one file "
                f"per case")
        cases[case] = path
    return cases


def _read_info(path: str) -> Tuple[Tuple[int, ...], Tuple[float, ...], int, Tuple[float, ...], Tuple[float, ...]]:
    """Size, spacing, components, origin and direction from the header."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise EvaluationError(f"cannot read {path}: {str(e).strip().splitlines()[-1]}") from None
    return (tuple(reader.GetSize()), tuple(reader.GetSpacing()), reader.GetNumberOfComponents(),
            tuple(reader.GetOrigin()), tuple(reader.GetDirection()))


def read_segmentation(path: str) -> Tuple[np.ndarray, Tuple[float, ...]]:
    """Integer label array in SimpleITK's (z, y, x) order and the spacing in (x, y, z) order."""
    import SimpleITK as sitk

    from nnunetv2_semiseg.utilities.safe_io import CorruptImageError, check_image_file

    # SimpleITK fills the missing part of a truncated NIfTI with zeros, which would be scored as background.
    try:
        check_image_file(path)
    except CorruptImageError as e:
        raise EvaluationError(str(e)) from None
    try:
        image = sitk.ReadImage(path)
    except RuntimeError as e:
        raise EvaluationError(f"cannot read {path}: {str(e).strip().splitlines()[-1]}") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise EvaluationError(f"{path} has {image.GetNumberOfComponentsPerPixel()} components per voxel; a "
                              f"segmentation must be a single-channel label map")
    array = sitk.GetArrayFromImage(image)
    if np.issubdtype(array.dtype, np.floating):
        rounded = np.rint(array)
        if not np.array_equal(rounded, array):
            raise EvaluationError(f"{path} contains non-integer values; segmentations must be label maps "
                                  f"(threshold or argmax the probabilities first)")
        array = rounded.astype(np.int32)
    return array, tuple(image.GetSpacing())


def _spacing_matches(a: Sequence[float], b: Sequence[float], rtol: float = SPACING_RTOL) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= rtol * max(abs(x), abs(y)) for x, y in zip(a, b))


def _fmt_list(names: Sequence[str], limit: int = 10) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in total)" if len(names) > limit else "")


def match_cases(ref_folder: str, pred_folder: str, file_ending: Optional[str] = None,
                chill: bool = False, geometry_warnings: Optional[List[str]] = None
                ) -> Tuple[List[Tuple[str, str, str]], List[str]]:
    """Pair reference and prediction files by case ID and check that sizes and spacings agree.

    Returns ``([(case, ref_path, pred_path), ...], missing_predictions)``; raises :class:`EvaluationError`.
    Origin or direction differences (the same voxels, placed elsewhere in space) are appended to
    ``geometry_warnings`` when a list is given.
    """
    refs = find_cases(ref_folder, file_ending)
    preds = find_cases(pred_folder, file_ending)
    ending_hint = f" with ending {file_ending}" if file_ending else ""
    if not refs:
        raise EvaluationError(f"no reference image files{ending_hint} found in {ref_folder}")
    if not preds:
        raise EvaluationError(f"no prediction image files{ending_hint} found in {pred_folder}")
    only_pred = sorted(set(preds) - set(refs))
    only_ref = sorted(set(refs) - set(preds))
    if only_pred:
        raise EvaluationError(
            f"{len(only_pred)} prediction case(s) have no reference in {ref_folder}: {_fmt_list(only_pred)}. "
            f"Remove these predictions or add their labels (case IDs are file names minus the ending).")
    if only_ref and not chill:
        raise EvaluationError(
            f"{len(only_ref)} reference case(s) have no prediction in {pred_folder}: {_fmt_list(only_ref)}. "
            f"Predict them, or pass --chill (chill=True) to evaluate only the predicted cases.")
    cases = sorted(set(refs) & set(preds))
    problems = []
    for case in cases:
        size_r, spacing_r, comp_r, origin_r, direction_r = _read_info(refs[case])
        size_p, spacing_p, comp_p, origin_p, direction_p = _read_info(preds[case])
        if size_r != size_p:
            problems.append(f"case {case}: size (x, y, z) {size_p} in {preds[case]} differs from the reference "
                            f"{size_r} in {refs[case]}")
        elif not _spacing_matches(spacing_r, spacing_p):
            problems.append(f"case {case}: spacing (x, y, z) {tuple(round(s, 6) for s in spacing_p)} in "
                            f"{preds[case]} differs from the reference {tuple(round(s, 6) for s in spacing_r)} "
                            f"(relative tolerance {SPACING_RTOL:g})")
        elif geometry_warnings is not None:
            if not np.allclose(origin_r, origin_p, rtol=0, atol=ORIGIN_ATOL_MM):
                geometry_warnings.append(
                    f"case {case}: origin {tuple(round(o, 4) for o in origin_p)} of {preds[case]} differs from the "
                    f"reference {tuple(round(o, 4) for o in origin_r)}: the masks are compared voxel by voxel, but "
                    f"they do not lie at the same place in space (is the prediction of another image?)")
            if not np.allclose(direction_r, direction_p, rtol=0, atol=DIRECTION_ATOL):
                geometry_warnings.append(
                    f"case {case}: direction {tuple(round(d, 4) for d in direction_p)} of {preds[case]} differs "
                    f"from the reference {tuple(round(d, 4) for d in direction_r)}: the masks are compared voxel by "
                    f"voxel, but their axes point differently (a flipped or reoriented prediction?)")
    if problems:
        raise EvaluationError(
            "prediction and reference geometry differ:\n  " + "\n  ".join(problems[:20])
            + (f"\n  ... {len(problems)} cases in total" if len(problems) > 20 else "")
            + "\nPredictions must be on the reference image grid: export them in the original geometry (as "
              "nnUNetv2_predict does) or resample them to the reference before evaluating.")
    return [(c, refs[c], preds[c]) for c in cases], only_ref


def find_labels(ref_files: Iterable[str]) -> List[Item]:
    """Every label > 0 present in at least one reference file, as 1-tuples."""
    found = set()
    for path in ref_files:
        array, _ = read_segmentation(path)
        found.update(int(v) for v in np.unique(array) if v > 0)
    if not found:
        raise EvaluationError("the reference files contain no label > 0; pass the labels with -l or -dj")
    return [(v,) for v in sorted(found)]


# ---------------------------------------------------------------------------------------------------- metrics
def _nanmean(values: Sequence[float]) -> Tuple[float, int]:
    """Mean of the non-NaN values and the number of NaN values."""
    arr = np.asarray(values, dtype=np.float64)
    valid = ~np.isnan(arr)
    n_excluded = int(arr.size - valid.sum())
    return (float(arr[valid].mean()) if valid.any() else float("nan")), n_excluded


def _nanstd(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.std()) if arr.size else float("nan")


def evaluate_case(case: str, ref_file: str, pred_file: str, items: Sequence[Item], lcc: bool = False,
                  lcc_connectivity: Optional[int] = None, empty_convention: str = "nan",
                  surface_connectivity: int = 1) -> dict:
    """Metrics of one case for every label / region in ``items`` (see the module docstring)."""
    ref, spacing_xyz = read_segmentation(ref_file)
    pred, spacing_pred = read_segmentation(pred_file)
    if ref.shape != pred.shape:  # headers were checked already; this guards direct calls
        raise EvaluationError(f"case {case}: prediction shape {pred.shape} differs from reference {ref.shape}")
    spacing_array_order = tuple(float(s) for s in spacing_xyz[::-1])  # SimpleITK arrays are (z, y, x)
    metrics = {}
    for item in items:
        ref_mask = np.isin(ref, item)
        pred_mask = np.isin(pred, item)
        if lcc:
            pred_mask = largest_connected_component(pred_mask, lcc_connectivity)
        metrics[item_key(item)] = compute_binary_metrics(pred_mask, ref_mask, spacing_array_order,
                                                         surface_connectivity, empty_convention)
    mean_fg = {k: _nanmean([m[k] for m in metrics.values()])[0] for k in METRIC_KEYS}
    return {"case": case, "reference_file": os.path.abspath(ref_file), "prediction_file": os.path.abspath(pred_file),
            "spacing": list(spacing_xyz), "metrics": metrics, "mean_foreground": mean_fg,
            "reference_values": [int(v) for v in np.unique(ref)],
            "prediction_values": [int(v) for v in np.unique(pred)]}


def _evaluate_case_star(args):
    return evaluate_case(*args)


def undefined_labels(per_case: Sequence[dict], keys: Sequence[str]) -> List[str]:
    """Classes absent from every reference and every prediction: no case says anything about them, so their score
    is not defined (the per-case 'both empty' convention would otherwise report 100 %)."""
    return [k for k in keys if per_case and all(c["metrics"][k]["n_ref"] == 0 and c["metrics"][k]["n_pred"] == 0
                                                for c in per_case)]


def aggregate(per_case: Sequence[dict], keys: Sequence[str]) -> dict:
    """Per-class means/stds over cases (NaN excluded and counted) and the mean over classes.

    A class absent from all references and predictions (:func:`undefined_labels`) gets NaN means and stds and is
    left out of ``foreground_mean`` and of each case's ``mean_foreground``.
    """
    undefined = undefined_labels(per_case, keys)
    defined = [k for k in keys if k not in undefined]
    if undefined:
        for c in per_case:
            c["mean_foreground"] = {m: _nanmean([c["metrics"][k][m] for k in defined])[0] for m in METRIC_KEYS}
    mean, std, excluded = {}, {}, {}
    for key in keys:
        mean[key], std[key], excluded[key] = {}, {}, {}
        for m in METRIC_KEYS:
            values = [c["metrics"][key][m] for c in per_case]
            if key in undefined:
                mean[key][m], excluded[key][m], std[key][m] = float("nan"), 0, float("nan")
                continue
            mean[key][m], excluded[key][m] = _nanmean(values)
            std[key][m] = _nanstd(values)
    foreground_mean = {m: _nanmean([mean[k][m] for k in defined])[0] for m in METRIC_KEYS}
    return {"mean": mean, "std": std, "excluded": excluded, "foreground_mean": foreground_mean,
            "undefined_labels": undefined}


def unknown_reference_warnings(per_case: Sequence[dict], known: set, source: str) -> List[str]:
    """One warning per case whose reference holds values that are no label of the dataset (e.g. 0/255 masks)."""
    warnings = []
    for c in per_case:
        unknown = sorted(set(c["reference_values"]) - known)
        if unknown:
            warnings.append(f"case {c['case']}: reference {c['reference_file']} contains value(s) {unknown} that "
                            f"are not labels ({source}: {sorted(known)}); the scores of that case are meaningless. "
                            f"Is it a mask saved as 0/255? Convert the references to the dataset's labels.")
    return warnings


def dataset_json_of_reference_folder(ref_folder: str) -> Optional[str]:
    """``<raw dataset>/dataset.json`` when ``ref_folder`` is an nnU-Net raw dataset's labelsTr/labelsTs, else None."""
    folder = os.path.abspath(ref_folder)
    if os.path.basename(folder) not in ("labelsTr", "labelsTs"):
        return None
    candidate = os.path.join(os.path.dirname(folder), "dataset.json")
    return candidate if os.path.isfile(candidate) else None


def unknown_value_warnings(per_case: Sequence[dict], known: set, source: str) -> List[str]:
    """One warning per case whose prediction holds values that are no label (e.g. a mask saved as 0/255)."""
    warnings = []
    for c in per_case:
        unknown = sorted(set(c["prediction_values"]) - known)
        if unknown:
            warnings.append(f"case {c['case']}: prediction {c['prediction_file']} contains value(s) {unknown} that "
                            f"are not labels ({source}: {sorted(known)}); those voxels count as background. Is it "
                            f"a mask saved as 0/255, or a prediction of another dataset?")
    return warnings


def _distance_library_version() -> str:
    try:
        from importlib.metadata import version
        return f"medpy {version('medpy')}"
    except Exception:  # pragma: no cover - metadata missing in odd installs
        return "medpy"


def evaluate_folders(ref_folder: str, pred_folder: str, labels=None, lcc: bool = False, *,
                     dataset_json: Optional[str] = None, empty_convention: str = "nan",
                     lcc_connectivity: Optional[int] = None, surface_connectivity: int = 1,
                     chill: bool = False, num_processes: int = 1, output_file: Optional[str] = None,
                     file_ending: Optional[str] = None, strict: bool = False) -> dict:
    """Evaluate every prediction in ``pred_folder`` against ``ref_folder``; returns the result dictionary.

    Parameters
    ----------
    labels : labels to evaluate: ints and/or regions (sequences of ints or ``"1,2,3"`` strings). Default: the
        labels/regions of ``dataset_json``, else every label > 0 in the reference files.
    lcc : keep only the largest connected component of each evaluated class/region of the prediction (SS-Net/BCP).
    dataset_json : nnU-Net ``dataset.json`` for label names, regions and the file ending.
    empty_convention : ``"nan"`` or ``"literature"`` (see :mod:`nnunetv2_semiseg.evaluation.metrics`).
    lcc_connectivity : connectivity for the components (None = full, as skimage's ``label``).
    surface_connectivity : MedPy's connectivity defining surface voxels (1, the literature's default).
    chill : evaluate only the predicted cases when predictions are missing (as nnU-Net's ``--chill``).
    num_processes : worker processes (spawned) for the per-case computation.
    output_file : if given, write the JSON there and the CSV next to it (same name, ``.csv``), atomically.
    file_ending : only consider files with this ending (default: dataset.json's, else any known image ending).
    strict : raise :class:`EvaluationError` instead of warning for prediction values that are no label and for
        origin/direction differences between prediction and reference.

    Returns
    -------
    dict with ``per_case`` (list of ``{"case", "metrics": {class_key: {metric: value}}, "mean_foreground", ...}``),
    ``mean`` / ``std`` / ``excluded`` (``{class_key: {metric: value}}``, over cases), ``foreground_mean``
    (``{metric: value}``, mean over classes of ``mean``), ``labels`` (class keys such as ``"1"`` or ``"1,2,3"``),
    ``label_names``, ``num_cases``, ``missing_predictions``, ``settings``, ``undefined_labels`` (classes absent
    from every reference and prediction: NaN means, left out of the foreground mean) and ``warnings``. Metric names are
    :data:`~nnunetv2_semiseg.evaluation.metrics.METRIC_KEYS`: ``dice``, ``jaccard`` (fractions in [0, 1]),
    ``hd95_voxel``, ``asd_voxel``, ``assd_voxel``, ``hd95_mm``, ``asd_mm``, ``assd_mm``. NaN marks undefined
    values (they are written as ``null`` in the JSON file).
    """
    if empty_convention not in EMPTY_CONVENTIONS:
        raise EvaluationError(f"empty_convention must be one of {EMPTY_CONVENTIONS}, got {empty_convention!r}")
    names: Dict[str, str] = {}
    items: Optional[List[Item]] = None
    if dataset_json is not None:
        items, names, dj_ending = read_dataset_json(dataset_json)
        file_ending = file_ending or dj_ending
    else:
        # Names only: the evaluated classes stay those found in the references (or -l), as without a dataset.json.
        found_json = dataset_json_of_reference_folder(ref_folder)
        if found_json is not None:
            try:
                names = read_dataset_json(found_json)[1]
            except (EvaluationError, ValueError, OSError):
                names = {}  # an unusable dataset.json only costs the names
    if labels is not None:
        items = parse_label_spec([labels] if isinstance(labels, (int, str, np.integer)) else labels)
    warnings: List[str] = []
    pairs, missing = match_cases(ref_folder, pred_folder, file_ending, chill, geometry_warnings=warnings)
    if items is None:
        items = find_labels(p[1] for p in pairs)
    keys = [item_key(i) for i in items]

    jobs = [(case, r, p, items, lcc, lcc_connectivity, empty_convention, surface_connectivity)
            for case, r, p in pairs]
    if num_processes > 1 and len(jobs) > 1:
        import multiprocessing

        from nnunetv2_semiseg.utilities.safe_io import exit_with_parent

        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs)), initializer=exit_with_parent,
                                                       initargs=(os.getpid(),)) as pool:
            per_case = pool.map(_evaluate_case_star, jobs)
    else:
        per_case = [_evaluate_case_star(j) for j in jobs]

    if dataset_json is not None:
        known, source = dataset_json_values(dataset_json), f"labels of {dataset_json}"
    else:
        known = {0} | {v for c in per_case for v in c["reference_values"]} | {v for item in items for v in item}
        source = "values of the references and the evaluated labels"
    if dataset_json is not None:
        warnings += unknown_reference_warnings(per_case, known, source)
    warnings += unknown_value_warnings(per_case, known, source)
    if warnings and strict:
        raise EvaluationError("--strict: " + "\n  ".join(warnings)
                              + "\nFix the predictions (or references), or run without --strict to get the scores with warnings.")

    results = {
        "reference_folder": os.path.abspath(ref_folder),
        "prediction_folder": os.path.abspath(pred_folder),
        "labels": keys,
        "label_names": {k: names.get(k, k) for k in keys},
        "metric_keys": list(METRIC_KEYS),
        "num_cases": len(per_case),
        "missing_predictions": missing,
        "settings": {
            "lcc": bool(lcc),
            "lcc_connectivity": lcc_connectivity,
            "empty_convention": empty_convention,
            "surface_connectivity": surface_connectivity,
            "distance_library": _distance_library_version(),
            "units": "dice/jaccard: fraction in [0, 1]; *_voxel: voxels (no spacing, the papers' convention); "
                     "*_mm: image spacing units (mm)",
            "asd": "asd = MedPy binary.asd(pred, ref) (directed, the papers' ASD column); "
                   "assd = MedPy binary.assd (mean of the pooled surface distances of both directions)",
        },
        "per_case": per_case,
        "warnings": warnings,
    }
    results.update(aggregate(per_case, keys))
    if output_file is not None:
        write_outputs(results, output_file)
    return results


# ---------------------------------------------------------------------------------------------------- outputs
def _json_safe(obj):
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    return obj


def _atomic_write_text(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        from nnunetv2_semiseg.utilities.safe_io import apply_umask
        apply_umask(tmp, is_dir=False)  # mkstemp creates 0600; a plain open() would follow the umask
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def csv_rows(results: dict) -> List[List]:
    """Rows (header first): one per case and class, per case the class mean (``mean_fg``), then the means over
    cases (case ``mean``) per class and over classes."""
    columns = list(METRIC_KEYS)
    rows: List[List] = [["case", "label", "name"] + columns + ["n_ref", "n_pred"]]
    names = results["label_names"]
    for c in results["per_case"]:
        for key in results["labels"]:
            m = c["metrics"][key]
            rows.append([c["case"], key, names[key]] + [m[k] for k in columns] + [m["n_ref"], m["n_pred"]])
        rows.append([c["case"], "mean_fg", "mean over classes"] + [c["mean_foreground"][k] for k in columns]
                    + ["", ""])
    for key in results["labels"]:
        rows.append(["mean", key, names[key]] + [results["mean"][key][k] for k in columns] + ["", ""])
    rows.append(["mean", "mean_fg", "mean over classes"] + [results["foreground_mean"][k] for k in columns]
                + ["", ""])
    return rows


def write_outputs(results: dict, output_file: str) -> Tuple[str, str]:
    """Write ``output_file`` (JSON, NaN as null) and the CSV with the same stem; both atomically."""
    json_path = output_file
    csv_path = (output_file[:-5] if output_file.lower().endswith(".json") else output_file) + ".csv"
    _atomic_write_text(json_path, json.dumps(_json_safe(results), indent=2, allow_nan=False) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for row in csv_rows(results):
        writer.writerow(["nan" if isinstance(v, float) and math.isnan(v) else
                         (f"{v:.6g}" if isinstance(v, float) else v) for v in row])
    _atomic_write_text(csv_path, buf.getvalue())
    return json_path, csv_path


def format_markdown(results: dict) -> str:
    """Markdown table in the papers' layout: Dice (%), Jaccard (%), 95HD and ASD in voxels, then in mm."""
    def fmt(v, scale=1.0):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v * scale:.2f}"

    header = ("| class | Dice (%) | Jaccard (%) | 95HD (voxel) | ASD (voxel) | 95HD (mm) | ASD (mm) |\n"
              "|---|---|---|---|---|---|---|")
    lines = [header]
    undefined = results.get("undefined_labels", [])
    rows = [((f"{k} ({results['label_names'][k]})" if results["label_names"][k] != k else k)
             + (" not defined" if k in undefined else ""), results["mean"][k])
            for k in results["labels"]]
    if len(rows) > 1 or not rows:
        rows.append(("mean (foreground)", results["foreground_mean"]))
    for name, m in rows:
        lines.append(f"| {name} | {fmt(m['dice'], 100)} | {fmt(m['jaccard'], 100)} | {fmt(m['hd95_voxel'])} | "
                     f"{fmt(m['asd_voxel'])} | {fmt(m['hd95_mm'])} | {fmt(m['asd_mm'])} |")
    s = results["settings"]
    notes = [f"{results['num_cases']} cases; mean over cases per class"
             + ("; mean (foreground) = mean over classes" if len(rows) > 1 else "")
             + f"; LCC {'on' if s['lcc'] else 'off'}; empty masks: '{s['empty_convention']}' convention; "
               f"ASD = MedPy asd(pred, ref) ({s['distance_library']})."]
    excluded = [f"{k}: {n} case(s)" for k in results["labels"]
                for n in [results["excluded"][k]["hd95_voxel"]] if n]
    if excluded:
        notes.append("Distances undefined (exactly one mask empty) and excluded from the means: "
                     + ", ".join(excluded) + ".")
    if undefined:
        notes.append(f"Not defined: {', '.join(undefined)} (absent from every reference and every prediction; "
                     f"no score, left out of the mean over classes).")
    if results["missing_predictions"]:
        notes.append(f"--chill: {len(results['missing_predictions'])} reference case(s) without prediction were "
                     f"skipped.")
    return "\n".join(lines) + "\n\n" + "\n".join(notes)


# -------------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_semiseg_evaluate",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate predicted segmentations against reference labels with the metrics of the "
                    "semi-supervised segmentation literature: Dice and Jaccard, 95% Hausdorff distance (95HD) and "
                    "average surface distance (ASD), per case and class, mean over cases and over foreground "
                    "classes. Distances are given in voxels (the papers' convention: MedPy without spacing) and in "
                    "mm (from the image spacing). Writes JSON + CSV and prints a markdown table.",
        epilog="Conventions:\n"
               "  ASD is MedPy asd(pred, ref), the directed mean surface distance the papers report; the outputs\n"
               "  also contain the symmetric assd. 95HD = MedPy hd95 (95th percentile of both directions pooled).\n"
               "  Empty masks ('nan', default): both empty -> Dice 1, Jaccard 1, 95HD 0, ASD 0; exactly one empty\n"
               "  -> Dice 0, Jaccard 0, distances NaN, excluded from the means and counted ('excluded' in the\n"
               "  JSON, a note under the table). 'literature': an empty prediction scores 0 on all four metrics,\n"
               "  whatever the reference (UA-MT/SS-Net test scripts); an empty reference with a non-empty\n"
               "  prediction gives Dice 0 and NaN distances (the papers' scripts crash there).\n"
               "  --lcc keeps the largest connected component (26-connectivity in 3D) of each evaluated class of\n"
               "  the prediction, as the SS-Net/BCP LA protocol does.\n"
               "Files are matched by case ID (file name minus ending, e.g. .nii.gz); sizes must match and\n"
               "spacings agree within 1e-3 relative; mm values use the reference spacing.")
    parser.add_argument("-ref", required=True, help="folder with the reference label files (e.g. labelsTs)")
    parser.add_argument("-pred", required=True, help="folder with the predicted label files")
    parser.add_argument("-l", nargs="+", default=None, metavar="LABEL",
                        help="labels to evaluate, e.g. '-l 1 2 3'; regions as comma-separated labels, e.g. "
                             "'-l 1,2,3 2,3 3'. Default: from -dj, else every label > 0 found in the references")
    parser.add_argument("-dj", default=None, metavar="DATASET_JSON",
                        help="nnU-Net dataset.json: label names, regions and file ending")
    parser.add_argument("-o", default=None, metavar="OUT",
                        help="output JSON file (CSV written next to it with the same name), or a folder that "
                             f"receives {DEFAULT_OUTPUT_NAME}.json/.csv. Default: {DEFAULT_OUTPUT_NAME}.json/.csv "
                             "in the prediction folder")
    parser.add_argument("--lcc", action="store_true",
                        help="keep only the largest connected component of each class of the prediction "
                             "(SS-Net/BCP LA protocol)")
    parser.add_argument("--empty", choices=EMPTY_CONVENTIONS, default="nan",
                        help="convention for empty masks (see below); default: nan")
    parser.add_argument("--chill", action="store_true",
                        help="evaluate only the predicted cases when some reference cases have no prediction")
    parser.add_argument("-np", type=int, default=1, help="number of worker processes (default 1)")
    parser.add_argument("--strict", action="store_true",
                        help="fail (exit 2) instead of warning when a prediction (or, with -dj, a reference) holds values "
                             "that are no label, or "
                             "when prediction and reference differ in origin or direction")
    return parser


def resolve_output_file(out: Optional[str], pred_folder: str) -> str:
    if out is None:
        return os.path.join(pred_folder, DEFAULT_OUTPUT_NAME + ".json")
    if out.lower().endswith(".json"):
        return out
    return os.path.join(out, DEFAULT_OUTPUT_NAME + ".json")


def check_output_file(output_file: str) -> None:
    """The JSON/CSV outputs must be files that can be (re)written: not existing folders, not below a file."""
    csv_file = (output_file[:-5] if output_file.lower().endswith(".json") else output_file) + ".csv"
    for path in (output_file, csv_file):
        if os.path.isdir(path):
            raise EvaluationError(f"output {path} exists and is a folder; pass -o with a .json file name or a "
                                  f"folder (the outputs are then {DEFAULT_OUTPUT_NAME}.json/.csv inside it)")
    parent = os.path.dirname(os.path.abspath(output_file))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise EvaluationError(f"output {output_file} cannot be written: {parent} exists and is a file, not a "
                              f"folder; pass another -o")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    from nnunetv2_semiseg.utilities.cli import accept_underscore_spellings
    args = accept_underscore_spellings(parser).parse_args(argv)
    if args.np < 1:
        parser.error("-np must be >= 1")
    output_file = resolve_output_file(args.o, args.pred)
    try:
        check_output_file(output_file)
        results = evaluate_folders(args.ref, args.pred, labels=args.l, lcc=args.lcc, dataset_json=args.dj,
                                   empty_convention=args.empty, chill=args.chill, num_processes=args.np,
                                   output_file=output_file, strict=args.strict)
    except EvaluationError as e:
        print(f"nnUNetv2_semiseg_evaluate: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. no permission to write the outputs
        print(f"nnUNetv2_semiseg_evaluate: error: cannot write {output_file}: {e}", file=sys.stderr)
        return 2
    for warning in results["warnings"]:
        print(f"WARNING: {warning}", file=sys.stderr)
    print(format_markdown(results))
    csv_file = output_file[:-5] + ".csv"
    print(f"\nWrote {output_file} and {csv_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
