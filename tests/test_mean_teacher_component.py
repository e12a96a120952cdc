"""The Mean Teacher component (EMA teacher + probability consistency) and the Mean Teacher trainer built on it:
hand-computed EMA and consistency values, the rows it applies to, and resuming a checkpoint in the layout that
``nnUNetTrainerMeanTeacher`` wrote before the component was extracted."""
import json
import math
import os

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from torch import nn

from nnunetv2_semiseg.networks.semiseg_network import SemiSegNetwork
from nnunetv2_semiseg.trainers.components import StepContext
from nnunetv2_semiseg.trainers.mean_teacher import (nnUNetTrainerMeanTeacher,
                                                    nnUNetTrainerMeanTeacher_consistencyAllRows)
from nnunetv2_semiseg.trainers.mean_teacher_component import MeanTeacherConsistency


def _tiny_student(num_outputs: int = 2) -> SemiSegNetwork:
    base = PlainConvUNet(1, 2, (4, 8), nn.Conv2d, 3, (1, 2), (1, 1), num_outputs, (1,), conv_bias=True,
                         norm_op=nn.InstanceNorm2d, norm_op_kwargs={'affine': True}, nonlin=nn.LeakyReLU,
                         deep_supervision=True)
    return SemiSegNetwork(base)


def _softmax(logits):
    return torch.softmax(logits.float(), 1)


def _context(student, x, num_labeled, fraction=0.0):
    return StepContext(net=student, x=x, num_labeled=num_labeled, target=None, out={'seg': student(x)},
                       fraction=fraction, to_probabilities=_softmax, to_hard_labels=lambda l: l.argmax(1))


def test_ema_update_of_the_component_teacher_is_hand_computed():
    student = _tiny_student()
    component = MeanTeacherConsistency(student, ema_decay=0.99)
    teacher = component.teacher
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert teacher.decoder.deep_supervision is False and student.decoder.deep_supervision is True
    key = 'decoder.seg_layers.0.weight'
    with torch.no_grad():
        teacher.state_dict()[key].fill_(1.0)
        student.state_dict()[key].fill_(4.0)
    component.after_optimizer_step(student, step=2)              # alpha = min(1 - 1/3, 0.99) = 2/3
    assert torch.allclose(teacher.state_dict()[key], torch.full_like(student.state_dict()[key], 2 / 3 + 4 / 3))
    component.after_optimizer_step(student, step=1000)           # alpha = 0.99
    assert torch.allclose(teacher.state_dict()[key], torch.full_like(student.state_dict()[key], 0.99 * 2 + 0.04))


def test_weight_ramp_is_the_sigmoid_rampup_times_the_weight():
    component = MeanTeacherConsistency(_tiny_student(), weight=0.1, ramp_length=0.4)
    assert component.weight_at(0.0) == pytest.approx(0.1 * math.exp(-5))
    assert component.weight_at(0.2) == pytest.approx(0.1 * math.exp(-5 * 0.25))
    assert component.weight_at(0.7) == pytest.approx(0.1)
    # the voxel-adversarial paper's gamma(t) = 0.001 exp(-5 (1 - t)^2) over the whole schedule
    gamma = MeanTeacherConsistency(_tiny_student(), weight=0.001, ramp_length=1.0)
    assert gamma.weight_at(0.5) == pytest.approx(0.001 * math.exp(-1.25))


@pytest.mark.parametrize('rows', ['unlabeled', 'all'])
def test_consistency_hand_value_on_the_right_rows_with_teacher_noise(rows):
    torch.manual_seed(0)
    student = _tiny_student()
    component = MeanTeacherConsistency(student, noise_std=0.1, noise_clip=0.2, rows=rows)
    with torch.no_grad():   # a teacher that differs from the student, so the loss is not ~0
        for p in component.teacher.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(3, 1, 8, 8)                 # 1 labeled + 2 unlabeled rows
    context = _context(student, x, num_labeled=1)
    torch.manual_seed(7)
    loss = component.loss(context)

    first = 0 if rows == 'all' else 1
    torch.manual_seed(7)
    noise = torch.clamp(torch.randn_like(x[first:]) * 0.1, -0.2, 0.2)
    assert noise.abs().max() <= 0.2 and noise.abs().max() > 0
    with torch.no_grad():
        p_teacher = _softmax(component.teacher(x[first:] + noise))
        p_student = _softmax(student(x)[0][first:])
        expected = ((p_student - p_teacher) ** 2).sum() / p_student.numel()
        # without the noise the value differs: the noise really reaches the teacher input
        without_noise = ((p_student - _softmax(component.teacher(x[first:]))) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert abs(without_noise.item() - expected.item()) > 1e-7
    loss.backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in component.teacher.parameters())   # stop-gradient on the teacher


def test_teacher_helpers_for_pseudo_labels():
    torch.manual_seed(1)
    student = _tiny_student(3)
    component = MeanTeacherConsistency(student)
    x = torch.randn(2, 1, 8, 8)
    logits = component.teacher_logits(x, noise=False)
    assert logits.shape == (2, 3, 8, 8) and not logits.requires_grad
    probabilities = component.teacher_probabilities(x, _softmax, noise=False)
    assert torch.allclose(probabilities.sum(1), torch.ones(2, 8, 8))
    out = component.teacher_outputs(x, noise=False)
    assert torch.allclose(out['seg'], logits, atol=1e-6) and len(out['skips']) == 2
    assert not torch.equal(component.teacher_logits(x, noise=True), logits)


def test_teacher_pass_runs_once_per_step_and_is_shared():
    torch.manual_seed(4)
    student = _tiny_student()
    component = MeanTeacherConsistency(student, rows='all', teacher_features=True)
    calls = []
    component.teacher.encoder.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    context = _context(student, torch.randn(3, 1, 8, 8), num_labeled=1)
    first = component.teacher_pass(context)
    component.loss(context)
    assert component.teacher_pass(context) is first and calls == [3]    # one pass over all rows, reused
    assert set(first) >= {'seg', 'features', 'skips', 'probabilities'}
    assert torch.allclose(first['probabilities'], _softmax(first['seg']))


def test_state_roundtrip_and_start_from_plain_checkpoint():
    student = _tiny_student()
    component = MeanTeacherConsistency(student)
    with torch.no_grad():
        for p in component.teacher.parameters():
            p.add_(1.0)
    state = {k: v.clone() for k, v in component.state_dict().items()}
    assert set(state) == set(student.state_dict())
    other = MeanTeacherConsistency(student)
    other.load_state_dict(state, student)
    assert all(torch.equal(state[k], v) for k, v in other.teacher.state_dict().items())
    other.load_state_dict(None, student)       # no saved teacher: it starts as the student
    assert all(torch.equal(student.state_dict()[k], v) for k, v in other.teacher.state_dict().items())


# ---------------------------------------------------------------------------------------------------------------
# the Mean Teacher trainer on the component
def _loss_only_trainer(cls, student):
    trainer = object.__new__(cls)
    trainer.label_manager = LabelManager({'background': 0, 'fg': 1}, None)
    trainer.network = student
    trainer.device = torch.device('cpu')
    trainer.loss = lambda seg, target: sum(s.float().pow(2).mean() for s in seg) * 0.01
    trainer.global_iteration, trainer.num_epochs, trainer.num_iterations_per_epoch = 2, 1, 10
    trainer.loss_components = trainer.build_loss_components()
    return trainer


@pytest.mark.parametrize('cls, first_row', [(nnUNetTrainerMeanTeacher, 2),
                                            (nnUNetTrainerMeanTeacher_consistencyAllRows, 0)])
def test_mean_teacher_trainer_terms(cls, first_row):
    torch.manual_seed(2)
    trainer = _loss_only_trainer(cls, _tiny_student())
    assert [c.name for c in trainer.loss_components] == ['cons'] and trainer.teacher is trainer.consistency.teacher
    assert trainer.consistency.state_key == 'teacher_weights'
    with torch.no_grad():
        for p in trainer.teacher.parameters():
            p.add_(0.3 * torch.randn_like(p))
    data, unlabeled = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    torch.manual_seed(3)
    terms = trainer.compute_loss_terms(data, None, {'data': unlabeled})
    x = torch.cat((data, unlabeled))
    torch.manual_seed(3)
    noise = torch.clamp(torch.randn_like(x[first_row:]) * 0.1, -0.2, 0.2)
    with torch.no_grad():
        seg = trainer.network(x)
        sup = sum(s[:2].pow(2).mean() for s in seg) * 0.01
        cons = ((_softmax(seg[0][first_row:]) - _softmax(trainer.teacher(x[first_row:] + noise))) ** 2).mean()
    w = 0.1 * math.exp(-5 * (1 - (2 / 10) / 0.4) ** 2)
    assert trainer.consistency_weight_now() == pytest.approx(w)
    assert terms['sup'].item() == pytest.approx(sup.item(), rel=1e-6)
    assert terms['cons'].item() == pytest.approx(cons.item(), rel=1e-6)
    assert terms['loss'].item() == pytest.approx(sup.item() + w * cons.item(), rel=1e-6)


@pytest.fixture
def ws(workspace, monkeypatch):
    workspace.set_process_env(monkeypatch)
    return workspace


def _make_trainer(ws):
    plans = json.load(open(os.path.join(ws.preprocessed, ws.plans + '.json')))
    plans['continue_training'] = False
    dataset_json = json.load(open(os.path.join(ws.preprocessed, 'dataset.json')))
    trainer = nnUNetTrainerMeanTeacher(plans, '3d_fullres', 0, dataset_json, torch.device('cpu'))
    trainer.initialize()
    return trainer


def test_checkpoint_in_the_pre_extraction_layout_resumes(ws, tmp_path):
    """The layout ``nnUNetTrainerMeanTeacher.save_checkpoint`` wrote before the component existed, spelled out
    key by key (not produced by the current code), loads: student, teacher, iteration, logged terms."""
    source = _make_trainer(ws)
    with torch.no_grad():
        for p in source.unwrapped_network.parameters():
            p.add_(0.25)
    teacher_weights = {k: v.clone() + 1.0 if v.is_floating_point() else v.clone()
                       for k, v in source.unwrapped_network.state_dict().items()}
    logging = source.logger.get_checkpoint()
    for key in ('train_losses', 'val_losses', 'train_sup', 'train_cons', 'lrs', 'epoch_end_timestamps',
                'epoch_start_timestamps', 'mean_fg_dice', 'ema_fg_dice', 'dice_per_class_or_region'):
        logging[key] = [[0.5]] if key == 'dice_per_class_or_region' else [0.5]
    old_layout = {
        'network_weights': source.unwrapped_network.state_dict(),
        'optimizer_state': source.optimizer.state_dict(),
        'grad_scaler_state': None,
        'logging': logging,
        '_best_ema': 0.5,
        'current_epoch': 1,
        'init_args': source.my_init_kwargs,
        'trainer_name': 'nnUNetTrainerMeanTeacher',
        'inference_allowed_mirroring_axes': (0, 1, 2),
        'semiseg': {'global_iteration': 250, 'teacher_weights': teacher_weights},
    }
    path = str(tmp_path / 'checkpoint_latest.pth')
    torch.save(old_layout, path)

    resumed = _make_trainer(ws)
    resumed.load_checkpoint(path)
    assert resumed.current_epoch == 1
    assert resumed.global_iteration == 250
    for k, v in resumed.teacher.state_dict().items():
        assert torch.equal(v, teacher_weights[k]), k
    for k, v in resumed.unwrapped_network.state_dict().items():
        assert torch.equal(v, old_layout['network_weights'][k]), k
    assert resumed.logger.local_logger.my_fantastic_logging['train_cons'] == [0.5]
    # the restored teacher keeps following the student by EMA
    key = 'decoder.seg_layers.0.weight'
    resumed.global_iteration = 2
    resumed.after_optimizer_step()
    expected = 2 / 3 * teacher_weights[key] + 1 / 3 * old_layout['network_weights'][key]
    assert torch.allclose(resumed.teacher.state_dict()[key], expected)
    # and it writes the same layout back
    resumed.save_checkpoint(str(tmp_path / 'again.pth'))
    again = torch.load(str(tmp_path / 'again.pth'), map_location='cpu', weights_only=False)
    assert set(again['semiseg']) == {'global_iteration', 'teacher_weights', 'schedule'}
    assert set(again['semiseg']['teacher_weights']) == set(teacher_weights)
