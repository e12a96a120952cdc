"""``nnUNet_semiseg_snapshot_epochs``: intermediate checkpoints for a learning curve (the schedule study of
docs/benchmarks.md), for the supervised schedule trainer and for the semi-supervised base (Mean Teacher), through
the stock CLIs on the tiny synthetic dataset."""
import os

import pytest
import torch

from nnunetv2_semiseg.demo.pipeline import StepFailed

SUPERVISED = 'nnUNetTrainer_semisegSchedule'
MEAN_TEACHER = 'nnUNetTrainerMeanTeacher'


def _load(path):
    return torch.load(path, map_location='cpu', weights_only=False)


def _weights_equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize('trainer', [SUPERVISED, MEAN_TEACHER])
def test_snapshot_is_the_state_after_its_epoch_and_predicts(workspace, tmp_path, trainer):
    ws = workspace
    env = dict(ws.train_env(epochs=3, iterations=1), nnUNet_semiseg_snapshot_epochs='1,2', nnUNet_semiseg_seed='3')
    ws.run('nnUNetv2_train', '901', '3d_fullres', '0', '-tr', trainer, '-p', ws.plans, '-device', 'cpu', env=env)
    fold = os.path.join(ws.model_folder(trainer), 'fold_0')
    assert sorted(f for f in os.listdir(fold) if f.startswith('checkpoint_epoch')) == \
        ['checkpoint_epoch1.pth', 'checkpoint_epoch2.pth']
    first, second = (_load(os.path.join(fold, f'checkpoint_epoch{n}.pth')) for n in (1, 2))
    final = _load(os.path.join(fold, 'checkpoint_final.pth'))
    # current_epoch = epochs done, as in checkpoint_final (3): a snapshot resumes where it was taken
    assert (first['current_epoch'], second['current_epoch'], final['current_epoch']) == (1, 2, 3)
    assert len(first['logging']['train_losses']) == 1 and len(second['logging']['train_losses']) == 2
    # each snapshot holds the weights of its own epoch: training went on after it
    assert not _weights_equal(first['network_weights'], second['network_weights'])
    assert not _weights_equal(second['network_weights'], final['network_weights'])
    if trainer == MEAN_TEACHER:
        assert first['semiseg']['global_iteration'] == 1 and second['semiseg']['global_iteration'] == 2
    # stock predict loads a snapshot strictly, like checkpoint_final
    out = str(tmp_path / 'pred')
    ws.run('nnUNetv2_predict', '-i', os.path.join(ws.raw, 'imagesTs'), '-o', out, '-d', '901', '-c', '3d_fullres',
           '-f', '0', '-tr', trainer, '-p', ws.plans, '-chk', 'checkpoint_epoch1.pth', '-device', 'cpu', '-npp', '0',
           '-nps', '0', '--disable_tta', env=env)
    assert sorted(f for f in os.listdir(out) if f.endswith('.nii.gz')) == ['test_000.nii.gz', 'test_001.nii.gz']


def test_malformed_snapshot_list_fails_before_training_and_names_the_variable(workspace):
    ws = workspace
    env = dict(ws.train_env(epochs=1, iterations=1), nnUNet_semiseg_snapshot_epochs='15,x')
    with pytest.raises(StepFailed, match=r"nnUNet_semiseg_snapshot_epochs='15,x' must be a comma-separated list"):
        ws.run('nnUNetv2_train', '901', '3d_fullres', '0', '-tr', SUPERVISED, '-p', ws.plans, '-device', 'cpu',
               env=env)
    fold = os.path.join(ws.model_folder(SUPERVISED), 'fold_0')
    assert not os.path.isfile(os.path.join(fold, 'checkpoint_final.pth'))
