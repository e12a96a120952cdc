"""Unit tests of the shared base: ramps, EMA, consistency, loader, batch split, checkpoint state, discovery."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from nnunetv2_semiseg.losses.consistency import clipped_gaussian_noise, probability_mse
from nnunetv2_semiseg.networks.ema import create_ema_teacher, ema_decay_at_step, ema_update
from nnunetv2_semiseg.trainers.ramps import linear_rampup, sigmoid_rampup
from nnunetv2_semiseg.trainers.semi_supervised import split_batch_size_over_ranks


# ---------------------------------------------------------------------------------------------------------------
# ramps
def test_sigmoid_rampup_values():
    assert sigmoid_rampup(0.0, 0.4) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(0.2, 0.4) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(0.4, 0.4) == 1.0
    assert sigmoid_rampup(0.9, 0.4) == 1.0
    assert sigmoid_rampup(0.1, 0.0) == 1.0
    # SS-Net LA: iteration 3000 of 15000 with a 6000-iteration ramp = t 0.5.
    assert sigmoid_rampup(3000 / 15000, 6000 / 15000) == pytest.approx(math.exp(-1.25))


def test_linear_rampup_values():
    assert linear_rampup(0.0, 0.5) == 0.0
    assert linear_rampup(0.25, 0.5) == 0.5
    assert linear_rampup(0.75, 0.5) == 1.0
    assert linear_rampup(0.3, 0.0) == 1.0


# ---------------------------------------------------------------------------------------------------------------
# EMA teacher
def test_ema_update_values_and_warm_start():
    student = nn.Linear(2, 1)
    teacher = create_ema_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    with torch.no_grad():
        teacher.weight.fill_(1.0)
        student.weight.fill_(3.0)
    alpha = ema_update(teacher, student, step=1, decay=0.99)
    assert alpha == 0.5
    assert torch.allclose(teacher.weight, torch.full_like(teacher.weight, 2.0))
    alpha = ema_update(teacher, student, step=2, decay=0.99)   # alpha 2/3: 2*2/3 + 3/3
    assert alpha == pytest.approx(2 / 3)
    assert torch.allclose(teacher.weight, torch.full_like(teacher.weight, 2 * 2 / 3 + 3 / 3))
    assert ema_decay_at_step(10_000, 0.99) == 0.99


def test_ema_copies_buffers():
    student = nn.BatchNorm1d(3)
    teacher = create_ema_teacher(student)
    student.running_mean.fill_(5.0)
    ema_update(teacher, student, step=100, decay=0.99)
    assert torch.equal(teacher.running_mean, student.running_mean)


# ---------------------------------------------------------------------------------------------------------------
# consistency
def test_probability_mse_hand_value_and_teacher_is_detached():
    student_logits = torch.tensor([[[0.0, 1.0]], [[2.0, 0.0]]], requires_grad=True)  # (b=1, c=2, n=... ) shaped
    student = torch.softmax(student_logits.permute(1, 0, 2), 1)  # (1, 2, 2)
    teacher = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], requires_grad=True)
    loss = probability_mse(student, teacher)
    expected = ((student.detach() - teacher.detach()) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item())
    # by hand for the first voxel: p = softmax([0, 2]) = (0.1192, 0.8808) vs (1, 0)
    p0 = 1 / (1 + math.exp(2))
    voxel0 = ((p0 - 1) ** 2 + ((1 - p0) - 0) ** 2)
    p1 = 1 / (1 + math.exp(-1))  # softmax([1, 0])[0]
    voxel1 = ((p1 - 0) ** 2 + ((1 - p1) - 1) ** 2)
    assert loss.item() == pytest.approx((voxel0 + voxel1) / 4, rel=1e-5)
    loss.backward()
    assert student_logits.grad is not None and teacher.grad is None


def test_clipped_noise_bounds():
    torch.manual_seed(0)
    n = clipped_gaussian_noise(torch.zeros(10000), 0.1, 0.2)
    assert n.abs().max().item() <= 0.2 + 1e-7
    assert 0.08 < n.std().item() < 0.1  # clipping at 2 sigma shrinks the std slightly


# ---------------------------------------------------------------------------------------------------------------
# DDP batch split
def test_unlabeled_batch_split_over_ranks():
    assert [split_batch_size_over_ranks(5, 2, r) for r in range(2)] == [3, 2]
    assert [split_batch_size_over_ranks(4, 4, r) for r in range(4)] == [1, 1, 1, 1]
    with pytest.raises(ValueError, match='smaller than the number of GPUs'):
        split_batch_size_over_ranks(1, 2, 0)


# ---------------------------------------------------------------------------------------------------------------
# in-process trainer on the tiny dataset
def _make_trainer(ws, cls=None, configuration='3d_fullres'):
    from nnunetv2_semiseg.trainers.mean_teacher import nnUNetTrainerMeanTeacher
    cls = cls or nnUNetTrainerMeanTeacher
    plans = json.load(open(os.path.join(ws.preprocessed, ws.plans + '.json')))
    plans['continue_training'] = False
    dataset_json = json.load(open(os.path.join(ws.preprocessed, 'dataset.json')))
    trainer = cls(plans, configuration, 0, dataset_json, torch.device('cpu'))
    trainer.initialize()
    return trainer


@pytest.fixture
def ws(workspace, monkeypatch):
    workspace.set_process_env(monkeypatch)
    return workspace


def test_unlabeled_loader_patches_from_unlabeled_cases_only(ws):
    trainer = _make_trainer(ws)
    loader = trainer.get_unlabeled_dataloader()
    seen = set()
    for _ in range(4):
        batch = next(loader)
        assert tuple(batch['data'].shape) == (2, 1, 16, 32, 32)
        assert batch['data'].dtype == torch.float32
        seen.update(batch['keys'])
    assert seen and all(k.startswith('unl_') for k in seen)


def test_unlabeled_loader_two_views_share_spatial_transform(ws):
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.random import RandomTransform

    from nnunetv2_semiseg.data.unlabeled_loader import split_view_transforms
    from nnunetv2_semiseg.trainers.mean_teacher import nnUNetTrainerMeanTeacher

    class TwoViews(nnUNetTrainerMeanTeacher):
        unlabeled_two_views = True

    trainer = _make_trainer(ws, TwoViews)
    rot, dummy2d, initial, mirror = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    shared, per_view, tail = split_view_transforms(trainer.get_training_transforms(
        trainer.configuration_manager.patch_size, rot, None, mirror, dummy2d))
    assert any(isinstance(t, SpatialTransform) for t in shared.transforms)
    assert per_view.transforms and all(isinstance(t, RandomTransform) for t in per_view.transforms)
    augmenter = trainer.get_unlabeled_dataloader()  # in-process (nnUNet_n_proc_DA=0)
    batch = next(augmenter)
    a, b = batch['data'], batch['data_view2']
    assert a.shape == b.shape == (2, 1, 16, 32, 32)
    # Without the per-view intensity transforms the two views must be identical: crop, rotation, scaling and
    # mirroring are drawn once per sample and shared (a correlation check would be random: gamma may invert).
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    augmenter.data_loader.view_transforms = ComposeTransforms([])
    for _ in range(3):
        batch = next(augmenter)
        assert torch.equal(batch['data'], batch['data_view2'])


def test_checkpoint_roundtrip_of_semiseg_state(ws, tmp_path):
    trainer = _make_trainer(ws)
    with torch.no_grad():
        for p in trainer.teacher.parameters():
            p.add_(0.5)
    trainer.global_iteration = 17
    path = str(tmp_path / 'ck.pth')
    trainer.save_checkpoint(path)
    saved = torch.load(path, map_location='cpu', weights_only=False)
    assert saved['semiseg']['global_iteration'] == 17

    fresh = _make_trainer(ws)
    fresh.load_checkpoint(path)
    for (k, t1), t2 in zip(trainer.teacher.state_dict().items(), fresh.teacher.state_dict().values()):
        assert torch.equal(t1, t2), k
    student = fresh.unwrapped_network.state_dict()
    assert not torch.equal(next(iter(fresh.teacher.state_dict().values())), next(iter(student.values())))

    # A checkpoint without the key (a plain nnU-Net one) is tolerated: the teacher starts as the student.
    del saved['semiseg']
    for key in ('train_sup', 'train_cons'):
        saved['logging'].pop(key, None)
    saved['logging']['train_losses'] = [1.0, 0.9]
    other = _make_trainer(ws)
    other.load_checkpoint(saved)  # a dict works too (nnU-Net 2.8.1's own load_checkpoint fails on dicts)
    for t, s in zip(other.teacher.state_dict().values(), other.unwrapped_network.state_dict().values()):
        assert torch.equal(t, s)
    # Missing term logs are padded with NaN so progress.png keeps updating.
    logged = other.logger.local_logger.my_fantastic_logging
    assert len(logged['train_cons']) == 2 and all(np.isnan(logged['train_cons']))


def test_network_wrapper_keeps_stock_keys_and_outputs(ws):
    trainer = _make_trainer(ws)
    net = trainer.unwrapped_network
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    stock = nnUNetTrainer.build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, 1, 2, True)
    assert set(net.state_dict()) == set(stock.state_dict())
    stock.load_state_dict(net.state_dict())
    x = torch.randn(1, 1, 16, 32, 32)
    net.eval(), stock.eval()
    with torch.no_grad():
        plain = net(x)
        feats = net(x, return_features=True)
        reference = stock(x)
    for a, b, c in zip(plain, feats['seg'], reference):
        assert torch.allclose(a, b, atol=1e-6) and torch.allclose(a, c, atol=1e-6)
    assert feats['features'].shape == (1, 8, 16, 32, 32)  # last decoder stage, full resolution


def test_trainers_found_by_nnunet_search_in_fresh_interpreter(tmp_path):
    user_dir = tmp_path / 'my_trainers'
    user_dir.mkdir()
    env = dict(os.environ, nnUNet_extTrainer=str(user_dir))
    code = ('import os, pickle\n'
            'from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n'
            'a = find("nnUNetTrainerMeanTeacher"); b = find("nnUNetTrainerMeanTeacher")\n'
            'print(a.__module__, a is b, len(pickle.dumps(a)) > 0)\n'
            'print(os.environ["nnUNet_extTrainer"])\n')
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, encoding='utf-8', errors='replace',
                         check=True).stdout
    lines = out.strip().splitlines()
    assert lines[-2] == 'nnunetv2_semiseg.trainers.mean_teacher True True'
    entries = lines[-1].split(os.pathsep)
    assert entries[0] == str(user_dir)  # the user's entry is kept, and searched first
    assert entries[1].endswith(os.path.join('nnunetv2_semiseg', 'nnunet_ext'))
    # The manual fallback prints the same value as an export line.
    printed = subprocess.run(['nnUNetv2_semiseg_print_export'], env=env, capture_output=True, encoding='utf-8',
                             errors='replace', check=True).stdout.strip()
    assert printed == f'export nnUNet_extTrainer="{lines[-1]}"'
