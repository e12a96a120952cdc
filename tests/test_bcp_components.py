"""BCP's pure pieces on hand-built tensors: the box mask, copy-paste mixing in both directions (every
deep-supervision level), the region-weighted DC+CE against hand-computed numbers, largest-component filtering and
the teacher (constant EMA, one-time initialisation, no gradient)."""
import itertools

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.helpers import softmax_helper_dim1
from torch import nn

from nnunetv2_semiseg.losses.copy_paste import box_mask, box_size, copy_paste, region_weighted_dc_ce
from nnunetv2_semiseg.networks.semiseg_network import SemiSegNetwork
from nnunetv2_semiseg.trainers.components import StepContext
from nnunetv2_semiseg.trainers.bcp_components import (BCPTeacher, BidirectionalCopyPaste, BoxMaskGenerator,
                                                      keep_largest_component_per_class)


def _dice(batch_dice=False):
    return MemoryEfficientSoftDiceLoss(apply_nonlin=softmax_helper_dim1, batch_dice=batch_dice, do_bg=False,
                                       smooth=1e-5, ddp=False)


# ----------------------------------------------------------------------------------------------------------------
# mask
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('shape', [(16, 32, 32), (20, 7, 9), (32, 32), (5, 4)])
def test_box_covers_two_thirds_of_every_dimension_and_stays_inside(shape):
    expected = tuple(int(round(2 / 3 * s)) for s in shape)
    assert box_size(shape, 2 / 3) == expected
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = box_mask(shape, 2 / 3, rng)
        assert m.shape == shape and set(m.unique().tolist()) <= {0.0, 1.0}
        zeros = (m == 0).nonzero()
        low, high = zeros.min(0).values, zeros.max(0).values
        assert tuple((high - low + 1).tolist()) == expected           # one box of exactly that size...
        assert int((m == 0).sum()) == int(np.prod(expected))            # ...with nothing outside it
        assert (low >= 0).all() and all(h < s for h, s in zip(high.tolist(), shape))


def test_every_box_position_is_drawn_including_the_last():
    rng = np.random.default_rng(1)
    corners = set()
    for _ in range(120):                                                # P(a corner never drawn) < 1e-8
        m = box_mask((5, 4), 2 / 3, rng)                                # box (3, 3): corners {0,1,2} x {0,1}
        corners.add(tuple((m == 0).nonzero().min(0).values.tolist()))
    assert corners == set(itertools.product(range(3), range(2)))


def test_mask_generator_is_a_function_of_seed_rank_and_step():
    a, b = BoxMaskGenerator(2 / 3, seed=7), BoxMaskGenerator(2 / 3, seed=7)
    assert torch.equal(a.mask((16, 32, 32), 5), b.mask((16, 32, 32), 5))
    masks = [a.mask((16, 32, 32), step) for step in range(6)]
    assert any(not torch.equal(masks[0], m) for m in masks[1:])
    assert any(not torch.equal(a.mask((16, 32, 32), s, rank=0), a.mask((16, 32, 32), s, rank=1)) for s in range(6))
    c = BoxMaskGenerator(2 / 3, seed=123)
    c.load_state_dict(a.state_dict())
    assert c.seed == 7 and torch.equal(c.mask((16, 32, 32), 3), a.mask((16, 32, 32), 3))


# ----------------------------------------------------------------------------------------------------------------
# mixing
# ----------------------------------------------------------------------------------------------------------------
def test_mixed_inputs_and_targets_match_a_hand_built_example_in_both_directions():
    bcp = BidirectionalCopyPaste().use_loss_pieces(_dice(), ds_scales=[[1, 1], [0.5, 0.5]])
    mask = torch.ones(4, 4)
    mask[1:3, 0:2] = 0                                                  # box: rows 1-2, columns 0-1
    x_l = torch.stack([torch.full((1, 4, 4), 1.0), torch.full((1, 4, 4), 2.0)])
    u = torch.stack([torch.full((1, 4, 4), -1.0), torch.full((1, 4, 4), -2.0)])
    y_l = torch.stack([torch.full((1, 4, 4), 1), torch.full((1, 4, 4), 2)]).to(torch.int16)
    p = torch.stack([torch.full((1, 4, 4), 3), torch.full((1, 4, 4), 4)])
    patches = bcp.self_training_patches(x_l, y_l, u, p, mask)
    assert patches.x.shape == (4, 1, 4, 4)
    inside = ~mask.bool()
    for row, (outside_value, box_value) in enumerate([(1, -1), (2, -2), (-2, 1), (-1, 2)]):
        # rows 0, 1: x_in = x_l * M + u * (1 - M); rows 2, 3: x_out = u' * M + x_l * (1 - M), u' = u shifted by one
        expected = torch.where(inside, torch.tensor(float(box_value)), torch.tensor(float(outside_value)))
        assert torch.equal(patches.x[row, 0], expected), row
    for row, (outside_label, box_label) in enumerate([(1, 3), (2, 4), (4, 1), (3, 2)]):
        expected = torch.where(inside, torch.tensor(box_label), torch.tensor(outside_label)).to(torch.int16)
        assert torch.equal(patches.target_levels[0][row, 0], expected), row
    assert patches.target_levels[0].dtype == torch.int16
    # level 1 (2x2): nearest-exact picks pixels (1|3, 1|3): the box covers pixel (1, 1) only
    level_mask = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    assert torch.equal(patches.mask_levels[1][0, 0], level_mask)
    assert torch.equal(patches.target_levels[1][0, 0], torch.tensor([[3, 1], [1, 1]], dtype=torch.int16))
    assert torch.equal(patches.target_levels[1][2, 0], torch.tensor([[1, 4], [4, 4]], dtype=torch.int16))
    assert [d[0] for d in patches.directions] == ['inward', 'outward']
    assert [(d[2], d[3]) for d in patches.directions] == [(1.0, 0.5), (0.5, 1.0)]


def test_pretraining_mixes_each_labeled_patch_with_the_previous_one():
    bcp = BidirectionalCopyPaste().use_loss_pieces(_dice())
    mask = torch.ones(2, 3)
    mask[:, 0] = 0
    x = torch.arange(3, dtype=torch.float32)[:, None, None, None].expand(3, 1, 2, 3)
    y = torch.arange(3)[:, None, None, None].expand(3, 1, 2, 3) + 10
    patches = bcp.pretraining_patches(x, y, mask)
    for row, previous in enumerate([2, 0, 1]):
        assert torch.equal(patches.x[row, 0], torch.tensor([[previous, row, row]] * 2, dtype=torch.float32))
        assert torch.equal(patches.target_levels[0][row, 0], torch.tensor([[previous, row, row]] * 2) + 10)
    assert patches.directions == [('pretrain', slice(0, 3), 1.0, 1.0)]


def test_copy_paste_keeps_integer_labels_integer():
    out = copy_paste(torch.tensor([1, 2]), torch.tensor([7, 8]), torch.tensor([1.0, 0.0]))
    assert out.tolist() == [1, 8] and out.dtype == torch.int64


# ----------------------------------------------------------------------------------------------------------------
# region-weighted DC+CE
# ----------------------------------------------------------------------------------------------------------------
def _hand_loss(logits, labels, regions, smooth=1e-5, weight_dice=1.0, weight_ce=1.0):
    """Independent numpy version of the formula (one image, classes 0/1, Dice over foreground only)."""
    z = logits.double().numpy()[0].reshape(2, -1)
    y = labels.numpy().reshape(-1)
    p = np.exp(z) / np.exp(z).sum(0)
    ce = -np.log(p[y, np.arange(y.size)])
    total = 0.0
    for region, weight in regions:
        r = region.numpy().reshape(-1).astype(float)
        fg = (y == 1).astype(float)
        dice = (2 * (p[1] * fg * r).sum() + smooth) / ((fg * r).sum() + (p[1] * r).sum() + smooth)
        total += weight * (weight_dice * -dice + weight_ce * (ce * r).sum() / r.sum())
    return total


def test_region_weighted_loss_equals_the_hand_computed_value():
    logits = torch.tensor([[[[0.2, -1.0, 0.5, 2.0, 0.0, -0.3]], [[1.0, 0.3, -0.5, 1.5, 0.7, 0.1]]]])
    labels = torch.tensor([[[[1, 0, 1, 1, 0, 0]]]])
    gt_region = torch.tensor([[[[1.0, 1.0, 0.0, 0.0, 1.0, 0.0]]]])
    regions = [(gt_region, 1.0), (1 - gt_region, 0.5)]
    value = region_weighted_dc_ce(logits, labels, regions, _dice())
    assert value.item() == pytest.approx(_hand_loss(logits, labels, regions), rel=1e-6)
    # each part separately: ground truth 1, pseudo-labels 0.5 in the CE part and in the Dice part
    ce_only = region_weighted_dc_ce(logits, labels, regions, _dice(), weight_dice=0.0)
    assert ce_only.item() == pytest.approx(_hand_loss(logits, labels, regions, weight_dice=0.0), rel=1e-6)
    dice_only = region_weighted_dc_ce(logits, labels, regions, _dice(), weight_ce=0.0)
    assert dice_only.item() == pytest.approx(_hand_loss(logits, labels, regions, weight_ce=0.0), rel=1e-6)
    swapped = region_weighted_dc_ce(logits, labels, [(gt_region, 0.5), (1 - gt_region, 1.0)], _dice())
    assert swapped.item() != pytest.approx(value.item(), rel=1e-3)


def test_region_weights_scale_the_gradient_of_their_voxels():
    logits = torch.randn(1, 2, 1, 6, generator=torch.Generator().manual_seed(0), requires_grad=True)
    labels = torch.tensor([[[[1, 0, 1, 1, 0, 0]]]])
    gt = torch.tensor([[[[1.0, 1.0, 1.0, 0.0, 0.0, 0.0]]]])
    region_weighted_dc_ce(logits, labels, [(gt, 1.0), (1 - gt, 0.5)], _dice(), weight_dice=0.0).backward()
    half = logits.grad.clone()
    logits.grad = None
    region_weighted_dc_ce(logits, labels, [(gt, 1.0), (1 - gt, 1.0)], _dice(), weight_dice=0.0).backward()
    full = logits.grad
    assert torch.allclose(half[..., :3], full[..., :3]) and torch.allclose(half[..., 3:], 0.5 * full[..., 3:])


def test_one_region_of_weight_one_is_nnunets_dc_and_ce():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 3, 5, 6), torch.randint(0, 3, (2, 1, 5, 6))
    nnunet = DC_and_CE_loss({'batch_dice': True, 'smooth': 1e-5, 'do_bg': False, 'ddp': False}, {},
                            dice_class=MemoryEfficientSoftDiceLoss)
    ours = region_weighted_dc_ce(logits, labels, [(torch.ones(1, 1, 5, 6), 1.0)], nnunet.dc)
    assert ours.item() == pytest.approx(nnunet(logits, labels).item(), rel=1e-5)


def test_ignore_label_voxels_belong_to_no_region():
    logits = torch.tensor([[[[0.2, -1.0, 0.5, 2.0]], [[1.0, 0.3, -0.5, 1.5]]]])
    region = torch.ones(1, 1, 1, 4)
    with_ignore = region_weighted_dc_ce(logits, torch.tensor([[[[1, 0, 2, 1]]]]), [(region, 1.0)], _dice(),
                                        ignore_label=2)
    kept = torch.tensor([[[[1.0, 1.0, 0.0, 1.0]]]])
    expected = _hand_loss(logits, torch.tensor([[[[1, 0, 0, 1]]]]), [(kept, 1.0)])
    assert with_ignore.item() == pytest.approx(expected, rel=1e-6)


def test_direction_losses_apply_the_weights_at_every_deep_supervision_level():
    ds_weights = (2 / 3, 1 / 3)
    bcp = BidirectionalCopyPaste(u_weight=0.5).use_loss_pieces(_dice(), ds_weights=ds_weights,
                                                                  ds_scales=[[1, 1], [0.5, 0.5]])
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(4, 4)
    mask[0:3, 1:4] = 0
    x_l, u = torch.randn(1, 1, 4, 4, generator=g), torch.randn(1, 1, 4, 4, generator=g)
    y_l, p = torch.randint(0, 2, (1, 1, 4, 4), generator=g), torch.randint(0, 2, (1, 1, 4, 4), generator=g)
    patches = bcp.self_training_patches(x_l, y_l, u, p, mask)
    outputs = [torch.randn(2, 2, 4, 4, generator=g), torch.randn(2, 2, 2, 2, generator=g)]
    losses = bcp.direction_losses(outputs, patches)
    for name, row, (w_m, w_box) in (('inward', 0, (1.0, 0.5)), ('outward', 1, (0.5, 1.0))):
        expected = 0.0
        for k, w in enumerate(ds_weights):
            m = patches.mask_levels[k]
            expected += w * _hand_loss(outputs[k][row:row + 1], patches.target_levels[k][row:row + 1],
                                       [(m, w_m), (1 - m, w_box)])
        assert losses[name].item() == pytest.approx(expected, rel=1e-6), name
    # as a LossComponent: the same sum, read from a StepContext of the mixed patches
    context = StepContext(net=None, x=patches.x, num_labeled=1, target=patches.target_levels, out={'seg': outputs},
                          fraction=0.5, to_probabilities=None, to_hard_labels=None, cache={'bcp_patches': patches})
    assert bcp.loss(context).item() == pytest.approx((losses['inward'] + losses['outward']).item(), rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# pseudo-labels
# ----------------------------------------------------------------------------------------------------------------
def test_largest_component_per_class_is_kept_corners_connect():
    labels = np.zeros((3, 6, 6), dtype=np.int64)
    labels[0, 0:2, 0:2] = 1                 # class 1: 4 voxels...
    labels[1, 2, 2] = 1                     # ...plus one touching them only at a corner: same component (5)
    labels[2, 5, 0:3] = 1                   # class 1: 3 voxels elsewhere -> removed
    labels[0, 4:6, 4:6] = 2                 # class 2: 4 voxels -> kept
    labels[2, 0, 5] = 2                     # class 2: 1 voxel -> removed
    out = keep_largest_component_per_class(labels, (1, 2))
    expected = labels.copy()
    expected[2, 5, 0:3] = 0
    expected[2, 0, 5] = 0
    assert np.array_equal(out, expected)


def test_pseudo_labels_threshold_argmax_and_lcc_switch():
    logits = torch.zeros(1, 2, 1, 6)
    logits[0, 1, 0] = torch.tensor([2.0, 2.0, 0.0, -1.0, 2.0, -3.0])  # p1 = 0.5 at voxel 2 counts as foreground
    assert BidirectionalCopyPaste().pseudo_labels(logits)[0, 0, 0].tolist() == [1, 1, 1, 0, 0, 0]
    assert BidirectionalCopyPaste(keep_largest_component=False).pseudo_labels(logits)[0, 0, 0].tolist() == \
        [1, 1, 1, 0, 1, 0]
    multi = torch.tensor([[[[3.0, 0.0, 0.0]], [[0.0, 3.0, 0.0]], [[0.0, 0.0, 3.0]]]])
    assert BidirectionalCopyPaste().pseudo_labels(multi)[0, 0, 0].tolist() == [0, 1, 2]


# ----------------------------------------------------------------------------------------------------------------
# teacher
# ----------------------------------------------------------------------------------------------------------------
def _student():
    base = PlainConvUNet(1, 2, (4, 8), nn.Conv2d, 3, (1, 2), (1, 1), 2, (1,), conv_bias=True,
                         norm_op=nn.InstanceNorm2d, norm_op_kwargs={'affine': True}, nonlin=nn.LeakyReLU,
                         deep_supervision=True)
    return SemiSegNetwork(base)


def test_teacher_is_initialised_once_then_follows_a_constant_ema():
    student = _student()
    teacher = BCPTeacher(student, ema_decay=0.99)
    key = 'decoder.seg_layers.0.weight'
    with torch.no_grad():
        student.state_dict()[key].fill_(4.0)
    teacher.after_optimizer_step(student, step=1)                       # not initialised: no update
    assert not torch.allclose(teacher.teacher.state_dict()[key], torch.full_like(student.state_dict()[key], 4.0))
    teacher.initialise_from(student)
    assert teacher.initialised and torch.equal(teacher.teacher.state_dict()[key], student.state_dict()[key])
    with torch.no_grad():
        student.state_dict()[key].fill_(5.0)
    teacher.after_optimizer_step(student, step=1)                       # constant 0.99, no warm start at step 1
    assert torch.allclose(teacher.teacher.state_dict()[key], torch.full_like(student.state_dict()[key], 4.01))
    state = teacher.state_dict()
    fresh = BCPTeacher(_student())
    fresh.load_state_dict(state)
    assert fresh.initialised and torch.equal(fresh.teacher.state_dict()[key], teacher.teacher.state_dict()[key])
    fresh.load_state_dict(None)
    assert not fresh.initialised
    assert all(not p.requires_grad for p in teacher.teacher.parameters()) and not teacher.teacher.training
    assert not teacher.teacher_logits(torch.randn(1, 1, 8, 8), noise=False).requires_grad
