"""A diverged run (non-finite loss or term) stops with a named error; no non-finite checkpoint replaces a good one."""
import json
import os

import numpy as np
import pytest
import torch

from nnunetv2_semiseg.trainers.run_guards import (MAX_NON_FINITE_STEPS_ENV, NonFiniteLossGuard,
                                                  NonFiniteTrainingError, max_non_finite_steps_from_env,
                                                  non_finite_terms, non_finite_tensors)


def test_non_finite_terms_names_nan_and_inf_only():
    values = {'loss': np.float32(1.5), 'sup': np.array(np.nan), 'cons': np.array([0.0, np.inf]), 'x': -np.inf}
    assert non_finite_terms(values) == ['sup', 'cons', 'x']
    assert non_finite_terms({'loss': 0.0, 'sup': np.array([1e30])}) == []


def test_guard_tolerates_isolated_inf_steps_and_stops_after_more_than_the_limit():
    guard = NonFiniteLossGuard(max_consecutive=2, trainer_name='nnUNetTrainerFLPM')
    good, bad = {'loss': 0.7, 'sup': 0.5}, {'loss': float('inf'), 'sup': 0.5}
    # AMP-like pattern: single inf steps separated by finite ones never accumulate.
    for _ in range(10):
        assert guard.check_step(bad, epoch=0, uses_amp=True) == ['loss']
        assert guard.check_step(good, epoch=0, uses_amp=True) == []
    assert guard.consecutive == 0
    guard.check_step(bad, 3)
    guard.check_step({'loss': float('nan'), 'sup': float('nan')}, 3)  # 2 in a row: still tolerated
    with pytest.raises(NonFiniteTrainingError) as info:
        guard.check_step({'loss': float('nan'), 'sup': float('nan')}, 3)
    message = str(info.value)
    assert 'nnUNetTrainerFLPM' in message and 'epoch 3' in message and 'loss=nan, sup=nan' in message
    assert '3 consecutive steps' in message and 'learning rate' in message and 'NaN/Inf' in message
    assert 'AMP is off' in message and MAX_NON_FINITE_STEPS_ENV in message


def test_limit_from_env(monkeypatch):
    monkeypatch.delenv(MAX_NON_FINITE_STEPS_ENV, raising=False)
    assert max_non_finite_steps_from_env() == 5  # documented default
    monkeypatch.setenv(MAX_NON_FINITE_STEPS_ENV, '0')
    assert NonFiniteLossGuard().max_consecutive == 0
    monkeypatch.setenv(MAX_NON_FINITE_STEPS_ENV, 'many')
    with pytest.raises(ValueError, match=MAX_NON_FINITE_STEPS_ENV):
        max_non_finite_steps_from_env()


def test_non_finite_tensors_ignores_integer_buffers():
    state = {'a': torch.zeros(3), 'b': torch.tensor([1.0, float('nan')]), 'n': torch.tensor(5),
             'c': torch.tensor([float('-inf')])}
    assert non_finite_tensors(state) == ['b', 'c']


def test_trainer_stops_on_nan_loss_and_keeps_the_good_checkpoint(workspace, monkeypatch, tmp_path):
    from nnunetv2_semiseg.trainers.mean_teacher import nnUNetTrainerMeanTeacher
    workspace.set_process_env(monkeypatch)
    monkeypatch.setenv(MAX_NON_FINITE_STEPS_ENV, '2')
    plans = json.load(open(os.path.join(workspace.preprocessed, workspace.plans + '.json')))
    plans['continue_training'] = False
    dataset_json = json.load(open(os.path.join(workspace.preprocessed, 'dataset.json')))
    trainer = nnUNetTrainerMeanTeacher(plans, '3d_fullres', 0, dataset_json, torch.device('cpu'))
    trainer.initialize()
    path = str(tmp_path / 'checkpoint_best.pth')
    trainer.save_checkpoint(path)
    good_bytes = open(path, 'rb').read()

    def nan_terms(data, target, unlabeled):
        # Connected to every weight, so the optimizer step turns the weights into NaN (as a NaN input would).
        anchor = sum(p.sum() for p in trainer.network.parameters()) * float('nan')
        return {'loss': anchor, **{t: anchor.detach() for t in trainer.loss_term_names}}

    monkeypatch.setattr(trainer, 'compute_loss_terms', nan_terms)
    monkeypatch.setattr(trainer, 'next_unlabeled_batch', lambda: {})
    batch = {'data': torch.zeros(2, 1, 16, 32, 32), 'target': torch.zeros(2, 1, 16, 32, 32)}
    trainer.current_epoch = 4
    trainer.train_step(batch)
    trainer.train_step(batch)  # two non-finite steps are tolerated with the limit 2
    with pytest.raises(NonFiniteTrainingError, match=r'nnUNetTrainerMeanTeacher: training diverged in epoch 4: '
                                                     r'loss=nan, sup=nan.* for 3 consecutive steps'):
        trainer.train_step(batch)
    assert non_finite_tensors(trainer.unwrapped_network.state_dict())  # the weights did diverge
    trainer.save_checkpoint(path)
    assert open(path, 'rb').read() == good_bytes
    assert not os.path.exists(path + '.tmp')
