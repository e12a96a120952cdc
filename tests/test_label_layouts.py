"""Label layouts beyond one class per voxel: region-based datasets (sigmoid outputs) and the ignore label.

BCP on regions: the region-weighted DC+BCE against a hand computation, the per-region pseudo-labels with their
largest component and nnU-Net's ignore channel, and the trainer's mixed region targets in both directions. The
ignore label: no ignored voxel reaches a BCP term as a class; DualStream's method terms never read the labels
(softmax and regions, pseudo-label terms on unlabeled or on all rows).
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from torch import nn

from nnunetv2_semiseg.losses.copy_paste import region_weighted_dc_ce
from nnunetv2_semiseg.networks.semiseg_network import SemiSegNetwork
from nnunetv2_semiseg.trainers.bcp import nnUNetTrainerBCP, nnUNetTrainerBCP_noLCC
from nnunetv2_semiseg.trainers.bcp_components import BCPTeacher, BidirectionalCopyPaste

SMOOTH = 1e-5
REGION_LABELS = {'background': 0, 'whole': [1, 2], 'core': 2}
REGIONS_CLASS_ORDER = [1, 2]


def _sigmoid_dice():
    return MemoryEfficientSoftDiceLoss(apply_nonlin=torch.sigmoid, batch_dice=True, do_bg=True, smooth=SMOOTH,
                                       ddp=False)


def _hand_region_loss(logits, maps, regions, valid=None, weight_dice=1.0, weight_ce=1.0):
    """Independent numpy version: one image, K region channels, sigmoid Dice over every channel (mean), BCE averaged
    over the channels per voxel, each part normalised over its (valid) region voxels."""
    z = logits.double().numpy()[0].reshape(logits.shape[1], -1)
    y = maps.double().numpy()[0].reshape(maps.shape[1], -1)
    p = 1 / (1 + np.exp(-z))
    bce = -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean(0)
    v = np.ones(z.shape[1]) if valid is None else np.asarray(valid, dtype=float).reshape(-1)
    total = 0.0
    for region, weight in regions:
        r = region.numpy().reshape(-1).astype(float) * v
        dices = [(2 * (p[k] * y[k] * r).sum() + SMOOTH) / ((y[k] * r).sum() + (p[k] * r).sum() + SMOOTH)
                 for k in range(z.shape[0])]
        total += weight * (weight_dice * -np.mean(dices) + weight_ce * (bce * r).sum() / r.sum())
    return total


LOGITS = torch.tensor([[[[0.2, -1.0, 0.5, 2.0, 0.0, -0.3]], [[1.0, 0.3, -0.5, 1.5, 0.7, -2.0]]]])
MAPS = torch.tensor([[[[1, 0, 1, 1, 1, 0]], [[1, 0, 0, 1, 0, 0]]]], dtype=torch.bool)   # whole, core (nested)
GT_PART = torch.tensor([[[[1.0, 1.0, 0.0, 0.0, 1.0, 0.0]]]])


def test_region_weighted_dc_bce_equals_the_hand_computed_value():
    regions = [(GT_PART, 1.0), (1 - GT_PART, 0.5)]
    value = region_weighted_dc_ce(LOGITS, MAPS, regions, _sigmoid_dice(), sigmoid_regions=True)
    assert value.item() == pytest.approx(_hand_region_loss(LOGITS, MAPS, regions), rel=1e-6)
    bce_only = region_weighted_dc_ce(LOGITS, MAPS, regions, _sigmoid_dice(), weight_dice=0.0, sigmoid_regions=True)
    assert bce_only.item() == pytest.approx(_hand_region_loss(LOGITS, MAPS, regions, weight_dice=0.0), rel=1e-6)
    # a softmax formula on these logits would be a different number
    assert bce_only.item() != pytest.approx(
        region_weighted_dc_ce(LOGITS, MAPS[:, 1:].long(), regions, _sigmoid_dice(), weight_dice=0.0).item(), rel=1e-3)


def test_region_ignore_channel_removes_voxels_from_every_region():
    ignore = torch.tensor([[[[0, 0, 1, 0, 0, 1]]]], dtype=torch.bool)
    target = torch.cat((MAPS, ignore), 1)          # nnU-Net's layout: ignore mask as the last channel
    regions = [(GT_PART, 1.0), (1 - GT_PART, 0.5)]
    value = region_weighted_dc_ce(LOGITS, target, regions, _sigmoid_dice(), ignore_label=3, sigmoid_regions=True)
    expected = _hand_region_loss(LOGITS, MAPS, regions, valid=[1, 1, 0, 1, 1, 0])
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_one_region_of_weight_one_is_nnunets_dc_and_bce():
    torch.manual_seed(0)
    logits, maps = torch.randn(2, 3, 5, 6), torch.rand(2, 3, 5, 6) > 0.5
    nnunet = DC_and_BCE_loss({}, {'batch_dice': True, 'smooth': SMOOTH, 'do_bg': True, 'ddp': False},
                             dice_class=MemoryEfficientSoftDiceLoss)
    ours = region_weighted_dc_ce(logits, maps, [(torch.ones(1, 1, 5, 6), 1.0)], nnunet.dc, sigmoid_regions=True)
    assert ours.item() == pytest.approx(nnunet(logits, maps).item(), rel=1e-5)


def test_region_pseudo_labels_threshold_each_channel_and_keep_its_largest_component():
    # one row, 2 regions, 1 x 7 voxels: region 0 has components of 3 and 1 voxels, region 1 of 1 and 2 voxels
    logits = torch.tensor([[[[[3.0, 2.0, 0.1, -1.0, 4.0, -2.0, -3.0]]],
                            [[[-1.0, 2.0, -1.0, -2.0, 1.0, 1.0, -4.0]]]]])
    bcp = BidirectionalCopyPaste(seed=0).use_loss_pieces(_sigmoid_dice(), sigmoid_regions=True)
    assert bcp.pseudo_labels(logits)[0, :, 0, 0].tolist() == [[1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 0]]
    bcp.keep_largest_component = False
    assert bcp.pseudo_labels(logits)[0, :, 0, 0].tolist() == [[1, 1, 1, 0, 1, 0, 0], [0, 1, 0, 0, 1, 1, 0]]
    # with an ignore label an all-zero ignore channel follows: no pseudo-labelled voxel is ignored
    bcp.use_loss_pieces(_sigmoid_dice(), ignore_label=3, sigmoid_regions=True)
    out = bcp.pseudo_labels(logits)
    assert out.shape[1] == 3 and out[:, 2].sum().item() == 0


# ----------------------------------------------------------------------------------------------------------------
# the trainer's step on a region dataset
# ----------------------------------------------------------------------------------------------------------------
def _region_trainer(cls, ignore: bool = False):
    labels = dict(REGION_LABELS, **({'ignore': 3} if ignore else {}))
    t = object.__new__(cls)
    t.label_manager = LabelManager(labels, REGIONS_CLASS_ORDER)
    torch.manual_seed(0)
    base = PlainConvUNet(1, 3, (4, 8, 16), nn.Conv2d, 3, (1, 2, 2), (1, 1, 1), 2, (1, 1), conv_bias=True,
                         norm_op=nn.InstanceNorm2d, norm_op_kwargs={'affine': True}, nonlin=nn.LeakyReLU,
                         deep_supervision=True)
    t.network = SemiSegNetwork(base)
    t.device, t.is_ddp, t.enable_deep_supervision = torch.device('cpu'), False, True
    t.configuration_manager = SimpleNamespace(pool_op_kernel_sizes=[[1, 1], [2, 2], [2, 2]])
    t.global_iteration, t.num_epochs, t.num_iterations_per_epoch = 0, 1, 10
    t.pretrain_fraction = 0.0
    dc_bce = DC_and_BCE_loss({}, {'batch_dice': True, 'smooth': SMOOTH, 'do_bg': True, 'ddp': False},
                             use_ignore_label=ignore, dice_class=MemoryEfficientSoftDiceLoss)
    t.loss = DeepSupervisionWrapper(dc_bce, (2 / 3, 1 / 3))
    t.copy_paste = BidirectionalCopyPaste(t.mask_beta, t.u_weight, t.keep_largest_component, t.bidirectional, 5)
    t.copy_paste.use_loss_pieces(**t.supervised_loss_pieces())
    t.teacher = BCPTeacher(t.network, t.ema_decay)
    t.print_to_log_file = lambda *args, **kwargs: None
    return t


def _region_batch(ignore: bool, seed: int = 1, shape=(16, 16)):
    g = torch.Generator().manual_seed(seed)
    x, u = torch.randn(2, 1, *shape, generator=g), torch.randn(2, 1, *shape, generator=g)
    labels = torch.randint(0, 3, (2, *shape), generator=g)
    if ignore:
        labels[:, :4] = 3       # the first four lines unannotated
    channels = [(labels == 1) | (labels == 2), labels == 2] + ([labels == 3] if ignore else [])
    full = torch.stack(channels, 1)
    low = full[:, :, ::2, ::2]
    return x, [full, low], u


@pytest.mark.parametrize('ignore', [False, True])
def test_bcp_region_step_mixes_region_targets_inward_and_outward(ignore):
    t = _region_trainer(nnUNetTrainerBCP_noLCC, ignore)
    x, target, u = _region_batch(ignore)
    seen = []
    captured = {}
    original = t.copy_paste.direction_losses

    def spy(outputs, patches):
        captured['patches'] = patches
        return original(outputs, patches)
    t.copy_paste.direction_losses = spy
    hook = t.network.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    terms = t.compute_loss_terms(x, target, {'data': u})
    hook.remove()
    mask = t.copy_paste.masks.mask(x.shape[2:], 0, 0)
    # pseudo-labels by hand: the teacher (= the student at the switch) thresholds each region at 0.5
    with torch.no_grad():
        teacher_logits = t.teacher.teacher(u)
        teacher_logits = teacher_logits[0] if isinstance(teacher_logits, (list, tuple)) else teacher_logits
    pseudo = (torch.sigmoid(teacher_logits) >= 0.5)
    if ignore:
        pseudo = torch.cat((pseudo, torch.zeros_like(pseudo[:, :1])), 1)
    m = mask.bool()
    full = target[0]
    inward = torch.where(m, full, pseudo)
    outward = torch.where(m, torch.roll(pseudo, 1, 0), full)
    got = captured['patches'].target_levels[0]
    assert torch.equal(got[:2].bool(), inward) and torch.equal(got[2:].bool(), outward)
    assert torch.equal(seen[-1][:2], torch.where(m, x, u)) and torch.equal(seen[-1][2:], torch.where(m, torch.roll(u, 1, 0), x))
    # the inward term by hand: ground truth (outside the box) weight 1, pseudo-labels (inside) weight 0.5, at the
    # full-resolution level (weight 2/3) plus the low level (1/3)
    with torch.no_grad():
        out = t.network(captured['patches'].x)
    levels = captured['patches'].mask_levels
    expected = 0.0
    for k, w in enumerate((2 / 3, 1 / 3)):
        tk = captured['patches'].target_levels[k][:2]
        maps = tk[:, :2]
        valid = None if not ignore else (tk[:, 2] == 0).numpy().reshape(-1)
        # _hand_region_loss takes one image: stack the rows side by side along the last axis
        lg = torch.cat(list(out[k][:2]), -1)[None]
        mp = torch.cat(list(maps), -1)[None]
        mk = torch.cat([levels[k][0]] * 2, -1)[None]
        vv = None if valid is None else np.concatenate([(tk[i, 2] == 0).numpy() for i in range(2)], -1)
        expected += w * _hand_region_loss(lg, mp, [(mk, 1.0), (1 - mk, 0.5)], valid=vv)
    assert terms['inward'].item() == pytest.approx(expected, rel=1e-5)
    assert terms['outward'].item() > 0 and terms['loss'].item() == pytest.approx(
        terms['inward'].item() + terms['outward'].item(), rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# DualStream and the ignore label: no unsupervised term reads the target, so an ignored voxel is never a class there
# ----------------------------------------------------------------------------------------------------------------
class _FixedDualStreams(nn.Module):
    """Stand-in for DualStreamNetwork: forward_streams returns fixed logits / features (leaves with gradient)."""

    def __init__(self, logits: dict, features: dict):
        super().__init__()
        self.logits = nn.ParameterDict({s: nn.Parameter(v.clone()) for s, v in logits.items()})
        self.features = nn.ParameterDict({s: nn.Parameter(v.clone()) for s, v in features.items()})

    def forward_streams(self, x):
        return {s: {'seg': [self.logits[s], self.logits[s][..., ::2, ::2]], 'features': self.features[s]}
                for s in 'AB'}


def _dual_stream_ignore_case(regions: bool, rows: str):
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2_semiseg.trainers.dualstream import nnUNetTrainerDualStream
    cls = type('DualStreamRows', (nnUNetTrainerDualStream,), {'pseudo_label_rows': rows})
    t = object.__new__(cls)
    if regions:
        t.label_manager = LabelManager(dict(REGION_LABELS, ignore=3), REGIONS_CLASS_ORDER)
        dc = DC_and_BCE_loss({}, {'batch_dice': True, 'smooth': SMOOTH, 'do_bg': True, 'ddp': False},
                             use_ignore_label=True, dice_class=MemoryEfficientSoftDiceLoss)
    else:
        t.label_manager = LabelManager({'background': 0, 'a': 1, 'b': 2, 'ignore': 3}, None)
        dc = DC_and_CE_loss({'batch_dice': True, 'smooth': SMOOTH, 'do_bg': False, 'ddp': False}, {},
                            ignore_label=3, dice_class=MemoryEfficientSoftDiceLoss)
    t.loss = DeepSupervisionWrapper(dc, (2 / 3, 1 / 3))
    t.device = torch.device('cpu')
    t.global_iteration, t.num_epochs, t.num_iterations_per_epoch = 5, 1, 10
    t.loss_components = t.build_loss_components()
    g = torch.Generator().manual_seed(4)
    channels = 2 if regions else 3
    logits = {s: 2 * torch.randn(4, channels, 8, 8, generator=g) for s in 'AB'}
    features = {s: torch.randn(4, 3, 8, 8, generator=g) for s in 'AB'}
    labels = torch.randint(0, 3, (2, 8, 8), generator=g)
    return t, logits, features, labels


def _dual_stream_targets(labels: torch.Tensor, regions: bool, ignored: torch.Tensor):
    labels = torch.where(ignored, torch.full_like(labels, 3), labels)
    if regions:
        full = torch.stack(((labels == 1) | (labels == 2), labels == 2, labels == 3), 1).float()
    else:
        full = labels[:, None].float()
    return [full, full[..., ::2, ::2]]


@pytest.mark.parametrize('regions', [False, True])
@pytest.mark.parametrize('rows', ['unlabeled', 'all'])
def test_dual_stream_method_terms_never_read_the_labels_so_ignored_voxels_are_no_class(regions, rows):
    t, logits, features, labels = _dual_stream_ignore_case(regions, rows)
    x = torch.zeros(4, 1, 8, 8)
    annotated = _dual_stream_targets(labels, regions, torch.zeros_like(labels, dtype=torch.bool))
    half = torch.zeros_like(labels, dtype=torch.bool)
    half[:, :4] = True                                                     # half of every labeled row unannotated
    partial = _dual_stream_targets(labels, regions, half)
    terms = [t.composed_loss(_FixedDualStreams(logits, features), x, target, 2) for target in (annotated, partial)]
    for name in ('pseudo', 'uncertainty', 'consistency', 'contrast'):
        assert terms[0][name].item() == terms[1][name].item(), name         # identical: the labels are not read
    assert torch.isfinite(terms[1]['sup']) and terms[0]['sup'].item() != pytest.approx(terms[1]['sup'].item())
    # the supervised part, nnU-Net's loss, gives ignored voxels no gradient
    net = _FixedDualStreams(logits, features)
    t.composed_loss(net, x, partial, 2)['sup'].backward()
    for s in 'AB':
        grad = net.logits[s].grad[:2]
        assert grad[:, :, :4].abs().max() == 0 and grad[:, :, 4:].abs().max() > 0


# ----------------------------------------------------------------------------------------------------------------
# Mean Teacher on regions: the consistency compares per-region sigmoid probabilities
# ----------------------------------------------------------------------------------------------------------------
def test_mean_teacher_region_consistency_is_the_mse_of_the_sigmoids():
    from nnunetv2_semiseg.trainers.mean_teacher import nnUNetTrainerMeanTeacher
    t = object.__new__(type('MeanTeacherNoNoise', (nnUNetTrainerMeanTeacher,), {'teacher_noise_std': 0.0}))
    t.label_manager = LabelManager(REGION_LABELS, REGIONS_CLASS_ORDER)
    torch.manual_seed(0)
    base = PlainConvUNet(1, 2, (4, 8), nn.Conv2d, 3, (1, 2), (1, 1), 2, (1,), conv_bias=True,
                         norm_op=nn.InstanceNorm2d, norm_op_kwargs={'affine': True}, nonlin=nn.LeakyReLU,
                         deep_supervision=True)
    t.network = SemiSegNetwork(base)
    t.device, t.is_ddp = torch.device('cpu'), False
    t.global_iteration, t.num_epochs, t.num_iterations_per_epoch = 0, 1, 10
    t.loss = lambda outputs, target: outputs[0].float().sum() * 0.0
    t.loss_components = t.build_loss_components()
    with torch.no_grad():                     # a teacher that differs from the student
        for p in t.consistency.teacher.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(3, 1, 8, 8)
    terms = t.composed_loss(t.network, x, None, 1)
    with torch.no_grad():
        z_s, z_t = t.network(x)[0][1:].double().numpy(), t.consistency.teacher(x)[1:].double().numpy()
    sig = lambda z: 1 / (1 + np.exp(-z))     # noqa: E731
    expected = np.mean((sig(z_s) - sig(z_t)) ** 2)
    assert terms['cons'].item() == pytest.approx(expected, rel=1e-5)
    softmax = lambda z: np.exp(z) / np.exp(z).sum(1, keepdims=True)   # noqa: E731
    assert terms['cons'].item() != pytest.approx(np.mean((softmax(z_s) - softmax(z_t)) ** 2), rel=1e-2)


# ----------------------------------------------------------------------------------------------------------------
# Voxel adversarial and the ignore label: no ignored labeled voxel is sampled as "real" or as a BYOL pair
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('regions', [False, True])
def test_voxel_adversarial_never_samples_an_ignored_voxel_as_a_class(regions):
    from test_voxel_adversarial import _ds, _trainer
    from nnunetv2_semiseg.trainers.voxel_adversarial import nnUNetTrainerVoxelAdversarial
    if regions:
        lm = LabelManager(dict(REGION_LABELS, ignore=3), REGIONS_CLASS_ORDER)
    else:
        lm = LabelManager({'background': 0, 'a': 1, 'b': 2, 'ignore': 3}, None)
    t = _trainer(nnUNetTrainerVoxelAdversarial, lm, 2, stages=3, seed=6)
    g = torch.Generator().manual_seed(6)
    labels = torch.randint(0, 3, (2, 16, 16), generator=g)
    ignored = torch.zeros_like(labels, dtype=torch.bool)
    ignored[:, :6] = True
    labels = torch.where(ignored, torch.full_like(labels, 3), labels)
    if regions:
        target = torch.stack(((labels == 1) | (labels == 2), labels == 2, labels == 3), 1).float()
    else:
        target = labels[:, None].float()
    samples = []
    for component in t.loss_components[:2]:                                 # adversarial, BYOL
        original = component.routing.sample

        def spy(classes, original=original, name=component.name):
            out = original(classes)
            samples.append((name, classes.clone(), out))
            return out
        component.routing.sample = spy
    t.compute_loss_terms(torch.randn(2, 1, 16, 16, generator=g), _ds(target), {'data': torch.randn(2, 1, 16, 16)})
    assert {name for name, _, _ in samples} == {'adv', 'feature'}
    flat_ignored = ignored.reshape(2, -1)
    for name, classes, (rows, flat, sampled) in samples:
        labeled = rows < 2
        assert not flat_ignored[rows[labeled], flat[labeled]].any(), name
        # every annotated labeled voxel is routed (256 per class and row covers them all): ignored ones are not
        assert int(labeled.sum()) == int((~ignored).sum()), name
        expected_heads = (torch.where((labels == 2), 2, (labels == 1).long()) if regions else labels)
        assert torch.equal(sampled[labeled], expected_heads.reshape(2, -1)[rows[labeled], flat[labeled]]), name


# ----------------------------------------------------------------------------------------------------------------
# BCP with an ignore label (softmax): the ignore value stays where the ground truth has it, never a pseudo-class
# ----------------------------------------------------------------------------------------------------------------
def test_bcp_softmax_ignore_label_stays_in_the_ground_truth_part_of_the_mixed_targets():
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    t = _region_trainer(nnUNetTrainerBCP_noLCC)                       # then switched to a softmax layout
    t.label_manager = LabelManager({'background': 0, 'a': 1, 'b': 2, 'ignore': 3}, None)
    torch.manual_seed(0)
    base = PlainConvUNet(1, 3, (4, 8, 16), nn.Conv2d, 3, (1, 2, 2), (1, 1, 1), 3, (1, 1), conv_bias=True,
                         norm_op=nn.InstanceNorm2d, norm_op_kwargs={'affine': True}, nonlin=nn.LeakyReLU,
                         deep_supervision=True)
    t.network = SemiSegNetwork(base)
    dc_ce = DC_and_CE_loss({'batch_dice': True, 'smooth': SMOOTH, 'do_bg': False, 'ddp': False}, {},
                           ignore_label=3, dice_class=MemoryEfficientSoftDiceLoss)
    t.loss = DeepSupervisionWrapper(dc_ce, (2 / 3, 1 / 3))
    t.copy_paste = BidirectionalCopyPaste(t.mask_beta, t.u_weight, False, t.bidirectional, 5)
    t.copy_paste.use_loss_pieces(**t.supervised_loss_pieces())
    t.teacher = BCPTeacher(t.network, t.ema_decay)
    g = torch.Generator().manual_seed(3)
    x, u = torch.randn(2, 1, 16, 16, generator=g), torch.randn(2, 1, 16, 16, generator=g)
    labels = torch.randint(0, 3, (2, 1, 16, 16), generator=g)
    labels[:, :, :5] = 3                                                # the first five lines unannotated
    target = [labels.float(), labels[..., ::2, ::2].float()]
    captured = {}
    original = t.copy_paste.direction_losses
    t.copy_paste.direction_losses = lambda outputs, patches: (captured.update(patches=patches),
                                                              original(outputs, patches))[1]
    terms = t.compute_loss_terms(x, target, {'data': u})
    with torch.no_grad():
        teacher_logits = t.teacher.teacher(u)
        teacher_logits = teacher_logits[0] if isinstance(teacher_logits, (list, tuple)) else teacher_logits
    pseudo = teacher_logits.argmax(1, keepdim=True)
    assert int(pseudo.max()) < 3
    m = t.copy_paste.masks.mask(x.shape[2:], 0, 0).bool()
    got = captured['patches'].target_levels[0].long()
    assert torch.equal(got[:2], torch.where(m, labels, pseudo))               # inward: labeled inside the box
    assert torch.equal(got[2:], torch.where(m, torch.roll(pseudo, 1, 0), labels))
    # the ignore value is exactly the ground truth's unannotated voxels in the ground-truth part, nowhere else
    gt_part = torch.cat((m.expand_as(labels), ~m.expand_as(labels)))
    assert torch.equal(got == 3, gt_part & (torch.cat((labels, labels)) == 3))
    assert torch.isfinite(terms['inward']) and terms['inward'].item() > 0
