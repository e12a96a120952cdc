"""--c with another semi-supervised trainer's checkpoint is refused by name unless explicitly allowed."""
import json
import os

import pytest
import torch

from nnunetv2_semiseg.trainers.run_guards import (ALLOW_CROSS_TRAINER_RESUME_ENV, CrossTrainerResumeError,
                                                  check_resume_trainer)


def test_check_resume_trainer_rules(monkeypatch):
    monkeypatch.delenv(ALLOW_CROSS_TRAINER_RESUME_ENV, raising=False)
    ours = {'trainer_name': 'nnUNetTrainerBCP', 'semiseg': {'global_iteration': 3}}
    check_resume_trainer(ours, 'nnUNetTrainerBCP')  # same trainer
    check_resume_trainer({'trainer_name': 'nnUNetTrainer'}, 'nnUNetTrainerMeanTeacher')  # plain nnU-Net
    check_resume_trainer({'trainer_name': 'nnUNetTrainer', 'semiseg': None}, 'nnUNetTrainerMeanTeacher')
    with pytest.raises(CrossTrainerResumeError) as info:
        check_resume_trainer(ours, 'nnUNetTrainerMeanTeacher', '/r/fold_0/checkpoint_final.pth')
    message = str(info.value)
    assert message.startswith('/r/fold_0/checkpoint_final.pth was written by nnUNetTrainerBCP, not by '
                              'nnUNetTrainerMeanTeacher')
    assert f'{ALLOW_CROSS_TRAINER_RESUME_ENV}=1' in message and '-tr nnUNetTrainerBCP' in message
    monkeypatch.setenv(ALLOW_CROSS_TRAINER_RESUME_ENV, '1')
    check_resume_trainer(ours, 'nnUNetTrainerMeanTeacher')


def test_mean_teacher_refuses_a_bcp_checkpoint_but_takes_a_plain_one(workspace, monkeypatch, tmp_path):
    from nnunetv2_semiseg.trainers.mean_teacher import nnUNetTrainerMeanTeacher
    workspace.set_process_env(monkeypatch)
    monkeypatch.delenv(ALLOW_CROSS_TRAINER_RESUME_ENV, raising=False)
    plans = json.load(open(os.path.join(workspace.preprocessed, workspace.plans + '.json')))
    plans['continue_training'] = False
    dataset_json = json.load(open(os.path.join(workspace.preprocessed, 'dataset.json')))
    trainer = nnUNetTrainerMeanTeacher(plans, '3d_fullres', 0, dataset_json, torch.device('cpu'))
    trainer.initialize()
    path = str(tmp_path / 'checkpoint_final.pth')
    trainer.save_checkpoint(path)
    saved = torch.load(path, map_location='cpu', weights_only=False)
    saved['trainer_name'] = 'nnUNetTrainerBCP'
    saved['current_epoch'] = 7
    torch.save(saved, path)
    with pytest.raises(CrossTrainerResumeError, match=r'checkpoint_final.pth was written by nnUNetTrainerBCP, '
                                                      r'not by nnUNetTrainerMeanTeacher'):
        trainer.load_checkpoint(path)
    assert trainer.current_epoch == 0  # nothing was loaded
    monkeypatch.setenv(ALLOW_CROSS_TRAINER_RESUME_ENV, '1')
    trainer.load_checkpoint(path)
    assert trainer.current_epoch == 7
    # A plain nnU-Net checkpoint (no semiseg state) stays accepted without the override.
    monkeypatch.delenv(ALLOW_CROSS_TRAINER_RESUME_ENV)
    del saved['semiseg']
    saved['trainer_name'] = 'nnUNetTrainer'
    saved['current_epoch'] = 9
    trainer.load_checkpoint(saved)
    assert trainer.current_epoch == 9
