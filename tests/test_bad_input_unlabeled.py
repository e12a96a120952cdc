"""Issue 13, unlabeled preprocessing: truncated / 2D / off-geometry images, test IDs among the unlabeled, what
differs in re-planned preprocessing, --overwrite of a foreign folder, -np, killed runs and the folder mode."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import SimpleITK as sitk

from nnunetv2_semiseg.data.preprocess_unlabeled import (RECORD_FILENAME, UnlabeledPreprocessingError, main,
                                                        preprocess_unlabeled)

CFG = '3d_fullres'


@pytest.fixture
def ws(workspace, monkeypatch):
    workspace.set_process_env(monkeypatch)
    return workspace


def _folder(ws):
    return os.path.join(ws.preprocessed, f'{ws.plans}_{CFG}_unlabeled')


def _unlabeled(ws, name):
    return os.path.join(ws.raw, 'imagesUnlabeled', name)


def _snapshot(folder):
    return {f: os.path.getmtime(os.path.join(folder, f)) for f in sorted(os.listdir(folder))}


def _leftovers(ws):
    return [f for f in os.listdir(ws.preprocessed) if '.tmp_' in f or '.old_' in f]


def test_truncated_and_2d_images_are_refused_by_name(ws):
    before = _snapshot(_folder(ws))
    bad = _unlabeled(ws, 'unl_001_0000.nii.gz')
    data = open(bad, 'rb').read()
    with open(bad, 'wb') as f:
        f.write(data[:len(data) // 2])  # a half-copied file: SimpleITK reads it, zero-filled
    with pytest.raises(UnlabeledPreprocessingError, match=r"'unl_001'.*unl_001_0000\.nii\.gz is truncated"):
        preprocess_unlabeled(ws.dataset_id, CFG, ws.plans, verbose=False)
    with open(bad, 'wb') as f:
        f.write(data)
    flat = sitk.GetArrayFromImage(sitk.ReadImage(bad))[10]  # one slice: a 2D image
    sitk.WriteImage(sitk.GetImageFromArray(flat), _unlabeled(ws, 'unl_2d_0000.nii.gz'))
    with pytest.raises(UnlabeledPreprocessingError, match=r"'unl_2d'.*is a 2D image but the labeled images in "
                                                          r"imagesTr are 3D"):
        preprocess_unlabeled(ws.dataset_id, CFG, ws.plans, verbose=False)
    assert _snapshot(_folder(ws)) == before and _leftovers(ws) == []


def test_test_ids_refused_unless_allowed_and_geometry_outliers_warned(ws, capsys):
    test_image = os.path.join(ws.raw, 'imagesTs', sorted(os.listdir(os.path.join(ws.raw, 'imagesTs')))[0])
    test_id = os.path.basename(test_image)[:-len('_0000.nii.gz')]
    shutil.copy(test_image, _unlabeled(ws, os.path.basename(test_image)))
    with pytest.raises(UnlabeledPreprocessingError, match=rf"\['{test_id}'\].*also test cases in imagesTs.*"
                                                          r"--allow_test_ids"):
        preprocess_unlabeled(ws.dataset_id, CFG, ws.plans, verbose=False)
    # A case with a spacing 4x finer than every labeled case's and a flipped x axis: accepted, with warnings.
    image = sitk.ReadImage(_unlabeled(ws, 'unl_002_0000.nii.gz'))
    image.SetSpacing(tuple(s / 4 for s in image.GetSpacing()))
    image.SetDirection((-1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    sitk.WriteImage(image, _unlabeled(ws, 'unl_002_0000.nii.gz'))
    capsys.readouterr()
    old = os.umask(0o022)
    try:
        preprocess_unlabeled(ws.dataset_id, CFG, ws.plans, verbose=False, allow_test_ids=True)
    finally:
        os.umask(old)
    err = capsys.readouterr().err
    assert "WARNING: Unlabeled case 'unl_002': spacing" in err and "far from the labeled cases'" in err, err
    assert "WARNING: Unlabeled case 'unl_002': orientation RPS" in err, err
    record = json.load(open(os.path.join(_folder(ws), RECORD_FILENAME)))
    assert test_id in record['case_ids']
    assert oct(os.stat(_folder(ws)).st_mode & 0o777) == oct(0o755)  # not mkdtemp's 0700


def test_replanned_preprocessing_says_what_differs_and_foreign_folder_is_kept(ws):
    preprocess_unlabeled(ws.dataset_id, CFG, ws.plans, verbose=False)  # record with the settings
    plans_file = os.path.join(ws.preprocessed, ws.plans + '.json')
    plans = json.load(open(plans_file))
    old_spacing = plans['configurations'][CFG]['spacing']
    plans['configurations'][CFG]['spacing'] = [3.0, 2.0, 2.0]
    json.dump(plans, open(plans_file, 'w'))  # a re-plan under the same name
    with pytest.raises(UnlabeledPreprocessingError) as error:
        preprocess_unlabeled(ws.dataset_id, CFG, ws.plans, verbose=False)
    assert f'spacing {json.dumps([float(s) for s in old_spacing])} -> [3.0, 2.0, 2.0]' in str(error.value)
    # A folder of that name that this command did not write is not replaced, even with --overwrite.
    folder = _folder(ws)
    os.remove(os.path.join(folder, RECORD_FILENAME))
    before = _snapshot(folder)
    with pytest.raises(UnlabeledPreprocessingError, match=f'has no {RECORD_FILENAME}.*not replaced'):
        preprocess_unlabeled(ws.dataset_id, CFG, ws.plans, overwrite_other_plans=True, verbose=False)
    assert _snapshot(folder) == before


def test_process_count_below_one_is_refused(capsys):
    for bad in ('0', '-3'):
        with pytest.raises(SystemExit) as exit_info:
            main(['-d', '901', '-np', bad])
        assert exit_info.value.code == 2
        assert 'pass at least 1' in capsys.readouterr().err


def test_killed_run_is_cleaned_up_by_the_next_and_a_live_run_is_not(ws):
    env = dict(os.environ, **{k: v for k, v in ws.train_env().items()})
    command = ['nnUNetv2_semiseg_preprocess_unlabeled', '-d', str(ws.dataset_id), '-c', CFG, '-plans_name', ws.plans,
               '-np', '1']
    for k in range(12):  # enough cases that the run is still converting when it is killed
        shutil.copy(_unlabeled(ws, 'unl_000_0000.nii.gz'), _unlabeled(ws, f'unl_more_{k:02d}_0000.nii.gz'))

    def temporary():
        return [f for f in os.listdir(ws.preprocessed) if '.tmp_' in f]

    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None and not temporary():
            time.sleep(0.01)
        assert process.poll() is None, 'the run ended before it could be killed'
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert temporary(), 'the killed run left no temporary folder to clean up'
    for k in range(12):  # the clean run needs only the original cases
        os.remove(_unlabeled(ws, f'unl_more_{k:02d}_0000.nii.gz'))
    # The temporary folder of a run that is still alive (another process) must survive.
    from nnunetv2_semiseg.utilities.safe_io import owned_name
    live_owner = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        live = os.path.join(ws.preprocessed, owned_name(f'{ws.plans}_{CFG}_unlabeled.tmp_', pid=live_owner.pid))
        os.makedirs(live)
        preprocess_unlabeled(ws.dataset_id, CFG, ws.plans, verbose=False)
        assert _leftovers(ws) == [os.path.basename(live)]
    finally:
        live_owner.kill()
        live_owner.wait()
