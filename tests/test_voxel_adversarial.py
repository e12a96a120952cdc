"""nnUNetTrainerVoxelAdversarial: pure losses and routing against hand values, the sparse multi-resolution fusion
against dense upsampling, the discriminator heads, the wiring of the trainer's step on tiny networks (multi-class
2D, regions 3D), and the separation of the student and discriminator steps. End to end: test_voxel_adversarial_e2e.py
"""
import math

import pytest
import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from torch import nn

from nnunetv2_semiseg.losses.byol import byol_class_loss, byol_feature_loss
from nnunetv2_semiseg.losses.voxel_adversarial import (NO_CLASS, classes_from_labels, classes_from_probabilities,
                                                       discriminator_loss, generator_loss, sample_class_voxels)
from nnunetv2_semiseg.networks.semiseg_network import SemiSegNetwork
from nnunetv2_semiseg.networks.voxel_discriminator import VoxelDiscriminator, sample_levels, sample_upsampled
from nnunetv2_semiseg.trainers.voxel_adversarial import (nnUNetTrainerVoxelAdversarial,
                                                         nnUNetTrainerVoxelAdversarial_beta100,
                                                         nnUNetTrainerVoxelAdversarial_noAdv,
                                                         nnUNetTrainerVoxelAdversarial_noConsistency,
                                                         nnUNetTrainerVoxelAdversarial_noFeature)


def _sigmoid(v):
    return 1 / (1 + math.exp(-v))


# ----------------------------------------------------------------------------------------------------------------
# pure losses
# ----------------------------------------------------------------------------------------------------------------
def test_discriminator_and_generator_losses_hand_values():
    real, fake = torch.tensor([2.0, 1.0]), torch.tensor([0.5])
    expected_d = -(math.log(_sigmoid(2.0)) + math.log(_sigmoid(1.0))) / 2 - math.log(1 - _sigmoid(0.5))
    assert discriminator_loss(real, fake).item() == pytest.approx(expected_d, rel=1e-6)
    # labeled = real (target 1), unlabeled = fake (target 0): swapping the groups changes the value
    assert abs(discriminator_loss(fake, real).item() - expected_d) > 0.1
    assert generator_loss(fake).item() == pytest.approx(-math.log(_sigmoid(0.5)), rel=1e-6)   # pushed to "real"
    empty = torch.zeros(0)
    assert discriminator_loss(real, empty).item() == pytest.approx(
        -(math.log(_sigmoid(2.0)) + math.log(_sigmoid(1.0))) / 2, rel=1e-6)
    assert generator_loss(empty).item() == 0.0


def test_byol_loss_hand_value_all_same_class_pairs_and_stop_gradient():
    p = torch.tensor([[3.0, 0.0], [0.0, 2.0]], requires_grad=True)
    z = torch.tensor([[1.0, 0.0], [1.0, 1.0]], requires_grad=True)
    loss = byol_class_loss(p, z)
    # by hand: p_hat = (1,0),(0,1); z_hat = (1,0),(1,1)/sqrt2; mean over the 4 pairs of ||p_i - z_j||^2
    s = 1 / math.sqrt(2)
    pairs = [0.0, (1 - s) ** 2 + s ** 2, 2.0, s ** 2 + (1 - s) ** 2]
    assert loss.item() == pytest.approx(sum(pairs) / 4, rel=1e-6)
    loss.backward()
    assert p.grad is not None and p.grad.abs().sum() > 0 and z.grad is None
    # per class, then the mean over the classes present (class 2 has no voxel and is not counted)
    classes = torch.tensor([0, 0, 1])
    preds = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert byol_feature_loss(preds, targets, classes, range(3)).item() == pytest.approx((1.0 + 0.0) / 2)
    assert byol_feature_loss(preds, targets, torch.full((3,), NO_CLASS), range(3)).item() == 0.0


def test_routing_softmax_regions_ignore_and_confidence():
    labels = torch.tensor([[[0, 1, 2, 4]]])                       # (B=1, 1, 4); 4 = ignore label of 3 classes
    assert classes_from_labels(labels, 3, False, True).tolist() == [[0, 1, 2, NO_CLASS]]
    # regions (whole, core) + ignore channel: none -> 0, whole -> 1, whole+core -> 2, ignored -> NO_CLASS
    regions = torch.tensor([[[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]]]).float()
    assert classes_from_labels(regions, 3, True, True).tolist() == [[0, 1, 2, NO_CLASS]]
    probs = torch.tensor([[[0.8, 0.65, 0.1], [0.1, 0.2, 0.85], [0.1, 0.15, 0.05]]])   # (1, 3 classes, 3 voxels)
    assert classes_from_probabilities(probs, 0.7, False).tolist() == [[0, NO_CLASS, 1]]
    region_probs = torch.tensor([[[0.9, 0.9, 0.6], [0.05, 0.95, 0.1]]])             # (1, 2 regions, 3 voxels)
    assert classes_from_probabilities(region_probs, 0.7, True).tolist() == [[1, 2, NO_CLASS]]


def test_sampling_is_bounded_per_class_and_row():
    classes = torch.tensor([[0] * 10 + [1] * 3 + [NO_CLASS] * 5, [1] * 18])
    g = torch.Generator().manual_seed(0)
    rows, flat, labels = sample_class_voxels(classes, 2, 4, g)
    counts = {(r, c): int(((rows == r) & (labels == c)).sum()) for r in (0, 1) for c in (0, 1)}
    assert counts == {(0, 0): 4, (0, 1): 3, (1, 0): 0, (1, 1): 4}
    assert torch.equal(classes[rows, flat], labels)                      # every sample carries its own class
    assert len(set(zip(rows.tolist(), flat.tolist()))) == rows.numel()   # without replacement


@pytest.mark.parametrize('low, full', [((4, 8, 8), (16, 32, 32)), ((8, 16, 16), (16, 32, 32)), ((3, 5), (8, 12)),
                                       ((16, 16), (16, 16))])
def test_sparse_upsampling_equals_dense_interpolation(low, full):
    torch.manual_seed(0)
    fm = torch.randn(2, 3, *low, requires_grad=True)
    dense = F.interpolate(fm, size=full, mode='trilinear' if len(full) == 3 else 'bilinear', align_corners=False)
    rows = torch.tensor([1, 0, 1, 0, 1])
    flat = torch.randint(0, math.prod(full), (5,))
    flat[0] = 0
    flat[1] = math.prod(full) - 1                                          # corners: border clamping
    reference = dense.reshape(2, 3, -1)[rows, :, flat]
    sampled = sample_upsampled(fm, rows, flat, full)
    assert torch.allclose(sampled, reference, atol=1e-5)
    sampled.sum().backward()
    assert fm.grad.abs().sum() > 0                                          # the student gets the gradient


def test_discriminator_head_of_class_c_scores_class_c_voxels_only():
    torch.manual_seed(0)
    d = VoxelDiscriminator([4, 8], num_heads=3, dim=16)
    levels = [torch.randn(5, 4), torch.randn(5, 8)]
    classes = torch.tensor([2, 2, 0, 2, 0])
    out = d(levels, classes)
    out.sum().backward()
    grad_rows = d.heads.weight.grad.abs().sum(1)
    assert grad_rows[0] > 0 and grad_rows[2] > 0 and grad_rows[1] == 0      # head 1 scores nobody
    before = d(levels, classes).detach()
    with torch.no_grad():
        d.heads.weight[1].add_(5.0)
        d.heads.bias[1].add_(5.0)
    assert torch.equal(d(levels, classes).detach(), before)               # changing head 1 changes no voxel
    with torch.no_grad():
        d.heads.bias[2].add_(1.0)
    changed = d(levels, classes).detach() != before
    assert changed.tolist() == [True, True, False, True, False]            # head 2 changes exactly its voxels


# ----------------------------------------------------------------------------------------------------------------
# trainer wiring on tiny networks, without the nnU-Net data pipeline
# ----------------------------------------------------------------------------------------------------------------
def _unet(dim, num_outputs, stages=4):
    conv = nn.Conv2d if dim == 2 else nn.Conv3d
    norm = nn.InstanceNorm2d if dim == 2 else nn.InstanceNorm3d
    return PlainConvUNet(1, stages, (4, 8, 16, 16)[:stages], conv, 3, (1, 2, 2, 2)[:stages], (1,) * stages,
                         num_outputs, (1,) * (stages - 1), conv_bias=True, norm_op=norm,
                         norm_op_kwargs={'affine': True}, nonlin=nn.LeakyReLU, deep_supervision=True)


def _sup_stand_in(seg_outputs, target):
    return sum(s.float().pow(2).mean() for s in seg_outputs) * 0.01


def _trainer(cls, label_manager, dim, stages=4, seed=0):
    torch.manual_seed(seed)
    num_outputs = label_manager.num_segmentation_heads
    base = _unet(dim, num_outputs, stages)
    trainer = object.__new__(cls)
    trainer.label_manager = label_manager
    trainer.network = SemiSegNetwork(base, cls.build_training_heads(base, num_outputs))
    trainer.device = torch.device('cpu')
    trainer.is_ddp, trainer.local_rank = False, 0
    trainer.loss = _sup_stand_in
    trainer.global_iteration, trainer.num_epochs, trainer.num_iterations_per_epoch = 3, 1, 10
    trainer.loss_components = trainer.build_loss_components()
    return trainer


def _ds(full):
    return [full, full[..., ::2, ::2] if full.dim() == 4 else full[:, :, :, ::2, ::2]]


def _perturb(module, scale=0.3):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


ACDC = LabelManager({'background': 0, 'RV': 1, 'Myo': 2, 'LV': 3}, None)


def test_multiclass_2d_step_terms_gradients_and_no_gradient_to_teacher_or_discriminator():
    trainer = _trainer(nnUNetTrainerVoxelAdversarial, ACDC, 2)
    with torch.no_grad():   # a confident teacher (a random one is not), so unlabeled voxels pass the 0.7 threshold
        trainer.teacher.decoder.seg_layers[-1].weight.mul_(100)
    assert [c.name for c in trainer.loss_components] == ['adv', 'feature', 'cons']
    assert trainer.adversarial.discriminator.num_heads == 4 and trainer.consistency.rows == 'all'
    assert len(trainer.adversarial.discriminator.fusion.level_convs) == 4   # first four encoder levels
    data, unlabeled = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16)
    gt = torch.randint(0, 4, (2, 1, 16, 16))
    terms = trainer.compute_loss_terms(data, _ds(gt), {'data': unlabeled})
    assert set(terms) >= {'loss', 'sup', 'adv', 'feature', 'cons'}
    assert all(torch.isfinite(terms[k]) for k in ('sup', 'adv', 'feature', 'cons'))
    assert terms['adv'].item() > 0 and terms['feature'].item() > 0 and terms['cons'].item() > 0
    gamma = 0.001 * math.exp(-5 * (1 - 0.3) ** 2)
    assert terms['loss'].item() == pytest.approx(terms['sup'].item() + 0.01 * terms['adv'].item()
                                                 + 0.1 * terms['feature'].item() + gamma * terms['cons'].item(),
                                                 rel=1e-5)
    assert int((~trainer.adversarial.pending[2]).sum()) > 0                # some unlabeled voxels were scored
    terms['loss'].backward()
    assert [n for n, p in trainer.network.named_parameters() if p.grad is None] == []   # DDP-safe
    assert trainer.network.heads.predictor[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in trainer.teacher.parameters())
    assert all(p.grad is None for p in trainer.adversarial.discriminator.parameters())


def _controlled_context(trainer, data, gt, unlabeled, teacher_probabilities):
    """The trainer's step context with the teacher pass replaced by given probabilities (pseudo-labels)."""
    x = torch.cat((data, unlabeled))
    context = trainer.make_context(trainer.network, x, _ds(gt), data.shape[0])
    teacher = trainer.consistency.teacher_outputs(x)
    teacher['probabilities'] = teacher_probabilities
    context.cache[trainer.consistency.cache_key] = teacher
    return context


def test_adversarial_real_fake_rows_and_confidence_threshold():
    torch.manual_seed(1)
    trainer = _trainer(nnUNetTrainerVoxelAdversarial, ACDC, 2)
    component = trainer.adversarial
    component.routing.voxels_per_class = 1000                   # all voxels: the test sees every routed voxel
    data, unlabeled = torch.randn(1, 1, 16, 16), torch.randn(1, 1, 16, 16)
    gt = torch.randint(0, 4, (1, 1, 16, 16))
    probabilities = torch.full((2, 4, 16, 16), 0.25)
    probabilities[1, :, :, :8] = 0.1 / 3
    probabilities[1, 3, :, :8] = 0.9                           # unlabeled row: confident LV on the left half,
    probabilities[1, :, :, 8:] = 0.4 / 3
    probabilities[1, 2, :, 8:] = 0.6                           # an unconfident Myo guess on the right half
    context = _controlled_context(trainer, data, gt, unlabeled, probabilities)
    levels, classes, is_real = component.sampled_voxels(context)
    assert int(is_real.sum()) == 256 and int((~is_real).sum()) == 128     # 16x16 labeled, left half unlabeled
    assert torch.equal(torch.sort(classes[is_real]).values, torch.sort(gt.flatten()).values)   # ground truth
    assert (classes[~is_real] == 3).all()                                  # teacher pseudo-label, confident only
    # the fake voxels are the unlabeled row's features (row 1), the real ones the labeled row's (row 0)
    skips = context.out['skips'][:4]
    rows, flat, _ = component.routing.sample(torch.cat((component.routing.labeled_classes(context),
                                                         component.routing.pseudo_classes(probabilities[1:]))))
    assert torch.equal(rows < 1, is_real)
    assert all(torch.allclose(v, r) for v, r in zip(levels, sample_levels(skips, rows, flat, (16, 16))))
    unlabeled_flat = flat[rows == 1]
    assert ((unlabeled_flat % 16) < 8).all()                               # left half only: under 0.7 excluded
    loss = component.loss(context)
    with torch.no_grad():
        fake_levels = [v[~is_real] for v in levels]
        expected = -F.logsigmoid(component.discriminator(fake_levels, classes[~is_real]).float()).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()                         # the generator loss reaches the encoder through the deepest level used
    assert trainer.network.encoder.stages[3][0].convs[0].conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in component.discriminator.parameters())


def test_epoch_log_counts_each_heads_voxels_and_names_heads_without_unlabeled_voxels():
    """The per-epoch line counts, per head, the labeled (ground truth) and the confident unlabeled voxels each
    loss() sampled, and names the heads that got no unlabeled voxel (on real ACDC after 300 iterations the RV head
    got none: the teacher reached 0.7 nowhere in RV). The count resets after each epoch's line."""
    torch.manual_seed(1)
    trainer = _trainer(nnUNetTrainerVoxelAdversarial, ACDC, 2)
    trainer.pseudo_label_threshold = 0.7
    component = trainer.adversarial
    component.routing.voxels_per_class = 1000
    data, unlabeled = torch.randn(1, 1, 16, 16), torch.randn(1, 1, 16, 16)
    gt = torch.randint(0, 4, (1, 1, 16, 16))
    probabilities = torch.full((2, 4, 16, 16), 0.25)
    probabilities[1, :, :, :8] = 0.1 / 3
    probabilities[1, 3, :, :8] = 0.9                            # confident LV on the left half only
    for _ in range(2):                                          # two steps of one epoch
        component.loss(_controlled_context(trainer, data, gt, unlabeled, probabilities))
    real = [2 * int((gt == c).sum()) for c in range(4)]
    lines = trainer.adversarial_voxel_lines()
    assert lines[0].endswith(f'background {real[0]}/0, RV {real[1]}/0, Myo {real[2]}/0, LV {real[3]}/256')
    assert 'teacher confidence >= 0.7' in lines[0]
    assert lines[1].startswith('adv: no unlabeled voxel reached the head(s) background, RV, Myo this epoch')
    component.loss(_controlled_context(trainer, data, gt, unlabeled, torch.full((2, 4, 16, 16), 0.25)))
    lines = trainer.adversarial_voxel_lines()                   # the next epoch: counted from zero
    assert lines[0].endswith(f'background {real[0] // 2}/0, RV {real[1] // 2}/0, Myo {real[2] // 2}/0, '
                             f'LV {real[3] // 2}/0')
    assert trainer.head_names() == ['background', 'RV', 'Myo', 'LV']
    regions = object.__new__(nnUNetTrainerVoxelAdversarial)
    regions.label_manager = LabelManager({'background': 0, 'whole': (1, 2), 'core': 2}, [1, 2])
    assert regions.head_names() == ['no region', 'whole', 'core']


def test_discriminator_step_changes_only_the_discriminator_and_student_step_only_the_student():
    trainer = _trainer(nnUNetTrainerVoxelAdversarial, ACDC, 2, seed=2)
    optimizer = torch.optim.SGD(trainer.network.parameters(), lr=0.1)
    disc = trainer.adversarial.discriminator
    data, unlabeled = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16)
    gt = torch.randint(0, 4, (2, 1, 16, 16))
    d_before = {k: v.clone() for k, v in disc.state_dict().items()}
    s_before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    terms = trainer.compute_loss_terms(data, _ds(gt), {'data': unlabeled})
    terms['loss'].backward()
    optimizer.step()
    assert all(torch.equal(v, d_before[k]) for k, v in disc.state_dict().items())
    assert any(not torch.equal(v, s_before[k]) for k, v in trainer.network.state_dict().items())
    # the D step on the kept, detached voxels: its loss is BCE(real, 1) + BCE(fake, 0) of those voxels
    levels, classes, is_real = trainer.adversarial.pending
    with torch.no_grad():
        logits = disc(levels, classes)
        expected = (-F.logsigmoid(logits[is_real]).mean() - F.logsigmoid(-logits[~is_real]).mean()).item()
    s_after = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    trainer.global_iteration += 1
    trainer.after_optimizer_step()                       # EMA update, then the discriminator step
    assert terms['disc'].item() == pytest.approx(expected, rel=1e-5)
    assert all(torch.equal(v, s_after[k]) for k, v in trainer.network.state_dict().items())
    assert any(not torch.equal(v, d_before[k]) for k, v in disc.state_dict().items())
    assert trainer.adversarial.pending is None
    with pytest.raises(RuntimeError, match='before loss'):
        trainer.adversarial.discriminator_step()


def test_byol_target_is_the_teacher_projection_of_the_same_voxels():
    torch.manual_seed(3)
    trainer = _trainer(nnUNetTrainerVoxelAdversarial, ACDC, 2, seed=3)
    _perturb(trainer.teacher)                                 # teacher != student, as after some EMA steps
    byol = trainer.loss_components[1]
    byol.routing.generator = torch.Generator().manual_seed(5)
    data, unlabeled = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16)
    gt = torch.randint(0, 4, (2, 1, 16, 16))
    x = torch.cat((data, unlabeled))
    context = trainer.make_context(trainer.network, x, _ds(gt), 2)
    loss = byol.loss(context)
    byol.routing.generator = torch.Generator().manual_seed(5)
    rows, flat, classes = byol.routing.sample(byol.routing.labeled_classes(context))
    assert (rows < 2).all()                                              # labeled rows only
    teacher_skips = [s[:2] for s in context.cache[trainer.consistency.cache_key]['skips'][:4]]
    student_skips = [s[:2] for s in context.out['skips'][:4]]
    heads, teacher_heads = trainer.network.heads, trainer.teacher.heads
    with torch.no_grad():
        p = F.normalize(heads.project_and_predict(sample_levels(student_skips, rows, flat, (16, 16))), dim=1)
        z = F.normalize(teacher_heads.project(sample_levels(teacher_skips, rows, flat, (16, 16))), dim=1)
        per_class = [2 - 2 * (p[classes == c].mean(0) * z[classes == c].mean(0)).sum()
                     for c in range(4) if (classes == c).any()]
        expected = torch.stack(per_class).mean()
        # the student's own projection as target gives another value: the test sees which target is used
        z_student = F.normalize(heads.project(sample_levels(student_skips, rows, flat, (16, 16))), dim=1)
        wrong = torch.stack([2 - 2 * (p[classes == c].mean(0) * z_student[classes == c].mean(0)).sum()
                             for c in range(4) if (classes == c).any()]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(wrong.item() - expected.item()) > 1e-4
    loss.backward()
    assert all(p.grad is None for p in trainer.teacher.parameters())
    assert trainer.network.encoder.stages[0][0].convs[0].conv.weight.grad.abs().sum() > 0   # features not detached


def test_regions_3d_with_ignore_and_three_encoder_levels():
    lm = LabelManager({'background': 0, 'whole': [1, 2], 'core': [2], 'ignore': 3}, [1, 2])
    trainer = _trainer(nnUNetTrainerVoxelAdversarial, lm, 3, stages=3, seed=4)
    assert trainer.adversarial.discriminator.num_heads == 3                # 2 regions + "in no region"
    assert len(trainer.adversarial.discriminator.fusion.level_convs) == 3  # the plans have only 3 stages
    data, unlabeled = torch.randn(1, 1, 8, 16, 16), torch.randn(1, 1, 8, 16, 16)
    whole = (torch.rand(1, 1, 8, 16, 16) > 0.5).float()
    core = whole * (torch.rand(1, 1, 8, 16, 16) > 0.5).float()
    ignore = torch.zeros_like(whole)
    ignore[..., :2, :, :] = 1
    target = torch.cat((whole, core, ignore), 1)
    terms = trainer.compute_loss_terms(data, _ds(target), {'data': unlabeled})
    assert all(torch.isfinite(terms[k]) for k in ('sup', 'adv', 'feature', 'cons'))
    levels, classes, is_real = trainer.adversarial.pending
    assert classes[is_real].max() <= 2 and classes.min() >= 0
    terms['loss'].backward()
    assert [n for n, p in trainer.network.named_parameters() if p.grad is None] == []
    trainer.global_iteration += 1
    trainer.after_optimizer_step()
    assert torch.isfinite(terms['disc'])


def test_no_confident_voxel_and_no_labeled_voxel_still_give_every_parameter_a_gradient():
    """A rank whose batch has nothing to score still runs every loss (zero-weighted), so DDP never waits."""
    trainer = _trainer(nnUNetTrainerVoxelAdversarial, ACDC, 2, seed=5)
    data, unlabeled = torch.randn(1, 1, 16, 16), torch.randn(1, 1, 16, 16)
    gt = torch.full((1, 1, 16, 16), 5)                                      # ignore label everywhere
    x = torch.cat((data, unlabeled))
    context = _controlled_context(trainer, data, gt, unlabeled, torch.full((2, 4, 16, 16), 0.25))
    adv = trainer.adversarial.loss(context)
    feature = trainer.loss_components[1].loss(context)
    assert adv.item() == 0.0 and feature.item() == 0.0
    (adv + feature + trainer.network(x)[0].sum() * 0).backward()
    assert all(p.grad is not None for p in trainer.network.heads.parameters())
    disc = trainer.adversarial.discriminator_step()
    assert disc.item() == 0.0
    assert all(p.grad is not None for p in trainer.adversarial.discriminator.parameters())


def test_variants_switch_terms_modules_and_weights():
    lm = LabelManager({'background': 0, 'fg': 1}, None)
    no_adv = _trainer(nnUNetTrainerVoxelAdversarial_noAdv, lm, 2)
    assert no_adv.adversarial is None and [c.name for c in no_adv.loss_components] == ['feature', 'cons']
    assert no_adv.loss_term_names == ('sup', 'feature', 'cons')
    no_feature = _trainer(nnUNetTrainerVoxelAdversarial_noFeature, lm, 2)
    assert no_feature.network.heads is None and [c.name for c in no_feature.loss_components] == ['adv', 'cons']
    no_cons = _trainer(nnUNetTrainerVoxelAdversarial_noConsistency, lm, 2)
    assert no_cons.consistency.weight_at(0.9) == 0.0
    assert _trainer(nnUNetTrainerVoxelAdversarial_beta100, lm, 2).loss_components[1].weight == 100.0
    full = _trainer(nnUNetTrainerVoxelAdversarial, lm, 2)
    assert full.consistency.weight_at(0.5) == pytest.approx(0.001 * math.exp(-5 * 0.25))
    assert full.adversarial.optimizer.defaults['lr'] == 2e-4
    assert full.adversarial.optimizer.defaults['betas'] == (0.5, 0.999)
