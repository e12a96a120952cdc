"""nnUNetTrainerDualStream_releasedCode on every label layout: regions (sigmoid outputs) and the ignore label.

The released code's supervised loss (CE + foreground Dice with a squared denominator) and MCF's "mistake" term are
softmax formulas. On regions the trainer uses their binary form per region channel (BCE + Dice on sigmoid(z_k); the
mistake mask p_k >= 0.6 in exactly one stream); with an ignore label the ignored voxels are left out of both. Every
expected value here is computed with numpy from the hand-built logits, not with the package's functions.
"""
import numpy as np
import pytest
import torch
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunetv2_semiseg.losses.dualstream import (cross_reliable_mistake_loss, region_cross_reliable_mistake_loss,
                                                region_released_supervised_loss, released_supervised_loss)
from nnunetv2_semiseg.trainers.dualstream import nnUNetTrainerDualStream_releasedCode
from test_dualstream_wiring import _FixedStreams

pytestmark = pytest.mark.usefixtures('one_torch_thread')

NUM_LABELED, NUM_ROWS, WIDTH, DIM = 2, 3, 6, 2
SMOOTH, CONFIDENCE = 1e-5, 0.6
REGION_LABELS = {'background': 0, 'whole': [1, 2], 'core': 2}
REGIONS_CLASS_ORDER = [1, 2]
CLASS_LABELS = {'background': 0, 'a': 1, 'b': 2}
IGNORE = 3


# ---------------------------------------------------------------------------------------------------------------
# numpy references
# ---------------------------------------------------------------------------------------------------------------
def _sig(z):
    return 1.0 / (1.0 + np.exp(-z))


def _bce(z, y):
    return np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))


def _squared_dice(p, y, m):
    pm, ym = m * p, m * y
    return 1.0 - (2.0 * (pm * ym).sum() + SMOOTH) / ((pm ** 2).sum() + (ym ** 2).sum() + SMOOTH)


def _region_sup(z, y, m):
    """z, y (K, N); m (N,) 1 = labeled voxel: mean over k of BCE over the labeled voxels + squared Dice."""
    return np.mean([(_bce(z[k], y[k]) * m).sum() / m.sum() + _squared_dice(_sig(z[k]), y[k], m)
                    for k in range(z.shape[0])])


def _region_mistake(p, pa, pb, y, m):
    mask = ((pa >= CONFIDENCE) ^ (pb >= CONFIDENCE)) & (m[None] > 0)
    return (mask * (p - y) ** 2).sum() / (mask.sum() + 1e-16)


def _softmax(z):
    e = np.exp(z - z.max(0, keepdims=True))
    return e / e.sum(0, keepdims=True)


def _class_sup(z, labels, m):
    """z (C, N); labels (N,); m (N,): CE over the labeled voxels + mean over c >= 1 of the squared Dice."""
    p = _softmax(z)
    safe = np.where(m > 0, labels, 0)
    ce = -(np.log(p[safe, np.arange(len(safe))]) * m).sum() / m.sum()
    return ce + np.mean([_squared_dice(p[c], (safe == c).astype(float), m) for c in range(1, z.shape[0])])


def _class_mistake(p, pa, pb, labels, m):
    def confident(q):
        return (q.argmax(0) != 0) & (q.max(0) >= CONFIDENCE)
    mask = (confident(pa) ^ confident(pb)) & (m > 0)
    safe = np.where(m > 0, labels, 0)
    one_hot = np.stack([(safe == c).astype(float) for c in range(p.shape[0])])
    return (mask * ((p[1:] - one_hot[1:]) ** 2).sum(0)).sum() / (mask.sum() + 1e-16)


def _flat(t):
    """(rows, C, 1, W) -> (C, rows * W), float64."""
    a = t.detach().double().numpy()[:, :, 0, :]
    return a.transpose(1, 0, 2).reshape(a.shape[1], -1)


# ---------------------------------------------------------------------------------------------------------------
# the pure losses
# ---------------------------------------------------------------------------------------------------------------
def test_region_released_loss_is_bce_plus_squared_dice_per_channel_over_the_labeled_voxels():
    z = torch.tensor([[[2.0, -1.0, 0.5, -3.0, 1.5]], [[-0.5, 1.0, -2.0, 0.3, 2.5]]]).reshape(1, 2, 5)
    y = torch.tensor([[[1.0, 0.0, 1.0, 0.0, 1.0]], [[0.0, 1.0, 0.0, 0.0, 1.0]]]).reshape(1, 2, 5)
    valid = torch.tensor([[True, True, False, True, True]])
    zn, yn = z[0].double().numpy(), y[0].double().numpy()
    assert region_released_supervised_loss(z, y).item() == pytest.approx(_region_sup(zn, yn, np.ones(5)), rel=1e-5)
    assert region_released_supervised_loss(z, y, valid).item() == pytest.approx(
        _region_sup(zn, yn, valid[0].double().numpy()), rel=1e-5)
    # one region = the class formula on the two-class output (0, z)
    two_class = torch.stack((torch.zeros_like(z[:, 0]), z[:, 0]), 1)
    assert region_released_supervised_loss(z[:, :1], y[:, :1]).item() == pytest.approx(
        released_supervised_loss(two_class, y[:, 0].long()).item(), rel=1e-5)


def test_ignored_voxels_carry_no_gradient_and_change_no_value():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 3, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 3, (2, 8), generator=g)
    labels[0, 2], labels[1, 5] = IGNORE, IGNORE
    valid = labels != IGNORE
    value = released_supervised_loss(z, labels, valid)
    value.backward()
    assert z.grad[0, :, 2].abs().max() == 0 and z.grad[1, :, 5].abs().max() == 0
    assert z.grad[valid[:, None].expand_as(z)].abs().sum() > 0
    moved = z.detach().clone()
    moved[0, :, 2] += 5.0
    assert released_supervised_loss(moved, labels, valid).item() == pytest.approx(value.item(), rel=1e-6)
    zn = z.detach().double().numpy().transpose(1, 0, 2).reshape(3, -1)
    assert value.item() == pytest.approx(_class_sup(zn, labels.numpy().reshape(-1), valid.numpy().reshape(-1)),
                                         rel=1e-5)


def test_mistake_masks_leave_ignored_voxels_out_for_classes_and_regions():
    # classes: A confidently foreground at voxels 0 and 2, B at 0 only -> XOR = voxel 2, which is ignored
    def binary(fg):
        fg = torch.tensor(fg).reshape(1, 1, -1)
        return torch.cat((1 - fg, fg), 1)
    p_a, p_b = binary([0.9, 0.2, 0.7, 0.8]), binary([0.95, 0.1, 0.55, 0.3])
    labels = torch.tensor([[1, 0, IGNORE, 0]])
    assert cross_reliable_mistake_loss(p_a, labels, p_a, p_b, CONFIDENCE, labels != IGNORE).item() == \
        pytest.approx(0.8 ** 2, rel=1e-5)                                 # only voxel 3 is left in the mask
    # regions: per channel p >= 0.6 in exactly one stream
    pa = torch.tensor([[[0.9, 0.7, 0.2, 0.65], [0.1, 0.8, 0.61, 0.3]]])
    pb = torch.tensor([[[0.5, 0.75, 0.7, 0.1], [0.2, 0.3, 0.9, 0.62]]])
    y = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]]])
    for valid in (None, torch.tensor([[True, False, True, True]])):
        m = np.ones(4) if valid is None else valid[0].double().numpy()
        expected = _region_mistake(pb[0].double().numpy(), pa[0].double().numpy(), pb[0].double().numpy(),
                                   y[0].double().numpy(), m)
        assert region_cross_reliable_mistake_loss(pb, y, pa, pb, CONFIDENCE, valid).item() == \
            pytest.approx(expected, rel=1e-5)
    assert expected > 0


# ---------------------------------------------------------------------------------------------------------------
# the trainer: both streams' supervised loss and the mistake term read the right target on every layout
# ---------------------------------------------------------------------------------------------------------------
def _released_trainer(regions: bool, ignore: bool):
    t = object.__new__(nnUNetTrainerDualStream_releasedCode)
    labels = dict(REGION_LABELS if regions else CLASS_LABELS, **({'ignore': IGNORE} if ignore else {}))
    t.label_manager = LabelManager(labels, REGIONS_CLASS_ORDER if regions else None)
    t.device = torch.device('cpu')
    t.loss = None                                   # the released objective never calls nnU-Net's loss
    t.global_iteration, t.num_epochs, t.num_iterations_per_epoch = 3, 1, 10
    t.loss_components = t.build_loss_components()
    return t


def _case(regions: bool, ignore: bool):
    """Hand-built streams (rows 0-1 labeled) and the labeled rows' target in nnU-Net's loader layout; labeled voxels
    0 and 4 of row 0 and 3 of row 1 are ignored when ``ignore``."""
    g = torch.Generator().manual_seed(5)
    channels = 2 if regions else 3
    logits = {s: 2.5 * torch.randn(NUM_ROWS, channels, 1, WIDTH, generator=g) for s in 'AB'}
    features = {s: torch.randn(NUM_ROWS, DIM, 1, WIDTH, generator=g) for s in 'AB'}
    labels = torch.randint(0, 3, (NUM_LABELED, 1, 1, WIDTH), generator=g)
    ignored = torch.zeros_like(labels, dtype=torch.bool)
    if ignore:
        ignored[0, 0, 0, [0, 4]] = True
        ignored[1, 0, 0, 3] = True
    if regions:
        target = torch.cat([(labels >= 1), (labels == 2)] + ([ignored] if ignore else []), 1).float()
    else:
        target = torch.where(ignored, torch.full_like(labels, IGNORE), labels).float()
    return logits, features, labels, ignored, [target, target[..., ::2]]


@pytest.mark.parametrize('regions,ignore', [(True, False), (True, True), (False, True)])
def test_released_supervised_and_mistake_terms_on_every_layout(regions, ignore):
    logits, features, labels, ignored, target = _case(regions, ignore)
    net = _FixedStreams(logits, features)
    t = _released_trainer(regions, ignore)
    terms = t.composed_loss(net, torch.zeros(NUM_ROWS, 1, 1, WIDTH), target, NUM_LABELED)

    m = (~ignored).double().numpy().reshape(-1)
    lab = labels.numpy().reshape(-1)
    z = {s: _flat(logits[s][:NUM_LABELED]) for s in 'AB'}
    if regions:
        y = np.stack([(lab >= 1), (lab == 2)]).astype(float)
        p = {s: _sig(z[s]) for s in 'AB'}
        sup = sum(_region_sup(z[s], y, m) for s in 'AB')
        mistake = sum(_region_mistake(p[s], p['A'], p['B'], y, m) for s in 'AB')
    else:
        p = {s: _softmax(z[s]) for s in 'AB'}
        sup = sum(_class_sup(z[s], lab, m) for s in 'AB')
        mistake = sum(_class_mistake(p[s], p['A'], p['B'], lab, m) for s in 'AB')
    assert terms['sup'].item() == pytest.approx(sup, rel=1e-5)
    assert terms['mistake'].item() == pytest.approx(mistake, rel=1e-5)
    assert mistake > 0

    # no ignored voxel of a labeled row gets a gradient from the supervised terms
    grads = torch.autograd.grad(terms['sup'] + terms['mistake'], [net.logits['A'], net.logits['B']])
    for grad in grads:
        per_voxel = grad[:NUM_LABELED].abs().sum(1)                           # (rows, 1, W)
        if ignore:
            assert per_voxel[ignored[:, 0]].max() == 0
        assert per_voxel[~ignored[:, 0]].min() > 0
