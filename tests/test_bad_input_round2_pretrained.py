"""nnUNetv2_train -pretrained_weights <plain nnUNetTrainer checkpoint> with our trainers (training heads, EMA
teachers): the segmentation network is loaded, the heads start fresh, and the run says so."""
import json
import os
import re

import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_semiseg.trainers.pretrained_weights import PretrainedWeightsError


def _trainer(cls, workspace, configuration='3d_fullres'):
    plans = json.load(open(os.path.join(workspace.preprocessed, workspace.plans + '.json')))
    plans['continue_training'] = False
    dataset_json = json.load(open(os.path.join(workspace.preprocessed, 'dataset.json')))
    return cls(plans, configuration, 0, dataset_json, torch.device('cpu'))


@pytest.fixture
def plain_checkpoint(workspace, monkeypatch, tmp_path):
    """A real checkpoint written by nnU-Net's own nnUNetTrainer.save_checkpoint on the tiny plans."""
    workspace.set_process_env(monkeypatch)
    plain = _trainer(nnUNetTrainer, workspace)
    plain.initialize()
    path = str(tmp_path / 'plain_checkpoint_final.pth')
    plain.save_checkpoint(path)
    return path, {k: v.clone() for k, v in plain.network.state_dict().items()}


def _load_through_nnunet(trainer, path):
    # The function nnUNetv2_train's run_training calls (a module global, looked up at call time).
    from nnunetv2.run import run_training
    run_training.maybe_load_checkpoint(trainer, False, False, path)


@pytest.mark.parametrize('trainer_name', ['nnUNetTrainerSSNet', 'nnUNetTrainerFLPM'])
def test_plain_checkpoint_loads_into_a_trainer_with_heads(workspace, plain_checkpoint, trainer_name, capsys):
    from nnunetv2_semiseg.nnunet_ext import nnunetv2_semiseg_trainers as shim
    path, plain = plain_checkpoint
    trainer = _trainer(getattr(shim, trainer_name), workspace)
    trainer.initialize()
    before = {k: v.clone() for k, v in trainer.unwrapped_network.state_dict().items()}
    heads = [k for k in before if k.startswith('heads.')]
    assert heads  # the case nnU-Net's loader asserted on
    _load_through_nnunet(trainer, path)
    after = trainer.unwrapped_network.state_dict()
    transferred = [k for k in plain if '.seg_layers.' not in k]
    assert transferred and all(torch.equal(after[k], plain[k]) for k in transferred)
    # nnU-Net's rule: segmentation layers are not transferred; the heads keep their fresh initialisation.
    assert all(torch.equal(after[k], before[k]) for k in heads)
    assert all(torch.equal(after[k], before[k]) for k in after if '.seg_layers.' in k)
    out = capsys.readouterr().out
    assert f'Pretrained weights from {path} (nnUNetTrainer): {len(transferred)} of {len(after)} tensors loaded' in out
    assert re.search(r'; initialised fresh: heads\.\w+ \(\d+ tensors\), .*segmentation layers \(\d+ tensors\)\.', out)


def test_mean_teacher_teacher_starts_from_the_pretrained_student(workspace, plain_checkpoint):
    from nnunetv2_semiseg.trainers.mean_teacher import nnUNetTrainerMeanTeacher
    path, plain = plain_checkpoint
    trainer = _trainer(nnUNetTrainerMeanTeacher, workspace)
    _load_through_nnunet(trainer, path)  # initialises the trainer itself, as nnU-Net's code does
    teacher = trainer.consistency.teacher.state_dict()
    key = next(k for k in plain if k.startswith('encoder.') and k.endswith('.weight'))
    assert torch.equal(teacher[key], plain[key])  # not the random student copied in initialize()


def test_checkpoint_of_other_plans_is_refused_by_name(workspace, plain_checkpoint, tmp_path):
    from nnunetv2_semiseg.trainers.ssnet import nnUNetTrainerSSNet
    path, _ = plain_checkpoint
    checkpoint = torch.load(path, map_location='cpu', weights_only=False)
    key = next(k for k in checkpoint['network_weights'] if k.startswith('encoder.') and k.endswith('.weight'))
    checkpoint['network_weights'][key] = torch.zeros(1)
    other = str(tmp_path / 'other_plans.pth')
    torch.save(checkpoint, other)
    trainer = _trainer(nnUNetTrainerSSNet, workspace)
    with pytest.raises(PretrainedWeightsError) as info:
        _load_through_nnunet(trainer, other)
    message = str(info.value)
    assert '\n' not in message
    assert message.startswith(f'{other}: {key} has shape (1,), this network expects (')
    assert 'Pretrain with the plans used here' in message


def test_nnunetv2_train_cli_with_pretrained_plain_checkpoint(workspace, plain_checkpoint):
    path, _ = plain_checkpoint
    out = workspace.run('nnUNetv2_train', str(workspace.dataset_id), '3d_fullres', '0', '-tr', 'nnUNetTrainerSSNet',
                        '-p', workspace.plans, '-device', 'cpu', '-pretrained_weights', path,
                        env=workspace.train_env(epochs=1, iterations=1))
    assert f'Pretrained weights from {path} (nnUNetTrainer)' in out
    assert 'initialised fresh: heads.projector' in out
    assert os.path.isfile(os.path.join(workspace.model_folder('nnUNetTrainerSSNet'), 'fold_0',
                                       'checkpoint_final.pth'))


def test_dual_stream_gets_the_plain_weights_in_stream_a(workspace, plain_checkpoint):
    from nnunetv2_semiseg.trainers.dualstream import nnUNetTrainerDualStream
    path, plain = plain_checkpoint
    trainer = _trainer(nnUNetTrainerDualStream, workspace)
    trainer.initialize()
    before = {k: v.clone() for k, v in trainer.unwrapped_network.state_dict().items()}
    _load_through_nnunet(trainer, path)
    after = trainer.unwrapped_network.state_dict()
    transferred = [k for k in plain if '.seg_layers.' not in k]
    assert all(torch.equal(after['stream_a.' + k], plain[k]) for k in transferred)
    assert all(torch.equal(after[k], before[k]) for k in after if k.startswith('stream_b.'))
