"""--c compares the schedule variables with the checkpoint's record: a change is refused by name (both values and
the way out), the same schedule and older checkpoints without the record load, the override extends on purpose."""
import json
import os

import pytest
import torch

from nnunetv2_semiseg.trainers.schedule import (ALLOW_SCHEDULE_CHANGE_ENV, ScheduleChangedError,
                                                check_resume_schedule, schedule_record)


def _trainer(ws, continue_training):
    from nnunetv2_semiseg.trainers.mean_teacher import nnUNetTrainerMeanTeacher
    plans = json.load(open(os.path.join(ws.preprocessed, ws.plans + '.json')))
    plans['continue_training'] = continue_training
    dataset_json = json.load(open(os.path.join(ws.preprocessed, 'dataset.json')))
    trainer = nnUNetTrainerMeanTeacher(plans, '3d_fullres', 0, dataset_json, torch.device('cpu'))
    trainer.initialize()
    return trainer


def test_resume_refuses_a_changed_schedule_and_names_both_values(workspace, monkeypatch, tmp_path):
    workspace.set_process_env(monkeypatch)
    monkeypatch.delenv(ALLOW_SCHEDULE_CHANGE_ENV)  # the scripted runs' env allows it; a user's does not
    monkeypatch.setenv('nnUNet_semiseg_num_epochs', '3')
    monkeypatch.setenv('nnUNet_semiseg_iterations_per_epoch', '2')
    first = _trainer(workspace, continue_training=False)
    path = str(tmp_path / 'checkpoint_latest.pth')
    first.save_checkpoint(path)
    saved = torch.load(path, map_location='cpu', weights_only=False)
    assert saved['semiseg']['schedule']['effective'] == {'num_epochs': 3, 'num_iterations_per_epoch': 2,
                                                         'num_val_iterations_per_epoch': 1}
    assert saved['semiseg']['schedule']['environment']['nnUNet_semiseg_num_epochs'] == '3'

    # The variable forgotten in a new shell: nnU-Net's 1000 epochs would continue in the same folder.
    monkeypatch.delenv('nnUNet_semiseg_num_epochs')
    resumed = _trainer(workspace, continue_training=True)
    with pytest.raises(ScheduleChangedError) as info:
        resumed.load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f'{path} was trained on another schedule')
    assert ('num_epochs: 3 in the checkpoint (nnUNet_semiseg_num_epochs=3), 1000 now (nnUNet_semiseg_num_epochs '
            'unset)') in message
    assert 'export nnUNet_semiseg_num_epochs=3' in message and 'another output folder' in message
    assert f'{ALLOW_SCHEDULE_CHANGE_ENV}=1' in message
    assert resumed.current_epoch == 0  # nothing was loaded

    # Same schedule again: loads. --val-like loading (no --c) never compares.
    monkeypatch.setenv('nnUNet_semiseg_num_epochs', '3')
    same = _trainer(workspace, continue_training=True)
    same.load_checkpoint(path)
    assert same.current_epoch == 1
    monkeypatch.setenv('nnUNet_semiseg_iterations_per_epoch', '5')
    _trainer(workspace, continue_training=False).load_checkpoint(path)

    # Another iterations-per-epoch value set explicitly: refused, and the fix restores the recorded value.
    changed = _trainer(workspace, continue_training=True)
    with pytest.raises(ScheduleChangedError, match=r'num_iterations_per_epoch: 2 in the checkpoint '
                                                   r'\(nnUNet_semiseg_iterations_per_epoch=2\), 5 now '
                                                   r'\(nnUNet_semiseg_iterations_per_epoch=5\).*'
                                                   r'export nnUNet_semiseg_iterations_per_epoch=2'):
        changed.load_checkpoint(path)
    # Extending on purpose: accepted and written to the log.
    monkeypatch.setenv(ALLOW_SCHEDULE_CHANGE_ENV, '1')
    changed.load_checkpoint(path)
    assert changed.current_epoch == 1
    log = open(changed.log_file).read()
    assert f'on a changed schedule ({ALLOW_SCHEDULE_CHANGE_ENV}=1): num_iterations_per_epoch: 2 in the checkpoint' \
        in log

    # A checkpoint from before the record (no 'schedule' in its semiseg state) still loads with --c.
    monkeypatch.delenv(ALLOW_SCHEDULE_CHANGE_ENV)
    del saved['semiseg']['schedule']
    old = _trainer(workspace, continue_training=True)
    old.load_checkpoint(saved)
    assert old.current_epoch == 1
    assert 'holds no schedule record (an older checkpoint)' in open(old.log_file).read()


def test_check_resume_schedule_rules_without_a_dataset(monkeypatch):
    class Stub:
        num_epochs, num_iterations_per_epoch, num_val_iterations_per_epoch = 1000, 250, 50
        logged = []

        def print_to_log_file(self, *args):
            self.logged.append(' '.join(str(a) for a in args))

    for name in ('nnUNet_semiseg_num_epochs', 'nnUNet_semiseg_iterations_per_epoch',
                 'nnUNet_semiseg_val_iterations_per_epoch', 'nnUNet_semiseg_seed', ALLOW_SCHEDULE_CHANGE_ENV):
        monkeypatch.delenv(name, raising=False)
    stub = Stub()
    record = schedule_record(stub)
    assert record == {'environment': {'nnUNet_semiseg_num_epochs': None, 'nnUNet_semiseg_iterations_per_epoch': None,
                                      'nnUNet_semiseg_val_iterations_per_epoch': None, 'nnUNet_semiseg_seed': None},
                      'effective': {'num_epochs': 1000, 'num_iterations_per_epoch': 250,
                                    'num_val_iterations_per_epoch': 50}}
    check_resume_schedule(record, stub, 'ck.pth')  # unchanged
    # Validation iterations and the seed do not change what is trained: noted, not refused.
    monkeypatch.setenv('nnUNet_semiseg_seed', '7')
    stub.num_val_iterations_per_epoch = 5
    check_resume_schedule(record, stub, 'ck.pth')
    assert 'Note: nnUNet_semiseg_seed unset when ck.pth was written, nnUNet_semiseg_seed=7 now.' in stub.logged
    # Trained with the variable, resumed with nnU-Net's default: the fix is to set it again.
    saved = {'environment': dict(record['environment'], nnUNet_semiseg_num_epochs='10'),
             'effective': dict(record['effective'], num_epochs=10)}
    with pytest.raises(ScheduleChangedError, match=r'num_epochs: 10 in the checkpoint \(nnUNet_semiseg_num_epochs='
                                                   r'10\), 1000 now \(nnUNet_semiseg_num_epochs unset\).*'
                                                   r'export nnUNet_semiseg_num_epochs=10'):
        check_resume_schedule(saved, stub, 'ck.pth')
    # Trained without it, resumed with it set: the fix is to unset it.
    monkeypatch.setenv('nnUNet_semiseg_num_epochs', '10')
    stub.num_epochs = 10
    with pytest.raises(ScheduleChangedError, match=r'unset nnUNet_semiseg_num_epochs'):
        check_resume_schedule(record, stub, 'ck.pth')
