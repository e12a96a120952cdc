"""Unwritable output of export_plain and of the unlabeled preprocessing: one line naming the path and the cause
(disk full, path below a file), temporary folder removed, old output intact. As root, chmod does not make a folder
unwritable, so a read-only location is represented by a path below a regular file and a full disk by a writer that
raises ENOSPC."""
import errno
import json
import os

import pytest
import torch

from nnunetv2_semiseg import export_plain
from nnunetv2_semiseg.data import preprocess_unlabeled as pu

CFG = '3d_fullres'


def _snapshot(folder):
    return {os.path.relpath(os.path.join(d, f), folder): os.path.getsize(os.path.join(d, f))
            for d, _, files in os.walk(folder) for f in files}


@pytest.fixture
def model_folder(workspace, monkeypatch, tmp_path):
    """A model folder as nnUNetv2_train leaves it (plans.json, dataset.json, fold_0/checkpoint_final.pth)."""
    import shutil
    from nnunetv2_semiseg.trainers.ssnet import nnUNetTrainerSSNet
    workspace.set_process_env(monkeypatch)
    plans = json.load(open(os.path.join(workspace.preprocessed, workspace.plans + '.json')))
    plans['continue_training'] = False
    dataset_json = json.load(open(os.path.join(workspace.preprocessed, 'dataset.json')))
    trainer = nnUNetTrainerSSNet(plans, CFG, 0, dataset_json, torch.device('cpu'))
    trainer.initialize()
    folder = tmp_path / 'model'
    os.makedirs(folder / 'fold_0')
    trainer.save_checkpoint(str(folder / 'fold_0' / 'checkpoint_final.pth'))
    shutil.copy(os.path.join(workspace.preprocessed, workspace.plans + '.json'), folder / 'plans.json')
    shutil.copy(os.path.join(workspace.preprocessed, 'dataset.json'), folder / 'dataset.json')
    return str(folder)


def test_export_below_a_file_and_on_a_full_disk(model_folder, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / 'results_file'
    blocker.write_text('x')
    with pytest.raises(SystemExit):
        export_plain.main(['-i', model_folder, '-o', str(blocker / 'sub' / 'exported')])
    assert capsys.readouterr().err == (
        f"ERROR: Cannot write {blocker / 'sub'}: {blocker} is a file, not a folder (ENOTDIR). Choose an output "
        f"location that is not below a file. The temporary folder was removed; nothing was written.\n")

    out = str(tmp_path / 'exported')
    export_plain.export_plain(model_folder, out)
    before = _snapshot(out)

    def full_disk(obj, path, *args, **kwargs):
        open(path, 'wb').write(b'\0' * 10)
        raise OSError(errno.ENOSPC, 'No space left on device', path)

    monkeypatch.setattr(export_plain.torch, 'save', full_disk)
    with pytest.raises(SystemExit):
        export_plain.main(['-i', model_folder, '-o', out, '--overwrite'])
    err = capsys.readouterr().err
    assert err.startswith('ERROR: Cannot write ') and err.count('\n') == 1
    assert f'checkpoint_final.pth: the disk is full (ENOSPC). Free space there or choose another output location. ' \
           f'The temporary folder was removed; {out} is unchanged.' in err
    assert _snapshot(out) == before
    assert [n for n in os.listdir(tmp_path) if n.startswith('.')] == []  # no temporary folder left


def test_unlabeled_preprocessing_on_a_full_disk_keeps_the_old_folder(workspace, monkeypatch):
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    workspace.set_process_env(monkeypatch)
    folder = os.path.join(workspace.preprocessed, f'{workspace.plans}_{CFG}_unlabeled')
    before = _snapshot(folder)
    calls = []

    def full_disk(self, output_filename_truncated, *args, **kwargs):
        calls.append(output_filename_truncated)
        raise OSError(errno.ENOSPC, 'No space left on device', output_filename_truncated + '.b2nd')

    monkeypatch.setattr(DefaultPreprocessor, 'run_case_save', full_disk)
    with pytest.raises(pu.UnlabeledPreprocessingError) as info:
        pu.preprocess_unlabeled(workspace.dataset_id, CFG, workspace.plans, verbose=False)
    assert str(info.value) == (
        f"Cannot write {calls[0]}.b2nd: the disk is full (ENOSPC). Free space there or choose another output "
        f"location. The temporary folder was removed; {folder} is unchanged.")
    assert _snapshot(folder) == before
    assert [f for f in os.listdir(workspace.preprocessed) if '.tmp_' in f or '.old_' in f] == []
