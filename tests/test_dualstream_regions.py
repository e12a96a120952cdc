"""nnUNetTrainerDualStream on region-based datasets (sigmoid outputs, one Bernoulli variable per region channel).

Each region term is recomputed here in float64 numpy from its documented formula (docs/dualstream.md, "Region-based
datasets") on tiny hand-made tensors whose two region channels rank their voxels' entropies differently, and whose
threshold (p >= 0.5) and softmax argmax disagree, so that a softmax formula, a voxel-wise (instead of per-channel)
entropy filter or a wrong teaching direction gives another number. Gradients: only the learning stream's logits
(and features, for the contrast) receive gradient. The deployed ensemble is the logit of the mean of the two
streams' sigmoids, stored with the weights so that a strict load (nnUNetv2_predict) restores it.
"""
import math

import numpy as np
import pytest
import torch
from torch import nn
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunetv2_semiseg.losses.dualstream import (bernoulli_entropy, channelwise_high_entropy_mask,
                                                ensemble_log_probabilities, region_cosine_consistency,
                                                region_dc_bce_loss, region_ensemble_logits,
                                                region_prototype_contrast_loss,
                                                region_uncertainty_weighted_pseudo_label_loss)
from nnunetv2_semiseg.trainers.dualstream import nnUNetTrainerDualStream
from test_dualstream_wiring import _FixedStreams  # the same hand-built two-stream stand-in

REGION_LABELS = {'background': 0, 'whole': [1, 2], 'core': 2}
REGIONS_CLASS_ORDER = [1, 2]
NUM_LABELED, NUM_ROWS, K, WIDTH, DIM = 1, 3, 2, 5, 2
SMOOTH = 1e-5


pytestmark = pytest.mark.usefixtures('one_torch_thread')


# ----------------------------------------------------------------------------------------------------------------
# independent float64 formulas; arrays are (voxels, K) over the rows the term reads
# ----------------------------------------------------------------------------------------------------------------
def _sig(z):
    return 1.0 / (1.0 + np.exp(-z))


def _entropy(p):
    return -(p * np.log(p) + (1 - p) * np.log(1 - p))


def _ignored(p, fraction=0.2):
    """Per channel: the round(20 %) voxels with the highest Bernoulli entropy of that channel."""
    out = np.zeros(p.shape, bool)
    n = round(fraction * p.shape[0])
    for k in range(p.shape[1]):
        out[np.argsort(-_entropy(p[:, k]))[:n], k] = True
    return out


def _dc_bce(z, y, valid):
    """nnU-Net's region DC+BCE per channel over its valid voxels (batch Dice, smooth 1e-5), mean over channels."""
    p = _sig(z)
    total = 0.0
    for k in range(z.shape[1]):
        m = valid[:, k].astype(float)
        bce = -(y[:, k] * np.log(p[:, k]) + (1 - y[:, k]) * np.log(1 - p[:, k]))
        dice = (2 * (m * p[:, k] * y[:, k]).sum() + SMOOTH) / ((m * y[:, k]).sum() + (m * p[:, k]).sum() + SMOOTH)
        total += (bce * m).sum() / m.sum() - dice
    return total / z.shape[1]


def _uncertainty(zt, zs, temperature=0.5):
    q, p = _sig(zt / temperature), _sig(zs)
    y = (zt >= 0).astype(float)
    kl = q * np.log(q / p) + (1 - q) * np.log((1 - q) / (1 - p))
    bce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    return np.mean(np.exp(-kl) * bce) + np.mean(kl)


def _cosine(za, zb):
    a, b = _sig(za), _sig(zb)
    cos = (a * b + (1 - a) * (1 - b)) / (np.sqrt(a ** 2 + (1 - a) ** 2) * np.sqrt(b ** 2 + (1 - b) ** 2))
    return np.mean(1 - cos)


def _unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _contrast(zt, e, e_fixed=None):
    """Per region channel: inside/outside prototypes of the teacher's reliable voxels; uncertain voxels pulled to
    their side's (constant) prototype; 2 - distance of the two prototypes; mean over channels of pull + push."""
    e_fixed = e if e_fixed is None else e_fixed
    p = _sig(zt)
    labels, uncertain = p >= 0.5, _ignored(p)
    total = 0.0
    for k in range(zt.shape[1]):
        sides = [s for s in (False, True) if ((labels[:, k] == s) & ~uncertain[:, k]).any()]
        proto = {s: e[(labels[:, k] == s) & ~uncertain[:, k]].mean(0) for s in sides}
        fixed = {s: e_fixed[(labels[:, k] == s) & ~uncertain[:, k]].mean(0) for s in sides}
        pulls = [np.linalg.norm(_unit(e[(labels[:, k] == s) & uncertain[:, k]]) - _unit(fixed[s]), axis=-1).mean()
                 for s in sides if ((labels[:, k] == s) & uncertain[:, k]).any()]
        push = 2 - np.linalg.norm(_unit(proto[False]) - _unit(proto[True])) if len(sides) == 2 else 0.0
        total += (np.mean(pulls) if pulls else 0.0) + push
    return total / zt.shape[1]


# tiny tensors: 10 voxels, 2 region channels (whole, core)
Z_TEACHER = torch.tensor([[2.5, 1.8], [0.3, 3.0], [-0.2, -2.2], [1.1, 0.05], [-3.0, -0.6],
                          [0.6, -4.0], [-1.4, 1.5], [4.0, -0.2], [-0.05, 2.6], [1.9, -1.2]], dtype=torch.float64)
Z_STUDENT = torch.tensor([[1.0, -0.5], [0.8, 2.0], [-1.5, 0.4], [0.2, -1.0], [-2.0, -1.8],
                          [1.5, -0.3], [0.1, 0.9], [2.2, 0.7], [-0.6, 1.1], [0.4, -2.5]], dtype=torch.float64)


def _as_image(z):
    """(voxels, K) -> (1, K, 1, voxels)."""
    return z.T.reshape(1, z.shape[1], 1, z.shape[0]).float()


def test_the_tiny_tensors_separate_the_region_formulas_from_softmax_ones():
    p = _sig(Z_TEACHER.numpy())
    # the two channels rank their entropies differently: a per-voxel (summed) entropy filter ignores other voxels
    ignored = _ignored(p)
    assert not np.array_equal(ignored[:, 0], ignored[:, 1])
    summed = np.zeros(10, bool)
    summed[np.argsort(-_entropy(p).sum(1))[:2]] = True
    assert not (np.array_equal(summed, ignored[:, 0]) and np.array_equal(summed, ignored[:, 1]))
    # thresholding each region differs from a softmax argmax over the region channels
    assert not np.array_equal((p >= 0.5)[:, 1], Z_TEACHER.numpy().argmax(1) == 1)


def test_bernoulli_entropy_and_per_channel_filter_hand_values():
    p = torch.sigmoid(_as_image(Z_TEACHER))
    h = bernoulli_entropy(p)
    assert h.shape == p.shape
    expected = _entropy(_sig(Z_TEACHER.numpy()))
    assert np.allclose(h[0, :, 0].T.double().numpy(), expected, atol=1e-6)
    mask = channelwise_high_entropy_mask(h, 80.0)
    assert mask.shape == p.shape and mask.sum(-1).flatten().tolist() == [2, 2]     # 20 % of 10 voxels per channel
    assert np.array_equal(mask[0, :, 0].T.numpy(), _ignored(_sig(Z_TEACHER.numpy())))


def test_region_pseudo_label_loss_is_per_channel_masked_dc_bce():
    p_t = _sig(Z_TEACHER.numpy())
    ignored = _ignored(p_t)
    student = _as_image(Z_STUDENT).requires_grad_(True)
    pseudo = torch.from_numpy(p_t >= 0.5).T.reshape(1, K, 1, 10)
    ignore = torch.from_numpy(ignored).T.reshape(1, K, 1, 10)
    value = region_dc_bce_loss(student, pseudo, ignore)
    expected = _dc_bce(Z_STUDENT.numpy(), (p_t >= 0.5).astype(float), ~ignored)
    assert value.item() == pytest.approx(expected, rel=1e-5)
    # a single voxel-wise mask (any channel uncertain) is another number
    both = np.repeat(ignored.any(1, keepdims=True), K, 1)
    assert value.item() != pytest.approx(_dc_bce(Z_STUDENT.numpy(), (p_t >= 0.5).astype(float), ~both), rel=1e-3)
    value.backward()
    g = student.grad[0, :, 0].T.numpy()
    assert np.all(g[ignored] == 0) and np.all(g[~ignored] != 0)      # a voxel ignored in a channel: no gradient there


def test_region_uncertainty_loss_hand_value_and_only_the_student_gets_gradient():
    teacher = _as_image(Z_TEACHER).requires_grad_(True)
    student = _as_image(Z_STUDENT).requires_grad_(True)
    value = region_uncertainty_weighted_pseudo_label_loss(student, teacher, 0.5, True)
    assert value.item() == pytest.approx(_uncertainty(Z_TEACHER.numpy(), Z_STUDENT.numpy()), rel=1e-5)
    untempered = region_uncertainty_weighted_pseudo_label_loss(student, teacher, 0.5, False)
    assert untempered.item() == pytest.approx(_uncertainty(Z_TEACHER.numpy(), Z_STUDENT.numpy(), 1.0), rel=1e-5)
    assert untempered.item() != pytest.approx(value.item(), rel=1e-3)
    value.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    # the gradient on the student equals the finite difference of the independent formula
    zs = Z_STUDENT.numpy()
    for v, k in [(0, 0), (3, 1), (8, 1)]:
        step = np.zeros_like(zs)
        step[v, k] = 1e-6
        numeric = (_uncertainty(Z_TEACHER.numpy(), zs + step) - _uncertainty(Z_TEACHER.numpy(), zs - step)) / 2e-6
        assert student.grad[0, k, 0, v].item() == pytest.approx(numeric, rel=1e-3, abs=1e-6)


def test_region_cosine_hand_value_and_both_streams_get_gradient():
    a, b = _as_image(Z_TEACHER).requires_grad_(True), _as_image(Z_STUDENT).requires_grad_(True)
    value = region_cosine_consistency(torch.sigmoid(a), torch.sigmoid(b))
    assert value.item() == pytest.approx(_cosine(Z_TEACHER.numpy(), Z_STUDENT.numpy()), rel=1e-5)
    # a cosine over the region channels would be another number
    over_channels = torch.nn.functional.cosine_similarity(torch.sigmoid(a), torch.sigmoid(b), dim=1)
    assert value.item() != pytest.approx((1 - over_channels).mean().item(), rel=1e-3)
    value.backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_region_prototype_contrast_hand_value():
    g = torch.Generator().manual_seed(3)
    e = torch.randn(10, DIM, generator=g, dtype=torch.float64)
    embeddings = e.T.reshape(1, DIM, 1, 10).float()
    p = _sig(Z_TEACHER.numpy())
    labels = torch.from_numpy(p >= 0.5).T.reshape(1, K, 1, 10)
    reliable = ~torch.from_numpy(_ignored(p)).T.reshape(1, K, 1, 10)
    pull, separation = region_prototype_contrast_loss(embeddings, labels, reliable)
    assert (pull + separation).item() == pytest.approx(_contrast(Z_TEACHER.numpy(), e.numpy()), rel=1e-5)


def test_region_ensemble_is_the_logit_of_the_mean_sigmoid():
    za, zb = _as_image(Z_TEACHER), _as_image(Z_STUDENT)
    out = region_ensemble_logits(za, zb)
    mean = (_sig(Z_TEACHER.numpy()) + _sig(Z_STUDENT.numpy())) / 2
    assert np.allclose(out[0, :, 0].T.double().numpy(), np.log(mean / (1 - mean)), atol=1e-5)
    assert torch.allclose(torch.sigmoid(out), (torch.sigmoid(za) + torch.sigmoid(zb)) / 2, atol=1e-6)
    # saturated logits stay finite and on the right side of the threshold
    far = region_ensemble_logits(torch.full((1, 1, 1, 1), 60.0), torch.full((1, 1, 1, 1), 80.0))
    assert torch.isfinite(far).all() and far.item() > 50
    # the softmax ensemble is not a valid region output
    assert not torch.allclose(torch.sigmoid(ensemble_log_probabilities(za, zb)), torch.sigmoid(out), atol=1e-2)


# ----------------------------------------------------------------------------------------------------------------
# the trainer's wiring on regions
# ----------------------------------------------------------------------------------------------------------------
def _bce_stand_in(seg_outputs, target):
    return nn.functional.binary_cross_entropy_with_logits(seg_outputs[0].float(), target[0].float())


def _region_trainer():
    trainer = object.__new__(nnUNetTrainerDualStream)
    trainer.label_manager = LabelManager(REGION_LABELS, REGIONS_CLASS_ORDER)
    trainer.device = torch.device('cpu')
    trainer.loss = _bce_stand_in
    trainer.global_iteration, trainer.num_epochs, trainer.num_iterations_per_epoch = 3, 1, 10   # t = 0.3
    trainer.loss_components = trainer.build_loss_components()
    return trainer


def _streams():
    """Row 0 labeled, rows 1-2 unlabeled (10 voxels over the unlabeled rows per channel); the two streams' logits
    are drawn independently, so their thresholds and entropy ranks differ (checked in the test)."""
    g = torch.Generator().manual_seed(11)
    a = 2.0 * torch.randn(NUM_ROWS, K, 1, WIDTH, generator=g)
    b = 2.0 * torch.randn(NUM_ROWS, K, 1, WIDTH, generator=g)
    features = {s: torch.randn(NUM_ROWS, DIM, 1, WIDTH, generator=g) for s in 'AB'}
    target = (torch.rand(NUM_LABELED, K, 1, WIDTH, generator=g) > 0.5).float()
    return {'A': a, 'B': b}, features, [target, target[..., ::2]]


def _unlabeled(t):
    """(rows, C, 1, W) -> (unlabeled voxels, C) in row-major order, float64."""
    return t.detach().double().numpy()[NUM_LABELED:, :, 0, :].transpose(0, 2, 1).reshape(-1, t.shape[1])


def test_region_terms_equal_the_independent_computation_in_both_directions():
    logits, features, target = _streams()
    za, zb = _unlabeled(logits['A']), _unlabeled(logits['B'])
    assert not np.array_equal(_ignored(_sig(za)), _ignored(_sig(zb)))
    assert not np.array_equal(za >= 0, zb >= 0)
    net = _FixedStreams(logits, features)
    terms = _region_trainer().composed_loss(net, torch.zeros(NUM_ROWS, 1, 1, WIDTH), target, NUM_LABELED)

    def pseudo(zt, zs):
        return _dc_bce(zs, (_sig(zt) >= 0.5).astype(float), ~_ignored(_sig(zt)))
    fa, fb = _unlabeled(features['A']), _unlabeled(features['B'])
    all_a = logits['A'].double().numpy()[:, :, 0].transpose(0, 2, 1).reshape(-1, K)
    all_b = logits['B'].double().numpy()[:, :, 0].transpose(0, 2, 1).reshape(-1, K)
    expected = {'pseudo': pseudo(za, zb) + pseudo(zb, za),
                'uncertainty': _uncertainty(za, zb) + _uncertainty(zb, za),
                'contrast': _contrast(za, fb) + _contrast(zb, fa),
                'consistency': _cosine(all_a, all_b)}                       # cosine on all rows
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-5), name
    y = target[0].numpy()
    sup = 0.0
    for s in 'AB':
        p = _sig(logits[s].double().numpy()[:NUM_LABELED])
        sup += -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()
    lam = 0.1 * math.exp(-5 * (1 - 0.3) ** 2)
    assert terms['loss'].item() == pytest.approx(sup + lam * sum(expected.values()), rel=1e-5)


@pytest.mark.parametrize('term', ['pseudo', 'uncertainty'])
def test_region_pseudo_label_gradients_reach_each_stream_only_as_the_learner(term):
    logits, features, target = _streams()
    net = _FixedStreams(logits, features)
    terms = _region_trainer().composed_loss(net, torch.zeros(NUM_ROWS, 1, 1, WIDTH), target, NUM_LABELED)
    terms[term].backward()

    def hand(zt, zs):
        if term == 'uncertainty':
            return _uncertainty(zt, zs)
        return _dc_bce(zs, (_sig(zt) >= 0.5).astype(float), ~_ignored(_sig(zt)))
    for learner, teacher in (('A', 'B'), ('B', 'A')):
        grad = net.logits[learner].grad
        assert grad[:NUM_LABELED].abs().max() == 0                          # labeled rows: no pseudo-supervision
        assert net.features[learner].grad is None
        zs, zt = _unlabeled(logits[learner]), _unlabeled(logits[teacher])
        got = _unlabeled(grad)
        for v in range(zs.shape[0]):
            for k in range(K):
                step = np.zeros_like(zs)
                step[v, k] = 1e-6
                numeric = (hand(zt, zs + step) - hand(zt, zs - step)) / 2e-6
                # a teacher that is not detached would add d(term as teacher)/dz here
                assert got[v, k] == pytest.approx(numeric, rel=1e-3, abs=1e-6)


def test_region_contrast_gradient_reaches_only_the_learners_features():
    logits, features, target = _streams()
    net = _FixedStreams(logits, features)
    terms = _region_trainer().composed_loss(net, torch.zeros(NUM_ROWS, 1, 1, WIDTH), target, NUM_LABELED)
    grads = torch.autograd.grad(terms['contrast'], [net.logits['A'], net.logits['B'], net.features['A'],
                                                    net.features['B']], allow_unused=True)
    assert grads[0] is None and grads[1] is None
    for learner, teacher, grad in (('A', 'B', grads[2]), ('B', 'A', grads[3])):
        assert grad[:NUM_LABELED].abs().max() == 0
        zt, e = _unlabeled(logits[teacher]), _unlabeled(features[learner])
        got = _unlabeled(grad)
        for v in range(e.shape[0]):
            for d in range(DIM):
                step = np.zeros_like(e)
                step[v, d] = 1e-6
                numeric = (_contrast(zt, e + step, e) - _contrast(zt, e - step, e)) / 2e-6
                assert got[v, d] == pytest.approx(numeric, rel=1e-3, abs=1e-5)


def _network(num_outputs: int):
    from types import SimpleNamespace
    kwargs = {'n_stages': 3, 'features_per_stage': [4, 8, 16], 'conv_op': 'torch.nn.modules.conv.Conv2d',
              'kernel_sizes': [[3, 3]] * 3, 'strides': [[1, 1], [2, 2], [2, 2]], 'n_conv_per_stage': [2, 2, 2],
              'n_conv_per_stage_decoder': [1, 1], 'conv_bias': True,
              'norm_op': 'torch.nn.modules.instancenorm.InstanceNorm2d',
              'norm_op_kwargs': {'eps': 1e-5, 'affine': True},
              'dropout_op': None, 'dropout_op_kwargs': None, 'nonlin': 'torch.nn.LeakyReLU',
              'nonlin_kwargs': {'inplace': True}}
    configuration = SimpleNamespace(network_arch_class_name='dynamic_network_architectures.architectures.unet.'
                                                            'PlainConvUNet', network_arch_init_kwargs=kwargs,
                                    network_arch_init_kwargs_req_import=['conv_op', 'norm_op', 'dropout_op', 'nonlin'])
    return nnUNetTrainerDualStream.build_network_architecture(None, configuration, 1, num_outputs,
                                                              enable_deep_supervision=True)


def test_the_region_ensemble_travels_with_the_weights_and_loads_strictly():
    net = _network(num_outputs=2)
    net.set_deep_supervision(False)
    net.use_region_ensemble(True)
    state = net.state_dict()
    assert int(state['region_ensemble']) == 1
    fresh = _network(num_outputs=2)              # what the predictor builds: softmax ensemble by default
    fresh.set_deep_supervision(False)
    assert not fresh.regions
    fresh.load_state_dict(state)                 # strict
    assert fresh.regions
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        out = fresh(x)
        mean = (torch.sigmoid(fresh.stream_a(x)) + torch.sigmoid(fresh.stream_b(x))) / 2
    assert torch.allclose(torch.sigmoid(out), mean, atol=1e-5)
    # weights saved before the layout was stored (softmax models) still load strictly, as softmax ensembles
    old = {k: v for k, v in state.items() if k != 'region_ensemble'}
    fresh.load_state_dict(old)
    assert not fresh.regions
