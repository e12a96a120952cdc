"""``nnUNetv2_semiseg_preprocess_unlabeled``: preprocess ``imagesUnlabeled/`` with a dataset's existing plans.

Unlabeled images go through exactly the path the predictor uses for test images
(``DefaultPreprocessor.run_case`` with no segmentation: transpose, crop to nonzero, normalise with the plans'
statistics, resample). They are written to a sibling of the labeled folder,
``<nnUNet_preprocessed>/DatasetXXX/<data_identifier>_unlabeled/``, so they never enter fingerprinting, planning,
``class_locations``, the cross-validation split or validation, and survive a re-run of nnU-Net's preprocessing
(which deletes ``<data_identifier>/``).

Safety: every case is written into a temporary folder first; only when all cases succeeded is the old folder
(if any) swapped out for the new one. A record (``semiseg_unlabeled.json``) stores which plans produced the
folder; a later run with plans whose preprocessing differs refuses to overwrite it unless asked to.
"""
import argparse
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
from typing import Dict, List, Optional, Sequence

from tqdm import tqdm

from nnunetv2_semiseg.utilities.cli import accept_underscore_spellings, positive_int

RECORD_FILENAME = 'semiseg_unlabeled.json'
UNLABELED_RAW_FOLDER = 'imagesUnlabeled'


class UnlabeledPreprocessingError(RuntimeError):
    """Bad input for unlabeled preprocessing. The message names the file or case and the fix."""


def unlabeled_folder_name(data_identifier: str) -> str:
    return data_identifier + '_unlabeled'


def unlabeled_preprocessed_folder(dataset_name: str, data_identifier: str) -> str:
    from nnunetv2.paths import nnUNet_preprocessed
    return os.path.join(nnUNet_preprocessed, dataset_name, unlabeled_folder_name(data_identifier))


def preprocessing_settings(plans: dict, configuration: str) -> dict:
    """Everything in the plans that changes the preprocessed arrays of a configuration (JSON-serialisable).

    Architecture and batch size are left out on purpose: plans that only differ there (e.g. nnU-Net's ResEnc
    presets, which share the data_identifier) produce identical preprocessed data and may share the folder.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    cm = PlansManager(plans).get_configuration(configuration)
    relevant = {
        'data_identifier': cm.data_identifier,
        'preprocessor_name': cm.preprocessor_name,
        'spacing': list(map(float, cm.spacing)),
        'normalization_schemes': list(cm.normalization_schemes),
        'use_mask_for_norm': list(map(bool, cm.use_mask_for_norm)),
        'resampling_fn_data': cm.configuration.get('resampling_fn_data'),
        'resampling_fn_data_kwargs': cm.configuration.get('resampling_fn_data_kwargs'),
        'transpose_forward': list(plans.get('transpose_forward', [])),
        'foreground_intensity_properties_per_channel': plans.get('foreground_intensity_properties_per_channel'),
        'image_reader_writer': plans.get('image_reader_writer'),
    }
    return json.loads(json.dumps(relevant, default=str))


def preprocessing_fingerprint(plans: dict, configuration: str) -> str:
    """Hash of :func:`preprocessing_settings`: equal hashes mean identical preprocessed arrays."""
    blob = json.dumps(preprocessing_settings(plans, configuration), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def describe_differences(old: Optional[dict], new: dict) -> str:
    """'spacing [1, 1, 1] -> [3, 2, 2]; normalization_schemes ...' for the settings that differ."""
    if not old:
        return 'the record predates per-setting details, so what differs is unknown'
    parts = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a != b:
            shown_a, shown_b = json.dumps(a, default=str), json.dumps(b, default=str)
            if len(shown_a) + len(shown_b) > 160:  # e.g. intensity statistics: name the setting only
                parts.append(f'{key} (changed)')
            else:
                parts.append(f'{key} {shown_a} -> {shown_b}')
    return '; '.join(parts) if parts else 'nothing recorded differs'


def find_unlabeled_cases(raw_dataset_folder: str, dataset_json: dict) -> Dict[str, List[str]]:
    """Group ``imagesUnlabeled/`` files into cases, checking file ending and channel suffixes like ``imagesTr``."""
    folder = os.path.join(raw_dataset_folder, UNLABELED_RAW_FOLDER)
    if not os.path.isdir(folder):
        raise UnlabeledPreprocessingError(
            f"Unlabeled image folder {folder} does not exist. Put the unlabeled images there, named like imagesTr "
            f"(CASE_0000{dataset_json['file_ending']}, one file per channel).")
    file_ending = dataset_json['file_ending']
    num_channels = len(dataset_json.get('channel_names', dataset_json.get('modality', {})))
    pattern = re.compile(r'(.+)_(\d{4})' + re.escape(file_ending) + r'$')
    cases: Dict[str, Dict[int, str]] = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith('.') or os.path.isdir(path):
            continue
        if os.path.islink(path) and not os.path.exists(path):
            # Reading it would fail like a truncated file; the cause is a moved or unmounted target.
            target = os.readlink(path)
            resolved = os.path.normpath(os.path.join(folder, target))
            raise UnlabeledPreprocessingError(
                f"{path} is a broken symbolic link: it points to {target}"
                + (f" ({resolved})" if resolved != target else '')
                + ", which does not exist. Mount or restore the target, re-create the link, or remove it from "
                  f"{UNLABELED_RAW_FOLDER}/.")
        if not name.endswith(file_ending):
            raise UnlabeledPreprocessingError(
                f"{path}: file ending does not match the dataset's file_ending '{file_ending}' (dataset.json). "
                f"Convert it to {file_ending} or remove it from {UNLABELED_RAW_FOLDER}/.")
        match = pattern.match(name)
        if match is None:
            raise UnlabeledPreprocessingError(
                f"{path}: name lacks the 4-digit channel suffix. Rename it to CASE_0000{file_ending} "
                f"(same naming as imagesTr).")
        cases.setdefault(match.group(1), {})[int(match.group(2))] = path
    if not cases:
        raise UnlabeledPreprocessingError(
            f"Unlabeled image folder {folder} is empty. Add the unlabeled images (CASE_0000{file_ending}).")
    result = {}
    for case_id, channels in cases.items():
        if sorted(channels) != list(range(num_channels)):
            found = ', '.join(f'_{c:04d}' for c in sorted(channels))
            raise UnlabeledPreprocessingError(
                f"Unlabeled case '{case_id}' in {folder} has channels [{found}] but dataset.json declares "
                f"{num_channels} channel(s) (_0000 .. _{num_channels - 1:04d}). Provide exactly one file per channel.")
        result[case_id] = [channels[c] for c in range(num_channels)]
    return result


def labeled_case_ids(raw_dataset_folder: str, dataset_json: dict) -> set:
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    return set(get_filenames_of_train_images_and_targets(raw_dataset_folder, dataset_json).keys())


def test_case_ids(raw_dataset_folder: str, dataset_json: dict) -> set:
    """Case IDs in ``imagesTs/`` (files CASE_XXXX<file_ending>)."""
    folder = os.path.join(raw_dataset_folder, 'imagesTs')
    if not os.path.isdir(folder):
        return set()
    pattern = re.compile(r'(.+)_\d{4}' + re.escape(dataset_json['file_ending']) + r'$')
    return {m.group(1) for m in map(pattern.match, os.listdir(folder)) if m}


def check_not_test_cases(cases, raw_dataset_folder: str, dataset_json: dict, allow_test_ids: bool,
                         error=None) -> None:
    """Unlabeled IDs that are also in imagesTs: training on test images breaks the evaluation protocol."""
    error = error or UnlabeledPreprocessingError
    in_test = sorted(set(cases) & test_case_ids(raw_dataset_folder, dataset_json))
    if in_test and not allow_test_ids:
        raise error(
            f"Unlabeled case ID(s) {in_test} in {os.path.join(raw_dataset_folder, UNLABELED_RAW_FOLDER)} are also "
            f"test cases in imagesTs: training on test images makes the test scores meaningless. Remove them from "
            f"{UNLABELED_RAW_FOLDER}/, or pass --allow_test_ids if you deliberately train transductively on the "
            f"test images (then say so next to the scores).")


def _first_channel_labeled_images(raw_dataset_folder: str, dataset_json: dict) -> List[str]:
    """The _0000 file of every labeled case (nnU-Net's own lister forks a 12-process pool for this)."""
    if 'dataset' in dataset_json:  # explicit file list in dataset.json
        from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
        return [e['images'][0] for e in get_filenames_of_train_images_and_targets(raw_dataset_folder,
                                                                                  dataset_json).values()]
    folder = os.path.join(raw_dataset_folder, 'imagesTr')
    suffix = '_0000' + dataset_json['file_ending']
    return [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(suffix)]


def _geometry(path: str):
    import SimpleITK as sitk
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return reader.GetDimension(), tuple(reader.GetSpacing()), tuple(reader.GetDirection())


def _axis_code(direction, dimension: int) -> str:
    """Orientation as the axis letters of the direction cosines (e.g. 'LPS'); nearest axis per column."""
    import numpy as np
    if dimension > 3:  # no anatomical letters beyond three axes
        return 'x'.join(str(round(d, 3)) for d in direction)
    matrix = np.asarray(direction, dtype=float).reshape(dimension, dimension)
    letters = ('LR', 'PA', 'SI')[:dimension]  # DICOM convention: identity = LPS
    code = ''
    for column in matrix.T:
        axis = int(np.argmax(np.abs(column)))
        code += letters[axis][0] if column[axis] > 0 else letters[axis][1]
    return code


# A spacing counts as far from the labeled cases' when it lies outside [smallest / 2, largest * 2] on some axis:
# loose enough for the usual scanner-to-scanner spread, tight enough for a wrong header (the 80x of issue 13).
SPACING_FACTOR = 2.0


def count_non_finite_array(voxels) -> Optional[tuple]:
    """(NaN count, +-Inf count, total voxels) of an array; None for integer arrays (always finite)."""
    import numpy as np
    voxels = np.asarray(voxels)
    if not np.issubdtype(voxels.dtype, np.floating):
        return None
    return int(np.count_nonzero(np.isnan(voxels))), int(np.count_nonzero(np.isinf(voxels))), int(voxels.size)


def count_non_finite_voxels(path: str) -> Optional[tuple]:
    """(NaN count, +-Inf count, total voxels) of an image file; None for integer pixel types (always finite)."""
    import SimpleITK as sitk
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    if 'float' not in sitk.GetPixelIDValueAsString(reader.GetPixelID()):
        return None
    image = reader.Execute()  # kept referenced: the array view below borrows its buffer
    return count_non_finite_array(sitk.GetArrayViewFromImage(image))


def check_finite_voxels(case_id: str, path: str, error=None) -> None:
    """NaN / Inf voxels (kept by .mha / .nrrd readers; NIfTI readers turn NaN into 0) would make the normalised
    case all-NaN and the training loss NaN: refuse the file, naming the case and the counts."""
    error = error or UnlabeledPreprocessingError
    try:
        counts = count_non_finite_voxels(path)
    except RuntimeError:
        return  # unreadable: reported by name by the reader checks
    if counts is None or counts[0] + counts[1] == 0:
        return
    nan, inf, total = counts
    raise error(
        f"Unlabeled case '{case_id}': {path} holds {nan + inf} non-finite voxel(s) of {total} ({nan} NaN, {inf} "
        f"Inf). Normalisation would turn the whole case into NaN and training would diverge. Replace them in the "
        f"source image (e.g. with the background value) or remove the case from {UNLABELED_RAW_FOLDER}/.")


def check_scalar_image(case_id: str, path: str, num_channels: int, error=None) -> None:
    """One component per voxel: nnU-Net reads one file per channel, and a vector (e.g. RGB) image ends in an
    IndexError deep inside its reader. Refuse it naming the file and the component count."""
    import SimpleITK as sitk
    error = error or UnlabeledPreprocessingError
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return  # unreadable: reported by name by the reader checks
    components = reader.GetNumberOfComponents()
    if components > 1:
        raise error(
            f"Unlabeled case '{case_id}': {path} has {components} components per voxel (a vector/RGB image), but "
            f"nnU-Net expects one scalar image per channel and this dataset has {num_channels} channel(s). Save each "
            f"component as its own channel file if it is one (CASE_0000, CASE_0001, ... and the same channels in "
            f"dataset.json), or convert the image to a single component (e.g. grey values), or remove it from "
            f"{UNLABELED_RAW_FOLDER}/.")


def check_unlabeled_images(cases: Dict[str, List[str]], raw_dataset_folder: str, dataset_json: dict,
                           error=None) -> List[str]:
    """File-level checks of every unlabeled image before any is used. Returns warnings (naming the case).

    Errors: a truncated or corrupt NIfTI file (SimpleITK would fill the missing part with zeros), NaN / Inf
    voxels, and an image
    whose dimensionality differs from the labeled images' (a 2D image in a 3D dataset becomes a volume of 999 mm
    slices). Warnings, as nnU-Net's ``--verify_dataset_integrity`` compares geometry: a spacing far from the
    labeled cases' and an orientation that no labeled case has.
    """
    from nnunetv2_semiseg.utilities.safe_io import CorruptImageError, check_image_file
    error = error or UnlabeledPreprocessingError
    for case_id, files in cases.items():
        for path in files:
            try:
                check_image_file(path)
            except CorruptImageError as e:
                raise error(f"Unlabeled case '{case_id}': {e} Or remove it from {UNLABELED_RAW_FOLDER}/.") from None
    for case_id, files in cases.items():
        for path in files:
            check_scalar_image(case_id, path, len(files), error)
    for case_id, files in cases.items():
        for path in files:
            check_finite_voxels(case_id, path, error)
    reference = []
    for path in _first_channel_labeled_images(raw_dataset_folder, dataset_json):
        try:
            reference.append(_geometry(path))
        except RuntimeError:
            continue  # nnU-Net's own planning has read these; an odd one is not ours to report here
    if not reference:
        return []
    dims = {r[0] for r in reference}
    spacings = [r[1] for r in reference if r[0] == max(dims)]
    codes = {_axis_code(r[2], r[0]) for r in reference}
    warnings = []
    for case_id, files in cases.items():
        try:
            dim, spacing, direction = _geometry(files[0])
        except RuntimeError:
            continue  # unreadable: the reader in the worker reports it by name
        if dim not in dims:
            raise error(
                f"Unlabeled case '{case_id}': {files[0]} is a {dim}D image but the labeled images in imagesTr are "
                f"{'/'.join(map(str, sorted(dims)))}D. nnU-Net would turn it into a wrong volume (a 2D image in a 3D "
                f"dataset becomes slices 999 mm apart). Remove it from {UNLABELED_RAW_FOLDER}/ or convert it.")
        far = [axis for axis in range(dim)
               if not (min(s[axis] for s in spacings) / SPACING_FACTOR <= spacing[axis]
                       <= max(s[axis] for s in spacings) * SPACING_FACTOR)]
        if far:
            low = tuple(round(min(s[a] for s in spacings), 4) for a in range(dim))
            high = tuple(round(max(s[a] for s in spacings), 4) for a in range(dim))
            warnings.append(f"Unlabeled case '{case_id}': spacing (x, y, z) {tuple(round(v, 4) for v in spacing)} "
                            f"of {files[0]} is far from the labeled cases' ({low} .. {high}); it will be resampled "
                            f"to the plans' spacing. Check its header if this is not intended.")
        code = _axis_code(direction, dim)
        if code not in codes:
            warnings.append(f"Unlabeled case '{case_id}': orientation {code} of {files[0]} differs from every "
                            f"labeled case's ({', '.join(sorted(codes))}). nnU-Net does not reorient images; check "
                            f"that it shows the same anatomy the same way.")
    return warnings


def _preprocess_one(args) -> str:
    """Worker: preprocess one case into the temporary folder. Returns the case id."""
    case_id, image_files, out_folder, plans, configuration, dataset_json = args
    from batchgenerators.utilities.file_and_folder_operations import load_pickle, write_pickle
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    preprocessor = cm.preprocessor_class(verbose=False)
    # Read first on our own so that an unreadable or inconsistent file is reported by name.
    try:
        pm.image_reader_writer_class().read_images(image_files)
    except Exception as e:  # reader errors come in many types (RuntimeError, AssertionError, OSError...)
        raise UnlabeledPreprocessingError(
            f"Unlabeled case '{case_id}': could not read {image_files}: {type(e).__name__}: {e}. Check that the "
            f"files are valid images and that all channels of the case share shape, spacing and orientation.") from e
    truncated = os.path.join(out_folder, case_id)
    preprocessor.run_case_save(truncated, image_files, None, pm, cm, dataset_json)
    # nnUNetDataLoader reads class_locations for every sample, even when it is not used.
    properties = load_pickle(truncated + '.pkl')
    properties.setdefault('class_locations', {})
    write_pickle(properties, truncated + '.pkl')
    return case_id


def read_record(folder: str) -> Optional[dict]:
    path = os.path.join(folder, RECORD_FILENAME)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def raw_unlabeled_case_ids(raw_dataset_folder: str, file_ending: str) -> Optional[set]:
    """Case IDs of the ``CASE_XXXX<file_ending>`` files in ``imagesUnlabeled/`` (None if the folder is absent).
    Lenient on purpose: misnamed files are the preprocessing command's to report, not training's."""
    folder = os.path.join(raw_dataset_folder, UNLABELED_RAW_FOLDER)
    if not os.path.isdir(folder):
        return None
    pattern = re.compile(r'(.+)_\d{4}' + re.escape(file_ending) + r'$')
    return {m.group(1) for m in map(pattern.match, os.listdir(folder)) if m}


def _first_names(ids, limit: int = 8) -> str:
    ids = sorted(ids)
    shown = ', '.join(ids[:limit])
    return shown + (f' ... ({len(ids) - limit} more)' if len(ids) > limit else '')


def unlabeled_set_mismatch(preprocessed_folder: str, raw_dataset_folder: str, file_ending: str,
                           command: str) -> Optional[str]:
    """One-line warning when ``imagesUnlabeled/`` holds other cases than the preprocessed folder (images added or
    removed after ``nnUNetv2_semiseg_preprocess_unlabeled``): training would silently use the old set. None when
    they match, or when either side cannot be compared (raw folder not on this machine, record without IDs)."""
    record = read_record(preprocessed_folder)
    if not record or 'case_ids' not in record:
        return None
    raw_ids = raw_unlabeled_case_ids(raw_dataset_folder, file_ending)
    if raw_ids is None:
        return None
    preprocessed_ids = set(record['case_ids'])
    not_preprocessed, removed = raw_ids - preprocessed_ids, preprocessed_ids - raw_ids
    if not not_preprocessed and not removed:
        return None
    parts = []
    if not_preprocessed:
        parts.append(f'{len(not_preprocessed)} case(s) in imagesUnlabeled/ are not preprocessed '
                     f'({_first_names(not_preprocessed)})')
    if removed:
        parts.append(f'{len(removed)} preprocessed case(s) are no longer in imagesUnlabeled/ '
                     f'({_first_names(removed)})')
    return (f"{os.path.join(raw_dataset_folder, UNLABELED_RAW_FOLDER)} changed since {preprocessed_folder} was "
            f"preprocessed ({record.get('created', 'date unknown')}): {'; '.join(parts)}. This training uses the "
            f"preprocessed set as it is; to train on the current images, stop and re-run: {command}")


TEMP_INFIX, OLD_INFIX = '.tmp_', '.old_'


def known_datasets() -> List[str]:
    """DatasetXXX_Name folders in nnUNet_raw and nnUNet_preprocessed (for the 'not found' message)."""
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    names = set()
    for root in (nnUNet_raw, nnUNet_preprocessed):
        if root and os.path.isdir(root):
            names.update(d for d in os.listdir(root) if re.match(r'Dataset\d{3}_', d))
    return sorted(names)


def resolve_dataset_name(dataset_name_or_id) -> str:
    """nnU-Net's ``maybe_convert_to_dataset_name`` with a one-line error (it raises a multi-line RuntimeError or a
    ValueError, and the command showed a traceback)."""
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    try:
        name = str(maybe_convert_to_dataset_name(dataset_name_or_id))
    except (RuntimeError, ValueError):
        name = None
    # nnU-Net returns a DatasetXXX_Name unchecked: it must exist somewhere too.
    if name is None or not any(os.path.isdir(os.path.join(root, name)) for root in (nnUNet_raw, nnUNet_preprocessed)
                               if root):
        available = known_datasets()
        raise UnlabeledPreprocessingError(
            f"Dataset '{dataset_name_or_id}' not found in nnUNet_raw ({nnUNet_raw}) or nnUNet_preprocessed "
            f"({nnUNet_preprocessed}). Pass -d with a dataset ID or a DatasetXXX_Name "
            + (f"(present: {', '.join(available)})" if available else '(none is present there)')
            + ", or set nnUNet_raw / nnUNet_preprocessed to the folders that hold it.")
    return name


def preprocess_unlabeled(dataset_name_or_id, configuration: str, plans_name: str = 'nnUNetPlans',
                         num_processes: int = 1, overwrite_other_plans: bool = False, verbose: bool = True,
                         allow_test_ids: bool = False) -> str:
    """Preprocess ``imagesUnlabeled/`` of one dataset for one configuration. Returns the output folder.

    ``allow_test_ids``: accept unlabeled cases whose IDs are test cases in ``imagesTs/`` (transductive use).
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw

    if not isinstance(num_processes, int) or num_processes < 1:
        raise UnlabeledPreprocessingError(f'num_processes (-np) must be an integer >= 1, got {num_processes!r}.')
    if not nnUNet_raw or not nnUNet_preprocessed:
        raise UnlabeledPreprocessingError('nnUNet_raw and nnUNet_preprocessed must be set (see nnU-Net\'s '
                                          'documentation on setting up paths).')
    dataset_name = resolve_dataset_name(dataset_name_or_id)
    preprocessed_base = os.path.join(nnUNet_preprocessed, dataset_name)
    plans_file = os.path.join(preprocessed_base, plans_name + '.json')
    if not os.path.isfile(plans_file):
        raise UnlabeledPreprocessingError(
            f"Plans file {plans_file} not found. Run planning first: nnUNetv2_plan_and_preprocess -d "
            f"{dataset_name_or_id} (or nnUNetv2_plan_experiment with -overwrite_plans_name {plans_name}).")
    plans = load_json(plans_file)
    if configuration not in plans['configurations']:
        raise UnlabeledPreprocessingError(
            f"Configuration '{configuration}' is not in {plans_file} (available: "
            f"{', '.join(plans['configurations'])}).")
    dataset_json_file = os.path.join(preprocessed_base, 'dataset.json')
    if not os.path.isfile(dataset_json_file):
        raise UnlabeledPreprocessingError(f"{dataset_json_file} not found. Run nnUNetv2_plan_and_preprocess -d "
                                          f"{dataset_name_or_id} first.")
    dataset_json = load_json(dataset_json_file)
    raw_folder = os.path.join(nnUNet_raw, dataset_name)

    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    data_identifier = PlansManager(plans).get_configuration(configuration).data_identifier
    out_folder = os.path.join(preprocessed_base, unlabeled_folder_name(data_identifier))
    fingerprint = preprocessing_fingerprint(plans, configuration)
    settings = preprocessing_settings(plans, configuration)
    from nnunetv2_semiseg.utilities import safe_io
    try:
        safe_io.check_output_location(out_folder, [raw_folder], what='unlabeled output folder')
    except safe_io.UnsafeOutputError as e:
        raise UnlabeledPreprocessingError(f'{e} (set nnUNet_preprocessed outside nnUNet_raw).') from None

    existing = read_record(out_folder) if os.path.isdir(out_folder) else None
    if os.path.lexists(out_folder) and existing is None:
        # --overwrite replaces only what this command wrote.
        raise UnlabeledPreprocessingError(
            f"{out_folder} exists but has no {RECORD_FILENAME}, so it was not written by this command; it is not "
            f"replaced, even with --overwrite. Move or delete it yourself if it is obsolete.")
    if existing is not None and not overwrite_other_plans and existing.get('preprocessing_fingerprint') != fingerprint:
        raise UnlabeledPreprocessingError(
            f"{out_folder} already exists and was made with plans '{existing.get('plans_name')}', configuration "
            f"'{existing.get('configuration')}', whose preprocessing differs from plans '{plans_name}', "
            f"configuration '{configuration}': {describe_differences(existing.get('preprocessing'), settings)}. "
            f"Delete that folder, or pass --overwrite to replace it (models trained on it will then see "
            f"differently preprocessed data).")

    cases = find_unlabeled_cases(raw_folder, dataset_json)
    clashes = sorted(set(cases) & labeled_case_ids(raw_folder, dataset_json))
    if clashes:
        raise UnlabeledPreprocessingError(
            f"Unlabeled case ID(s) {clashes} in {os.path.join(raw_folder, UNLABELED_RAW_FOLDER)} equal labeled case "
            f"IDs in imagesTr. Rename the unlabeled files (or remove labeled cases from {UNLABELED_RAW_FOLDER}/): "
            f"the same ID in both would let a labeled case be used as unlabeled.")
    check_not_test_cases(cases, raw_folder, dataset_json, allow_test_ids)
    for warning in check_unlabeled_images(cases, raw_folder, dataset_json):
        print(f'WARNING: {warning}', file=sys.stderr)

    # Leftovers of killed runs (their owner process is dead); a live run's folders are kept.
    base_name = os.path.basename(out_folder)
    try:
        safe_io.remove_stale_temp_dirs(preprocessed_base, (base_name + TEMP_INFIX, base_name + OLD_INFIX))
        tmp_folder = safe_io.make_temp_dir(preprocessed_base, base_name + TEMP_INFIX)
    except OSError as e:
        _raise_if_write_failure(e, out_folder)
        raise
    try:
        jobs = [(cid, files, tmp_folder, plans, configuration, dataset_json) for cid, files in cases.items()]
        progress = dict(desc=f'Unlabeled {dataset_name} {configuration}', total=len(jobs), disable=not verbose)
        if num_processes <= 1:
            for job in tqdm(jobs, **progress):
                _preprocess_one(job)
        else:
            with multiprocessing.get_context('spawn').Pool(num_processes,
                                                           initializer=safe_io.exit_with_parent,
                                                           initargs=(os.getpid(),)) as pool:
                for _ in tqdm(pool.imap_unordered(_preprocess_one, jobs), **progress):
                    pass
        import nnunetv2
        record = {'dataset': dataset_name, 'plans_name': plans_name, 'configuration': configuration,
                  'data_identifier': data_identifier, 'preprocessing_fingerprint': fingerprint,
                  'preprocessing': settings,
                  'plans_file': plans_file, 'case_ids': sorted(cases),
                  'nnunetv2_version': getattr(nnunetv2, '__version__', 'unknown'),
                  'created': time.strftime('%Y-%m-%d %H:%M:%S')}
        with open(os.path.join(tmp_folder, RECORD_FILENAME), 'w') as f:
            json.dump(record, f, indent=2)
        safe_io.finish_temp_dir(tmp_folder)
        # Swap: the old folder stays intact until the new one is complete.
        if os.path.isdir(out_folder):
            old = os.path.join(preprocessed_base, safe_io.owned_name(base_name + OLD_INFIX))
            os.replace(out_folder, old)
            os.replace(tmp_folder, out_folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_folder, out_folder)
    except BaseException as e:
        shutil.rmtree(tmp_folder, ignore_errors=True)
        if isinstance(e, Exception) and not isinstance(e, UnlabeledPreprocessingError):
            _raise_if_write_failure(e, out_folder)
        raise
    if verbose:
        print(f'Wrote {len(cases)} unlabeled case(s) to {out_folder}')
    return out_folder


def _raise_if_write_failure(error: Exception, out_folder: str) -> None:
    # blosc2 on a full disk says 'Error while creating the NDArray': name the folder and the cause instead.
    from nnunetv2_semiseg.utilities.write_errors import describe_write_failure, untouched_note
    message = describe_write_failure(error, out_folder)
    if message:
        raise UnlabeledPreprocessingError(message + untouched_note(out_folder)) from None


def main(argv: Optional[Sequence[str]] = None) -> None:
    from nnunetv2.configuration import default_num_processes
    parser = argparse.ArgumentParser(
        prog='nnUNetv2_semiseg_preprocess_unlabeled',
        description='Preprocess nnUNet_raw/DatasetXXX/imagesUnlabeled with the dataset\'s existing plans into '
                    'nnUNet_preprocessed/DatasetXXX/<data_identifier>_unlabeled (needed by the semi-supervised '
                    'trainers). Run nnUNetv2_plan_and_preprocess first.')
    parser.add_argument('-d', nargs='+', required=True, help='Dataset name(s) or ID(s)')
    parser.add_argument('-c', nargs='+', default=['3d_fullres'],
                        help='Configuration(s), e.g. 2d 3d_fullres. Default: 3d_fullres')
    parser.add_argument('-plans_name', default='nnUNetPlans', help='Plans identifier. Default: nnUNetPlans')
    parser.add_argument('-np', type=positive_int, default=None,
                        help=f'Number of processes. Default: nnUNet_def_n_proc ({default_num_processes})')
    parser.add_argument('--overwrite', action='store_true',
                        help='Replace an existing unlabeled folder made with plans whose preprocessing differs')
    parser.add_argument('--allow_test_ids', action='store_true',
                        help='accept unlabeled cases whose IDs are test cases in imagesTs (transductive use only: '
                             'the test scores are then not those of the standard protocol)')
    parser.add_argument('--verbose', action='store_true', help='unused, kept for nnU-Net CLI symmetry')
    args = accept_underscore_spellings(parser).parse_args(argv)
    num_processes = default_num_processes if args.np is None else args.np
    try:
        for d in args.d:
            for c in args.c:
                preprocess_unlabeled(d, c, args.plans_name, num_processes, args.overwrite,
                                     allow_test_ids=args.allow_test_ids)
    except UnlabeledPreprocessingError as e:
        print(f'ERROR: {e}', file=sys.stderr)
        sys.exit(1)


if __name__ == '__main__':
    main()
