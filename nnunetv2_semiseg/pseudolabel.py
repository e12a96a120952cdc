"""``nnUNetv2_semiseg_pseudolabel``: the offline self-training baseline (train -> pseudo-label -> retrain).

A trained model predicts every case in ``imagesUnlabeled/`` of its dataset; the command writes a NEW raw dataset
``nnUNet_raw/DatasetNEW_<Name>PL`` whose training set is the labeled cases (real labels) plus the unlabeled ones
(their predictions as labels). Stock ``nnUNetv2_plan_and_preprocess`` and ``nnUNetv2_train`` take it as it is.
This is the self-training loop nnU-Net's maintainers recommend for unlabeled data, and the baseline our online
semi-supervised trainers have to beat.

Layout of the new dataset::

    imagesTr/  labeled images + unlabeled images (original names, CASE_0000<ending>)
    labelsTr/  real labels + pseudo labels
    imagesTs/ labelsTs/   copied when present (same test set as the source dataset)
    dataset.json          the source's, with numTraining updated (and no explicit 'dataset' file list)
    semiseg_pseudolabels.json   manifest: real vs pseudo-labeled cases, source dataset, model, folds, checkpoint, date

There is no ``imagesUnlabeled/``: every case is labeled now. Everything is written into a hidden temporary folder
in ``nnUNet_raw`` and renamed into place at the end, so a failed run leaves nothing behind; an existing dataset is
only replaced with ``--overwrite`` and only when this command wrote it.

Cross-validation: nnU-Net's default 5-fold split of the new dataset would put pseudo-labeled cases into
validation. Train the new dataset with fold ``all`` (as the semi-supervised papers do), or, after
``nnUNetv2_plan_and_preprocess -d NEW``, run ``nnUNetv2_semiseg_pseudolabel -o NEW --splits_real_only`` once:
it writes ``splits_final.json`` with only real-labeled cases in validation (the source dataset's folds when its
``splits_final.json`` exists, so the validation cases equal those of the supervised model).
"""
import argparse
import datetime
import json
import os
import re
import shutil
import sys
import uuid
from typing import Dict, List, Optional, Sequence, Union

from nnunetv2_semiseg.utilities.cli import accept_underscore_spellings, non_negative_int

MANIFEST_FILENAME = 'semiseg_pseudolabels.json'
UNLABELED_FOLDER = 'imagesUnlabeled'
COPIED_TEST_FOLDERS = ('imagesTs', 'labelsTs')
NAME_SUFFIX = 'PL'


class PseudoLabelError(RuntimeError):
    """Bad input for the pseudo-label command. The message names the file or case and the fix."""


# ----------------------------------------------------------------------------------------------------------------
# helpers

def _roots() -> Dict[str, Optional[str]]:
    return {k: os.environ.get(k) for k in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results')}


def _require_roots(*names: str) -> Dict[str, str]:
    roots = _roots()
    missing = [n for n in names if not roots[n]]
    if missing:
        raise PseudoLabelError(f"Environment variable(s) {', '.join(missing)} not set. Set nnUNet_raw, "
                               f"nnUNet_preprocessed and nnUNet_results (nnU-Net's documentation/setting_up_paths.md).")
    return roots


def _folders_with_id(dataset_id: int) -> List[str]:
    """Every ``DatasetXXX_*`` folder with this ID in nnUNet_raw/preprocessed/results (full paths)."""
    prefix = f'Dataset{dataset_id:03d}_'
    found = []
    for root in _roots().values():
        if root and os.path.isdir(root):
            found += [os.path.join(root, d) for d in sorted(os.listdir(root))
                      if d.startswith(prefix) and os.path.isdir(os.path.join(root, d))]
    return found


def _dataset_id_of(name: str) -> int:
    match = re.match(r'Dataset(\d+)_', name)
    if match is None:
        raise PseudoLabelError(f"'{name}' is not an nnU-Net dataset name (DatasetXXX_Name).")
    return int(match.group(1))


def _resolve_source(dataset_name_or_id) -> str:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    try:
        return str(maybe_convert_to_dataset_name(dataset_name_or_id))
    except (RuntimeError, ValueError) as e:
        raise PseudoLabelError(f"Source dataset '{dataset_name_or_id}' not found: {e}") from e


def _parse_folds(fold) -> List[Union[int, str]]:
    folds = [fold] if isinstance(fold, (int, str)) else list(fold)
    if not folds:
        raise PseudoLabelError('No fold given. Pass -f with one or more folds (0 1 2 3 4, or all).')
    parsed = []
    for f in folds:
        if str(f) == 'all':
            parsed.append('all')
        else:
            try:
                parsed.append(int(f))
            except ValueError:
                raise PseudoLabelError(f"Fold '{f}' is neither an integer nor 'all'.") from None
    return parsed


def _place_file(src: str, dst: str, hardlink: bool) -> None:
    if hardlink:
        try:
            os.link(src, dst)
            return
        except OSError:  # other file system, or links not supported: copy instead
            pass
    shutil.copy2(src, dst)


def _copy_tree(src: str, dst: str, hardlink: bool) -> None:
    shutil.copytree(src, dst, copy_function=lambda s, d: _place_file(s, d, hardlink))


def _json_dump(obj, path: str) -> None:
    with open(path, 'w') as f:
        json.dump(obj, f, indent=2)


def _load_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _train_command(source_id: int, configuration: str, fold, trainer: str, plans: str) -> str:
    return (f'nnUNetv2_train {source_id} {configuration} {fold} -tr {trainer}'
            + ('' if plans == 'nnUNetPlans' else f' -p {plans}'))


# ----------------------------------------------------------------------------------------------------------------
# checks

def _check_target(new_dataset_id: int, new_folder_name: str, source_id: int, overwrite: bool) -> Optional[str]:
    """Validate the target ID/name. Returns the existing raw target folder to be replaced (or None)."""
    if not isinstance(new_dataset_id, int) or not 1 <= new_dataset_id <= 999:
        raise PseudoLabelError(f'New dataset ID {new_dataset_id!r} is invalid: nnU-Net dataset IDs are integers '
                               f'1..999. Pass a free ID with -o.')
    if new_dataset_id == source_id:
        raise PseudoLabelError(f'The new dataset ID (-o {new_dataset_id}) equals the source dataset ID. The '
                               f'pseudo-labeled dataset is a new dataset: pass a free ID with -o.')
    raw_target = os.path.join(_roots()['nnUNet_raw'], new_folder_name)
    existing = _folders_with_id(new_dataset_id)
    others = [p for p in existing if os.path.basename(p) != new_folder_name]
    if others:
        raise PseudoLabelError(
            f"Dataset ID {new_dataset_id} is taken: {others[0]} exists"
            + (f' (and {len(others) - 1} more)' if len(others) > 1 else '')
            + f". nnU-Net would find two names for ID {new_dataset_id}. Choose another -o, or remove that folder "
              f"yourself if it is obsolete (--overwrite only replaces a dataset named {new_folder_name} "
              f"written by this command).")
    if os.path.exists(raw_target):
        if not overwrite:
            raise PseudoLabelError(f'{raw_target} already exists. Choose another -o, or pass --overwrite to '
                                   f'replace it.')
        if not os.path.isfile(os.path.join(raw_target, MANIFEST_FILENAME)):
            raise PseudoLabelError(f'{raw_target} exists and was not written by nnUNetv2_semiseg_pseudolabel (no '
                                   f'{MANIFEST_FILENAME}); --overwrite does not replace it. Choose another -o, or '
                                   f'remove the folder yourself.')
        return raw_target
    return None


def _default_model_folder(source_name: str, configuration: str, trainer: str, plans: str) -> str:
    from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier
    return os.path.join(_roots()['nnUNet_results'], source_name,
                        convert_trainer_plans_config_to_identifier(trainer, plans, configuration))


def _parse_model_folder(model_folder: str):
    """(training dataset ID or None, trainer, plans, configuration) from nnU-Net's model folder naming."""
    parts = os.path.basename(os.path.normpath(model_folder)).split('__')
    if len(parts) != 3:
        raise PseudoLabelError(f'-m {model_folder}: not an nnU-Net model folder name. Pass a folder named '
                               f'<Trainer>__<Plans>__<configuration> (inside nnUNet_results/DatasetXXX_Name/).')
    match = re.match(r'Dataset(\d+)_', os.path.basename(os.path.dirname(os.path.normpath(model_folder))))
    return (int(match.group(1)) if match else None), parts[0], parts[1], parts[2]


def _check_model(model_folder: str, explicit: bool, train_id, configuration: str, trainer: str, plans: str,
                 folds: List, checkpoint: str) -> str:
    """Check the model folder and every fold's checkpoint. ``train_id``: the dataset the model is trained on."""
    train_id = train_id if train_id is not None else 'DATASET'
    first_fold = folds[0]
    if not os.path.isdir(model_folder):
        if explicit:
            raise PseudoLabelError(f'Model folder {model_folder} (-m) not found. Train it first: '
                                   f'{_train_command(train_id, configuration, first_fold, trainer, plans)}')
        base = os.path.dirname(model_folder)
        available = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d))) \
            if os.path.isdir(base) else []
        hint = f' Trained models of {os.path.basename(base)}: {", ".join(available)}.' if available else ''
        raise PseudoLabelError(
            f'Model folder {model_folder} not found: no {trainer} model with plans {plans} and configuration '
            f'{configuration}. Train it first: {_train_command(train_id, configuration, first_fold, trainer, plans)}'
            f' (or pick the trained model with -tr/-p/-c, or -m).{hint}')
    for name in ('dataset.json', 'plans.json'):
        if not os.path.isfile(os.path.join(model_folder, name)):
            raise PseudoLabelError(f'{os.path.join(model_folder, name)} not found: {model_folder} is not a complete '
                                   f'nnU-Net model folder. Re-run the training: '
                                   f'{_train_command(train_id, configuration, first_fold, trainer, plans)}')
    for f in folds:
        path = os.path.join(model_folder, f'fold_{f}', checkpoint)
        if not os.path.isfile(path):
            fold_dir = os.path.dirname(path)
            present = sorted(c for c in os.listdir(fold_dir) if c.endswith('.pth')) if os.path.isdir(fold_dir) else []
            raise PseudoLabelError(
                f'Checkpoint {path} not found. Train fold {f}: '
                f'{_train_command(train_id, configuration, f, trainer, plans)} (add --c to finish an interrupted '
                f'run)' + (f', or pick one of the checkpoints present with -chk: {", ".join(present)}' if present
                           else '') + '.')
    return model_folder


def _collect_cases(raw_folder: str, dataset_json: dict, allow_test_ids: bool = False):
    """(labeled {id: {'images', 'label'}}, unlabeled {id: [channel files]}), checked for clashes and missing files,
    unlabeled IDs in imagesTs, truncated images and wrong dimensionality (as unlabeled preprocessing does)."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    from nnunetv2_semiseg.data.preprocess_unlabeled import (UnlabeledPreprocessingError, check_not_test_cases,
                                                            check_unlabeled_images, find_unlabeled_cases)

    unlabeled_folder = os.path.join(raw_folder, UNLABELED_FOLDER)
    ending = dataset_json['file_ending']
    if not os.path.isdir(unlabeled_folder):
        raise PseudoLabelError(f'{unlabeled_folder} does not exist: there is nothing to pseudo-label. Put the '
                               f'unlabeled images there (CASE_0000{ending}, named like imagesTr).')
    try:
        unlabeled = find_unlabeled_cases(raw_folder, dataset_json)
    except UnlabeledPreprocessingError as e:
        raise PseudoLabelError(str(e)) from e
    labeled = get_filenames_of_train_images_and_targets(raw_folder, dataset_json)
    if not labeled:
        raise PseudoLabelError(f'No labeled cases in {os.path.join(raw_folder, "imagesTr")}.')
    for case, entry in labeled.items():
        for path in entry['images'] + [entry['label']]:
            if not os.path.isfile(path):
                raise PseudoLabelError(f"Labeled case '{case}': {path} not found. Fix the source dataset "
                                       f"(nnUNetv2_plan_and_preprocess --verify_dataset_integrity names all problems).")
    clashes = sorted(set(unlabeled) & set(labeled))
    if clashes:
        raise PseudoLabelError(f'Unlabeled case ID(s) {clashes} in {unlabeled_folder} equal labeled case IDs: their '
                               f'pseudo-labels would replace real labels. Rename the unlabeled files.')
    check_not_test_cases(unlabeled, raw_folder, dataset_json, allow_test_ids, error=PseudoLabelError)
    for warning in check_unlabeled_images(unlabeled, raw_folder, dataset_json, error=PseudoLabelError):
        print(f'WARNING: {warning}', file=sys.stderr)
    return labeled, unlabeled


def _check_model_matches_raw(model_folder: str, raw_dataset_json_file: str, dataset_json: dict) -> None:
    model_json = _load_json(os.path.join(model_folder, 'dataset.json'))
    for key in ('labels', 'file_ending', 'regions_class_order'):
        if model_json.get(key) != dataset_json.get(key):
            raise PseudoLabelError(
                f"'{key}' differs between {os.path.join(model_folder, 'dataset.json')} ({model_json.get(key)!r}) "
                f"and {raw_dataset_json_file} ({dataset_json.get(key)!r}): the model's predictions would not be "
                f"labels of the raw dataset. Use a model trained on the current dataset.json (re-run planning, "
                f"preprocessing and training after editing it).")


def _torch_device(device):
    import torch
    if isinstance(device, torch.device):
        return device
    if device not in ('cuda', 'cpu', 'mps'):
        raise PseudoLabelError(f"-device must be cuda, cpu or mps, got '{device}'. Select the GPU with "
                               f"CUDA_VISIBLE_DEVICES, not with -device.")
    if device == 'cuda' and not torch.cuda.is_available():
        raise PseudoLabelError('-device cuda (the default) was requested but CUDA is not available. Pass '
                               '-device cpu (or mps on Apple silicon).')
    if device == 'mps' and not torch.backends.mps.is_available():
        raise PseudoLabelError('-device mps was requested but MPS is not available. Pass -device cpu.')
    return torch.device(device)


# ----------------------------------------------------------------------------------------------------------------
# main API

def make_pseudolabel_dataset(dataset_name_or_id, configuration: str, trainer: str,
                             fold: Union[int, str, Sequence[Union[int, str]]], new_dataset_id: int,
                             plans: str = 'nnUNetPlans', checkpoint: str = 'checkpoint_final.pth',
                             new_name: Optional[str] = None, device='cuda',
                             num_processes_preprocessing: int = 3, num_processes_segmentation_export: int = 3,
                             num_processes: Optional[int] = None, disable_tta: bool = False,
                             overwrite: bool = False, step_size: float = 0.5,
                             prev_stage_predictions: Optional[str] = None, hardlink: bool = False,
                             model_folder: Optional[str] = None, verbose: bool = True,
                             allow_test_ids: bool = False) -> str:
    """Predict ``imagesUnlabeled/`` of a dataset with a trained model and write a new raw dataset (labeled +
    pseudo-labeled). Returns the new raw dataset folder ``nnUNet_raw/Dataset{new_dataset_id:03d}_{name}``.

    ``fold``: one fold, ``'all'``, or several (ensembled like ``nnUNetv2_predict -f``). ``new_name`` defaults to the
    source name + ``PL``. ``num_processes`` (optional) sets both ``num_processes_preprocessing`` and
    ``num_processes_segmentation_export``; both 0 predicts sequentially in this process (no worker processes).
    ``model_folder``: predict with this trained model folder (``.../<Trainer>__<Plans>__<configuration>``, e.g. one
    trained on an earlier pseudo-labeled dataset, for a further self-training round) instead of the source dataset's
    model named by ``configuration``/``trainer``/``plans`` (which are then read from the folder name; pass None).
    ``hardlink`` hard-links labeled/test files instead of copying them (falls back to copying across file systems;
    note that a file edited in place then changes in both datasets). ``allow_test_ids`` accepts unlabeled cases
    whose IDs are test cases in ``imagesTs/`` (transductive use).
    """
    roots = _require_roots('nnUNet_raw', 'nnUNet_results')
    try:
        new_dataset_id = int(new_dataset_id)
    except (TypeError, ValueError):
        raise PseudoLabelError(f'New dataset ID {new_dataset_id!r} is not an integer. Pass a free ID with '
                               f'-o.') from None
    if num_processes is not None:
        num_processes_preprocessing = num_processes_segmentation_export = int(num_processes)
    for flag, value in (('-npp', num_processes_preprocessing), ('-nps', num_processes_segmentation_export)):
        if int(value) < 0:
            raise PseudoLabelError(f'{flag} {value}: process counts must be >= 0 (0 = predict in this process).')
    folds = _parse_folds(fold)

    source_name = _resolve_source(dataset_name_or_id)
    source_id = _dataset_id_of(source_name)
    short_name = source_name.split('_', 1)[1]
    name = new_name if new_name is not None else short_name + NAME_SUFFIX
    if not re.fullmatch(r'[A-Za-z0-9][A-Za-z0-9_\-]*', name):
        raise PseudoLabelError(f"--name '{name}' is not usable as a dataset name: use letters, digits, '_' and '-'.")
    new_folder_name = f'Dataset{new_dataset_id:03d}_{name}'
    replaced = _check_target(new_dataset_id, new_folder_name, source_id, overwrite)

    raw_folder = os.path.join(roots['nnUNet_raw'], source_name)
    dataset_json_file = os.path.join(raw_folder, 'dataset.json')
    if not os.path.isfile(dataset_json_file):
        raise PseudoLabelError(f'{dataset_json_file} not found: the source raw dataset is needed (its labeled '
                               f'images and labels go into the new dataset).')
    dataset_json = _load_json(dataset_json_file)
    if model_folder is not None:
        train_id, trainer, plans, configuration = _parse_model_folder(model_folder)
        model_folder = _check_model(model_folder, True, train_id, configuration, trainer, plans, folds, checkpoint)
    else:
        if not configuration or not trainer:
            raise PseudoLabelError('Name the trained model: configuration (-c) and trainer (-tr), or its folder (-m).')
        model_folder = _check_model(_default_model_folder(source_name, configuration, trainer, plans), False,
                                    source_id, configuration, trainer, plans, folds, checkpoint)
    _check_model_matches_raw(model_folder, dataset_json_file, dataset_json)
    from nnunetv2_semiseg.utilities import safe_io
    try:
        safe_io.check_output_location(os.path.join(roots['nnUNet_raw'], new_folder_name), [raw_folder, model_folder],
                                      what='new dataset folder')
    except safe_io.UnsafeOutputError as e:
        raise PseudoLabelError(f'{e} Pass another -o/--name.') from None
    labeled, unlabeled = _collect_cases(raw_folder, dataset_json, allow_test_ids)
    torch_device = _torch_device(device)
    ending = dataset_json['file_ending']

    def log(msg):
        if verbose:
            print(msg, flush=True)

    target = os.path.join(roots['nnUNet_raw'], new_folder_name)
    # Leftovers of killed runs for this dataset (their process is gone); a live run's folders are kept.
    try:
        safe_io.remove_stale_temp_dirs(roots['nnUNet_raw'], (f'.tmp_pseudolabel_{new_folder_name}_',
                                                             f'.old_pseudolabel_{new_folder_name}_'))
        tmp = safe_io.make_temp_dir(roots['nnUNet_raw'], f'.tmp_pseudolabel_{new_folder_name}_')
    except OSError as e:
        _raise_if_write_failure(e, target)
        raise
    try:
        images_tr, labels_tr = os.path.join(tmp, 'imagesTr'), os.path.join(tmp, 'labelsTr')
        os.makedirs(images_tr)
        os.makedirs(labels_tr)

        # 1) pseudo-labels: predict the unlabeled cases straight into the temporary dataset
        log(f'Predicting {len(unlabeled)} unlabeled case(s) of {source_name} with {model_folder} '
            f'(folds {", ".join(map(str, folds))}, {checkpoint}, TTA {"off" if disable_tta else "on"}, '
            f'device {torch_device.type})')
        prediction_folder = os.path.join(tmp, '.predictions')
        os.makedirs(prediction_folder)
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        predictor = nnUNetPredictor(tile_step_size=step_size, use_gaussian=True, use_mirroring=not disable_tta,
                                    perform_everything_on_device=torch_device.type == 'cuda', device=torch_device,
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=verbose)
        predictor.initialize_from_trained_model_folder(model_folder, folds, checkpoint_name=checkpoint)
        if predictor.configuration_manager.previous_stage_name is not None and prev_stage_predictions is None:
            raise PseudoLabelError(
                f"Configuration '{configuration}' is a cascade stage: it needs the previous stage's predictions of "
                f"the unlabeled cases. Predict {os.path.join(raw_folder, UNLABELED_FOLDER)} with the "
                f"'{predictor.configuration_manager.previous_stage_name}' model (nnUNetv2_predict) and pass that "
                f"folder with -prev_stage_predictions.")
        case_ids = sorted(unlabeled)
        inputs = [unlabeled[c] for c in case_ids]
        outputs = [os.path.join(prediction_folder, c) for c in case_ids]
        if num_processes_preprocessing == 0 and num_processes_segmentation_export == 0:
            predictor.predict_from_files_sequential(inputs, outputs, save_probabilities=False, overwrite=True,
                                                    folder_with_segs_from_prev_stage=prev_stage_predictions)
        else:
            predictor.predict_from_files(inputs, outputs, save_probabilities=False, overwrite=True,
                                         num_processes_preprocessing=max(1, num_processes_preprocessing),
                                         num_processes_segmentation_export=max(1, num_processes_segmentation_export),
                                         folder_with_segs_from_prev_stage=prev_stage_predictions)
        for c in case_ids:
            predicted = os.path.join(prediction_folder, c + ending)
            if not os.path.isfile(predicted):
                raise PseudoLabelError(f"The prediction of unlabeled case '{c}' ({predicted}) was not written; see "
                                       f"the predictor's output above.")
            os.replace(predicted, os.path.join(labels_tr, c + ending))
            for channel, image in enumerate(unlabeled[c]):
                _place_file(image, os.path.join(images_tr, f'{c}_{channel:04d}{ending}'), hardlink)
        shutil.rmtree(prediction_folder)

        # 2) labeled cases with their real labels, in the standard imagesTr/labelsTr layout
        log(f'{"Linking" if hardlink else "Copying"} {len(labeled)} labeled case(s)')
        for c in sorted(labeled):
            for channel, image in enumerate(labeled[c]['images']):
                _place_file(image, os.path.join(images_tr, f'{c}_{channel:04d}{ending}'), hardlink)
            _place_file(labeled[c]['label'], os.path.join(labels_tr, c + ending), hardlink)

        # 3) the test set stays the same
        test_cases = []
        for sub in COPIED_TEST_FOLDERS:
            if os.path.isdir(os.path.join(raw_folder, sub)):
                _copy_tree(os.path.join(raw_folder, sub), os.path.join(tmp, sub), hardlink)
        if os.path.isdir(os.path.join(tmp, 'imagesTs')):
            test_cases = sorted({f[:-len(ending) - 5] for f in os.listdir(os.path.join(tmp, 'imagesTs'))
                                 if f.endswith(ending)})

        # 4) dataset.json and manifest
        new_json = dict(dataset_json)
        new_json.pop('dataset', None)  # files are in the standard layout now
        new_json['numTraining'] = len(labeled) + len(unlabeled)
        new_json['name'] = name
        _json_dump(new_json, os.path.join(tmp, 'dataset.json'))
        manifest = {
            'created_by': 'nnUNetv2_semiseg_pseudolabel',
            'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
            'nnunetv2_version': _package_version('nnunetv2'),
            'nnunetv2_semiseg_version': _package_version('nnunetv2_semiseg'),
            'source_dataset': source_name,
            'source_raw_folder': os.path.abspath(raw_folder),
            'model_folder': os.path.abspath(model_folder),
            'trainer': trainer,
            'trainer_in_checkpoint': predictor.trainer_name,
            'plans': plans,
            'configuration': configuration,
            'folds': folds,
            'checkpoint': checkpoint,
            'tta': not disable_tta,
            'step_size': step_size,
            'num_real_labeled': len(labeled),
            'num_pseudo_labeled': len(unlabeled),
            'real_labeled_cases': sorted(labeled),
            'pseudo_labeled_cases': case_ids,
            'test_cases': test_cases,
        }
        _json_dump(manifest, os.path.join(tmp, MANIFEST_FILENAME))

        # 5) into place
        safe_io.finish_temp_dir(tmp)
        if replaced is not None:
            trash = os.path.join(roots['nnUNet_raw'], safe_io.owned_name(f'.old_pseudolabel_{new_folder_name}_'))
            os.replace(replaced, trash)
            os.replace(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and not isinstance(e, PseudoLabelError):
            _raise_if_write_failure(e, target)
        raise

    log(f'Wrote {target}: {len(labeled)} real-labeled + {len(unlabeled)} pseudo-labeled training cases'
        + (f', {len(test_cases)} test cases' if test_cases else '') + '.')
    if replaced is not None:
        raw_root = os.path.abspath(roots['nnUNet_raw'])
        for p in _folders_with_id(new_dataset_id):
            if os.path.dirname(os.path.abspath(p)) == raw_root:
                continue
            log(f'Note: {p} was made from the replaced dataset; re-run preprocessing/training of {new_dataset_id}.')
    log(f'Next: nnUNetv2_plan_and_preprocess -d {new_dataset_id} -c {configuration} --verify_dataset_integrity, '
        f'then nnUNetv2_train {new_dataset_id} {configuration} all (or --splits_real_only for folds 0-4; see '
        f'docs/self_training.md).')
    return target


def _raise_if_write_failure(error: Exception, target: str) -> None:
    # The predictor's writers and copies fail on a full or read-only disk with their own words; say which path.
    from nnunetv2_semiseg.utilities.write_errors import describe_write_failure, untouched_note
    message = describe_write_failure(error, target)
    if message:
        raise PseudoLabelError(message + untouched_note(target)) from None


def _package_version(name: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None


# ----------------------------------------------------------------------------------------------------------------
# splits with only real-labeled cases in validation

def write_real_only_splits(new_dataset_name_or_id, overwrite: bool = False, verbose: bool = True) -> str:
    """Write ``nnUNet_preprocessed/DatasetNEW/splits_final.json`` for a pseudo-labeled dataset: every fold validates
    on real-labeled cases only and trains on the other real cases plus all pseudo-labeled ones.

    The folds are the source dataset's (its ``nnUNet_preprocessed/.../splits_final.json``) when that exists and
    covers exactly the real-labeled cases, so each fold validates on the same cases as the supervised model;
    otherwise nnU-Net's own 5-fold split (seed 12345) of the real-labeled cases. Returns the splits file.
    """
    roots = _require_roots('nnUNet_raw', 'nnUNet_preprocessed')
    if isinstance(new_dataset_name_or_id, str) and new_dataset_name_or_id.startswith('Dataset'):
        raw_candidates = [os.path.join(roots['nnUNet_raw'], new_dataset_name_or_id)]
    else:
        try:
            new_id = int(new_dataset_name_or_id)
        except (TypeError, ValueError):
            raise PseudoLabelError(f'-o {new_dataset_name_or_id!r} is neither a dataset ID nor a name.') from None
        raw_root = os.path.abspath(roots['nnUNet_raw'])
        raw_candidates = [p for p in _folders_with_id(new_id) if os.path.dirname(os.path.abspath(p)) == raw_root]
    raw_candidates = [p for p in raw_candidates if os.path.isfile(os.path.join(p, MANIFEST_FILENAME))]
    if len(raw_candidates) != 1:
        raise PseudoLabelError(f'No pseudo-labeled raw dataset {new_dataset_name_or_id} (with {MANIFEST_FILENAME}) in '
                               f'{roots["nnUNet_raw"]}. Create it first: nnUNetv2_semiseg_pseudolabel -d SOURCE -c '
                               f'CONFIG -f FOLD -o {new_dataset_name_or_id}.')
    raw_folder = raw_candidates[0]
    name = os.path.basename(raw_folder)
    manifest = _load_json(os.path.join(raw_folder, MANIFEST_FILENAME))
    preprocessed = os.path.join(roots['nnUNet_preprocessed'], name)
    if not os.path.isdir(preprocessed):
        raise PseudoLabelError(f'{preprocessed} does not exist. Run nnUNetv2_plan_and_preprocess -d '
                               f'{_dataset_id_of(name)} first (it creates the folder the splits file goes into).')
    real, pseudo = list(manifest['real_labeled_cases']), list(manifest['pseudo_labeled_cases'])

    splits = None
    source_splits_file = os.path.join(roots['nnUNet_preprocessed'], manifest['source_dataset'], 'splits_final.json')
    if os.path.isfile(source_splits_file):
        source_splits = _load_json(source_splits_file)
        covers = all(sorted(s['train'] + s['val']) == sorted(real) for s in source_splits)
        if covers:
            splits = [{'train': sorted(s['train']) + sorted(pseudo), 'val': sorted(s['val'])} for s in source_splits]
            origin = f'the folds of {source_splits_file}'
        elif verbose:
            print(f'{source_splits_file} does not cover exactly the real-labeled cases of {name}; making a new split.')
    if splits is None:
        from nnunetv2.utilities.crossval_split import generate_crossval_split
        if len(real) < 5:
            raise PseudoLabelError(f'{name} has {len(real)} real-labeled case(s), fewer than the 5 folds of a '
                                   f'cross-validation. Train with fold all instead.')
        splits = [{'train': sorted(map(str, s['train'])) + sorted(pseudo), 'val': sorted(map(str, s['val']))}
                  for s in generate_crossval_split(sorted(real), seed=12345, n_splits=5)]
        origin = "nnU-Net's 5-fold split (seed 12345) of the real-labeled cases"

    out = os.path.join(preprocessed, 'splits_final.json')
    if os.path.isfile(out) and not overwrite:
        if _load_json(out) == splits:
            if verbose:
                print(f'{out} already holds these splits.')
            return out
        raise PseudoLabelError(f'{out} exists with different folds (nnU-Net writes one with pseudo-labeled cases in '
                               f'validation at the first training of a fold). Pass --overwrite to replace it; models '
                               f'already trained on folds 0-4 of {name} then no longer match the split.')
    tmp = out + f'.tmp_{uuid.uuid4().hex[:8]}'
    _json_dump(splits, tmp)
    os.replace(tmp, out)
    if verbose:
        print(f'Wrote {out}: {len(splits)} folds from {origin}; validation holds only real-labeled cases, the '
              f'{len(pseudo)} pseudo-labeled cases are in every training set.')
    return out


# ----------------------------------------------------------------------------------------------------------------
# CLI

def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name) or default)
    except ValueError:
        return default


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog='nnUNetv2_semiseg_pseudolabel',
        description='Offline self-training baseline: predict imagesUnlabeled/ of a dataset with a trained model and '
                    'write a new raw dataset (imagesTr/labelsTr = labeled cases with real labels + unlabeled cases '
                    'with pseudo labels; imagesTs/labelsTs copied; manifest semiseg_pseudolabels.json). Then run '
                    'stock nnUNetv2_plan_and_preprocess and nnUNetv2_train on it.',
        epilog='Folds: nnU-Net\'s default split of the new dataset would validate on pseudo-labeled cases. Train it '
               'with fold "all", or after nnUNetv2_plan_and_preprocess -d NEW run "nnUNetv2_semiseg_pseudolabel -o '
               'NEW --splits_real_only" to write splits_final.json with only real-labeled cases in validation. '
               'See docs/self_training.md.')
    parser.add_argument('-d', help='Source dataset (name or ID) whose imagesUnlabeled/ is pseudo-labeled')
    parser.add_argument('-c', help='Configuration of the trained model, e.g. 3d_fullres')
    parser.add_argument('-tr', default='nnUNetTrainer', help='Trainer of the trained model. Default: nnUNetTrainer')
    parser.add_argument('-p', default='nnUNetPlans', help='Plans identifier of the trained model. Default: nnUNetPlans')
    parser.add_argument('-f', nargs='+', help='Fold(s) of the trained model: 0 1 2 3 4 or all. Several folds are '
                                              'ensembled, like nnUNetv2_predict -f')
    parser.add_argument('-m', default=None,
                        help='Trained model folder (<Trainer>__<Plans>__<configuration>) to predict with instead of '
                             'the source dataset\'s model named by -tr/-p/-c, which it overrides. E.g. a model trained '
                             'on a pseudo-labeled dataset, for a further self-training round')
    parser.add_argument('-o', required=True, type=int, help='ID of the new (pseudo-labeled) dataset')
    parser.add_argument('--name', default=None, help=f'Name of the new dataset (DatasetNEW_<name>). Default: the '
                                                     f'source name + "{NAME_SUFFIX}"')
    parser.add_argument('-chk', default='checkpoint_final.pth', help='Checkpoint name. Default: checkpoint_final.pth')
    parser.add_argument('-device', default='cuda', help="cuda (default), cpu or mps. Select the GPU with "
                                                       "CUDA_VISIBLE_DEVICES")
    parser.add_argument('--disable_tta', action='store_true', help='Predict without mirroring (faster, less accurate)')
    parser.add_argument('-step_size', type=float, default=0.5, help='Sliding-window step size. Default: 0.5')
    parser.add_argument('-npp', type=non_negative_int, default=_env_int('nnUNet_npp', 3),
                        help='Processes for preprocessing during prediction. Default: 3 (env nnUNet_npp). '
                             '-npp 0 -nps 0 predicts in this process, without workers')
    parser.add_argument('-nps', type=non_negative_int, default=_env_int('nnUNet_nps', 3),
                        help='Processes for exporting the predictions. Default: 3 (env nnUNet_nps)')
    parser.add_argument('-prev_stage_predictions', default=None,
                        help='Cascade only: folder with the previous stage\'s predictions of the unlabeled cases')
    parser.add_argument('--hardlink', action='store_true',
                        help='Hard-link the labeled and test files instead of copying them (copies when linking is '
                             'impossible). Saves disk; a file edited in place then changes in both datasets')
    parser.add_argument('--allow_test_ids', action='store_true',
                        help='Accept unlabeled cases whose IDs are test cases in imagesTs (transductive use only: the '
                             'test scores are then not those of the standard protocol)')
    parser.add_argument('--overwrite', action='store_true',
                        help='Replace an existing DatasetNEW_<name> written by this command (with --splits_real_only: '
                             'replace an existing splits_final.json)')
    parser.add_argument('--splits_real_only', action='store_true',
                        help='Instead of creating the dataset: write '
                             'nnUNet_preprocessed/DatasetNEW_*/splits_final.json '
                             'with only real-labeled cases in validation (run after nnUNetv2_plan_and_preprocess -d '
                             'NEW). Needs only -o')
    args = accept_underscore_spellings(parser).parse_args(argv)

    try:
        if args.splits_real_only:
            if any(v is not None for v in (args.d, args.c, args.f, args.m)):
                parser.error('--splits_real_only only takes -o (and --overwrite); run it in a separate call after '
                             'nnUNetv2_plan_and_preprocess -d NEW.')
            write_real_only_splits(args.o, overwrite=args.overwrite)
            return
        missing = [flag for flag, value in (('-d', args.d), ('-c', args.c if args.m is None else '-m'), ('-f', args.f))
                   if value is None]
        if missing:
            parser.error(f'the following arguments are required: {", ".join(missing)}')
        if args.device == 'cpu':
            import multiprocessing
            import torch
            torch.set_num_threads(multiprocessing.cpu_count())
        elif args.device == 'cuda':
            import torch
            torch.set_num_threads(1)
            torch.set_num_interop_threads(1)
        make_pseudolabel_dataset(args.d, args.c, trainer=args.tr, fold=args.f, new_dataset_id=args.o, plans=args.p,
                                 checkpoint=args.chk, new_name=args.name, device=args.device,
                                 num_processes_preprocessing=args.npp, num_processes_segmentation_export=args.nps,
                                 disable_tta=args.disable_tta, overwrite=args.overwrite, step_size=args.step_size,
                                 prev_stage_predictions=args.prev_stage_predictions, hardlink=args.hardlink,
                                 model_folder=args.m, allow_test_ids=args.allow_test_ids)
    except PseudoLabelError as e:
        print(f'nnUNetv2_semiseg_pseudolabel: error: {e}', file=sys.stderr)
        sys.exit(1)


if __name__ == '__main__':
    main()
