"""Images added to / removed from imagesUnlabeled/ after unlabeled preprocessing: training warns, naming the
cases and the command that re-creates the preprocessed set."""
import json
import os
import shutil

import torch

from nnunetv2_semiseg.trainers.mean_teacher import nnUNetTrainerMeanTeacher


def _trainer(workspace):
    plans = json.load(open(os.path.join(workspace.preprocessed, workspace.plans + '.json')))
    plans['continue_training'] = False
    dataset_json = json.load(open(os.path.join(workspace.preprocessed, 'dataset.json')))
    return nnUNetTrainerMeanTeacher(plans, '3d_fullres', 0, dataset_json, torch.device('cpu'))


def test_training_warns_when_raw_unlabeled_cases_differ_from_the_preprocessed_ones(workspace, monkeypatch, capsys):
    workspace.set_process_env(monkeypatch)
    trainer = _trainer(workspace)
    trainer.initialize()
    trainer.get_unlabeled_dataloader()  # what training start runs (get_dataloaders)
    assert 'changed since' not in capsys.readouterr().out  # up to date: silent
    raw = os.path.join(workspace.raw, 'imagesUnlabeled')
    shutil.copy(os.path.join(raw, 'unl_000_0000.nii.gz'), os.path.join(raw, 'unl_new_0000.nii.gz'))
    os.remove(os.path.join(raw, 'unl_003_0000.nii.gz'))
    trainer.get_unlabeled_dataloader()
    lines = [line for line in capsys.readouterr().out.splitlines() if 'WARNING' in line]
    assert len(lines) == 1, lines
    line = lines[0]
    assert f'WARNING: {raw} changed since {trainer.unlabeled_folder} was preprocessed (' in line
    assert '1 case(s) in imagesUnlabeled/ are not preprocessed (unl_new)' in line
    assert '1 preprocessed case(s) are no longer in imagesUnlabeled/ (unl_003)' in line
    assert line.endswith(f're-run: nnUNetv2_semiseg_preprocess_unlabeled -d {workspace.dataset_id} -c 3d_fullres '
                         f'-plans_name {workspace.plans}')
    # the warning is in the training log too
    assert 'unl_new' in open(trainer.log_file).read()
