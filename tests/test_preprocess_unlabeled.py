"""``nnUNetv2_semiseg_preprocess_unlabeled``: output, record, re-runs, and every promised error."""
import json
import os
import re
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_semiseg.data.preprocess_unlabeled import (RECORD_FILENAME, UnlabeledPreprocessingError,
                                                        preprocess_unlabeled)
from nnunetv2_semiseg.demo.pipeline import StepFailed

CFG = '3d_fullres'


@pytest.fixture
def ws(workspace, monkeypatch):
    workspace.set_process_env(monkeypatch)
    return workspace


def _unlabeled_folder(ws, cfg=CFG):
    return os.path.join(ws.preprocessed, f'{ws.plans}_{cfg}_unlabeled')


def _snapshot(folder):
    return {f: os.path.getmtime(os.path.join(folder, f)) for f in sorted(os.listdir(folder))}


def _no_temp_leftovers(ws):
    return [f for f in os.listdir(ws.preprocessed) if '.tmp_' in f or '.old_' in f] == []


def test_output_record_and_no_unlabeled_case_in_labeled_data(ws):
    folder = _unlabeled_folder(ws)
    cases = sorted(f[:-5] for f in os.listdir(folder) if f.endswith('.b2nd') and not f.endswith('_seg.b2nd'))
    assert cases == ['unl_000', 'unl_001', 'unl_002', 'unl_003']
    record = json.load(open(os.path.join(folder, RECORD_FILENAME)))
    assert record['plans_name'] == ws.plans and record['configuration'] == CFG
    assert record['case_ids'] == cases
    from batchgenerators.utilities.file_and_folder_operations import load_pickle
    assert load_pickle(os.path.join(folder, 'unl_000.pkl'))['class_locations'] == {}
    # Unlabeled cases never enter the labeled preprocessed data, gt_segmentations or the fingerprint.
    labeled = os.listdir(os.path.join(ws.preprocessed, f'{ws.plans}_{CFG}'))
    assert not any(f.startswith('unl_') for f in labeled)
    assert not any(f.startswith('unl_') for f in os.listdir(os.path.join(ws.preprocessed, 'gt_segmentations')))
    # Same normalisation as the predictor path: z-scored data (MRI channel) with finite values.
    import blosc2
    data = blosc2.open(os.path.join(folder, 'unl_000.b2nd'), mode='r')[:]
    assert data.shape[0] == 1 and np.isfinite(data).all() and abs(float(data.mean())) < 0.5


def test_rerun_is_safe_and_replaces_atomically(ws):
    folder = _unlabeled_folder(ws)
    preprocess_unlabeled(ws.dataset_id, CFG, ws.plans, num_processes=1, verbose=False)
    preprocess_unlabeled(ws.dataset_id, CFG, ws.plans, num_processes=2, verbose=False)  # spawn pool path
    assert json.load(open(os.path.join(folder, RECORD_FILENAME)))['case_ids'] == [f'unl_{i:03d}' for i in range(4)]
    assert _no_temp_leftovers(ws)


def test_cli_exit_code_and_message(ws):
    shutil.rmtree(os.path.join(ws.raw, 'imagesUnlabeled'))
    with pytest.raises(StepFailed, match='imagesUnlabeled does not exist'):
        ws.run('nnUNetv2_semiseg_preprocess_unlabeled', '-d', '901', '-c', CFG, '-plans_name', ws.plans, '-np', '1')


def test_plans_missing(ws):
    with pytest.raises(UnlabeledPreprocessingError, match='Run planning first: nnUNetv2_plan_and_preprocess'):
        preprocess_unlabeled(ws.dataset_id, CFG, 'nnUNetPlansDoesNotExist', verbose=False)


def test_folder_missing_and_empty(ws):
    raw_unlabeled = os.path.join(ws.raw, 'imagesUnlabeled')
    shutil.rmtree(raw_unlabeled)
    with pytest.raises(UnlabeledPreprocessingError, match='does not exist'):
        preprocess_unlabeled(ws.dataset_id, CFG, ws.plans, verbose=False)
    os.makedirs(raw_unlabeled)
    with pytest.raises(UnlabeledPreprocessingError, match='is empty'):
        preprocess_unlabeled(ws.dataset_id, CFG, ws.plans, verbose=False)


def test_wrong_channel_count(ws):
    src = os.path.join(ws.raw, 'imagesUnlabeled', 'unl_001_0000.nii.gz')
    shutil.copy(src, os.path.join(ws.raw, 'imagesUnlabeled', 'unl_001_0001.nii.gz'))
    with pytest.raises(UnlabeledPreprocessingError, match=r"'unl_001'.*_0000, _0001.*1 channel"):
        preprocess_unlabeled(ws.dataset_id, CFG, ws.plans, verbose=False)


def test_wrong_file_ending(ws):
    image = sitk.ReadImage(os.path.join(ws.raw, 'imagesUnlabeled', 'unl_001_0000.nii.gz'))
    bad = os.path.join(ws.raw, 'imagesUnlabeled', 'unl_009_0000.nrrd')
    sitk.WriteImage(image, bad)
    with pytest.raises(UnlabeledPreprocessingError, match=r"unl_009_0000\.nrrd: file ending.*'\.nii\.gz'"):
        preprocess_unlabeled(ws.dataset_id, CFG, ws.plans, verbose=False)


def test_unreadable_image_leaves_existing_output_intact(ws):
    folder = _unlabeled_folder(ws)
    before = _snapshot(folder)
    with open(os.path.join(ws.raw, 'imagesUnlabeled', 'unl_zzz_0000.nii.gz'), 'wb') as f:
        f.write(b'this is not a nifti file')
    with pytest.raises(UnlabeledPreprocessingError, match=r"'unl_zzz'.*unl_zzz_0000\.nii\.gz"):
        preprocess_unlabeled(ws.dataset_id, CFG, ws.plans, verbose=False)
    assert _snapshot(folder) == before
    assert _no_temp_leftovers(ws)


def test_unlabeled_id_equal_to_labeled_id(ws):
    shutil.copy(os.path.join(ws.raw, 'imagesTr', 'lab_000_0000.nii.gz'),
                os.path.join(ws.raw, 'imagesUnlabeled', 'lab_000_0000.nii.gz'))
    with pytest.raises(UnlabeledPreprocessingError, match=r"\['lab_000'\].*equal labeled case IDs"):
        preprocess_unlabeled(ws.dataset_id, CFG, ws.plans, verbose=False)


def test_existing_folder_made_with_other_plans(ws):
    # Plans with the same data_identifier but another target spacing produce different arrays.
    plans = json.load(open(os.path.join(ws.preprocessed, ws.plans + '.json')))
    plans['plans_name'] = 'nnUNetPlansOther'
    plans['configurations'][CFG]['spacing'] = [3.0, 2.0, 2.0]
    with open(os.path.join(ws.preprocessed, 'nnUNetPlansOther.json'), 'w') as f:
        json.dump(plans, f)
    folder = _unlabeled_folder(ws)
    before = _snapshot(folder)
    with pytest.raises(UnlabeledPreprocessingError, match="made with plans 'nnUNetPlansTiny'.*--overwrite"):
        preprocess_unlabeled(ws.dataset_id, CFG, 'nnUNetPlansOther', verbose=False)
    assert _snapshot(folder) == before
    # Plans that differ only in architecture/batch size (ResEnc-style presets) share the folder.
    plans = json.load(open(os.path.join(ws.preprocessed, ws.plans + '.json')))
    plans['plans_name'] = 'nnUNetPlansBigger'
    plans['configurations'][CFG]['batch_size'] = 4
    plans['configurations'][CFG]['architecture']['arch_kwargs']['features_per_stage'] = [16, 32, 64]
    with open(os.path.join(ws.preprocessed, 'nnUNetPlansBigger.json'), 'w') as f:
        json.dump(plans, f)
    preprocess_unlabeled(ws.dataset_id, CFG, 'nnUNetPlansBigger', verbose=False)
    # --overwrite replaces it; the record then names the other plans.
    preprocess_unlabeled(ws.dataset_id, CFG, 'nnUNetPlansOther', overwrite_other_plans=True, verbose=False)
    assert json.load(open(os.path.join(folder, RECORD_FILENAME)))['plans_name'] == 'nnUNetPlansOther'
    assert _no_temp_leftovers(ws)


def test_trainer_names_what_differs_from_its_plans(ws):
    """The trainer refuses an unlabeled folder made with other preprocessing and says which setting differs."""
    from types import SimpleNamespace

    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_semiseg.trainers.semi_supervised import MissingUnlabeledDataError, nnUNetTrainerSemiSupervised
    plans = json.load(open(os.path.join(ws.preprocessed, ws.plans + '.json')))
    recorded = json.load(open(os.path.join(_unlabeled_folder(ws), RECORD_FILENAME)))['preprocessing']['spacing']
    plans['configurations'][CFG]['spacing'] = [3.0, 2.0, 2.0]
    trainer = SimpleNamespace(unlabeled_folder=_unlabeled_folder(ws), plans_manager=PlansManager(plans),
                              configuration_name=CFG, preprocess_unlabeled_command=lambda: 'PREPROCESS')
    expected = f'names other preprocessing (spacing {json.dumps(recorded)} -> [3.0, 2.0, 2.0]). Re-create it with:\n' \
               f'    PREPROCESS --overwrite'
    with pytest.raises(MissingUnlabeledDataError, match=re.escape(expected)):
        nnUNetTrainerSemiSupervised.check_unlabeled_folder(trainer)
    plans['configurations'][CFG]['spacing'] = recorded        # the record's own settings pass
    nnUNetTrainerSemiSupervised.check_unlabeled_folder(
        SimpleNamespace(**{**vars(trainer), 'plans_manager': PlansManager(plans)}))
