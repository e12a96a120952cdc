"""nnUNetTrainerDualStream's default objective against an independent computation, in both teaching directions.

Both streams' logits and last-decoder features are hand-built leaf tensors (a stand-in network returns them), chosen
so that the two streams' argmax, entropy ranks and hence their reliable voxels differ. Every unsupervised term of the
default trainer is recomputed here in float64 numpy straight from the paper's formulas (docs/dualstream.md)
with the trainer's documented defaults (80th entropy percentile, T = 0.5 with a tempered KL, pseudo-label terms on the
unlabeled rows, cosine on all rows, weights 0.1 x ramp x 1), and the gradient of each term on each stream is compared
with the one it must have: a stream's logits/features receive gradient only where that stream learns, never as the
teacher, and exp(-KL) is part of the graph.
"""
import math

import numpy as np
import pytest
import torch
from torch import nn
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunetv2_semiseg.trainers.dualstream import nnUNetTrainerDualStream
from nnunetv2_semiseg.trainers.dualstream_components import BOTH_DIRECTIONS

NUM_LABELED, NUM_ROWS, CLASSES, WIDTH, DIM = 2, 4, 3, 5, 2


class _FixedStreams(nn.Module):
    """Stand-in for DualStreamNetwork: forward_streams returns the hand-built tensors (leaves with gradient)."""

    def __init__(self, logits: dict, features: dict):
        super().__init__()
        self.logits = nn.ParameterDict({s: nn.Parameter(v.clone()) for s, v in logits.items()})
        self.features = nn.ParameterDict({s: nn.Parameter(v.clone()) for s, v in features.items()})

    def forward_streams(self, x):
        return {s: {'seg': [self.logits[s], self.logits[s][..., ::2]], 'features': self.features[s]} for s in 'AB'}


def _ce_stand_in(seg_outputs, target):
    return nn.functional.cross_entropy(seg_outputs[0].float(), target[0][:, 0].long())


def _trainer():
    trainer = object.__new__(nnUNetTrainerDualStream)
    trainer.label_manager = LabelManager({'background': 0, 'a': 1, 'b': 2}, None)
    trainer.device = torch.device('cpu')
    trainer.loss = _ce_stand_in
    trainer.global_iteration, trainer.num_epochs, trainer.num_iterations_per_epoch = 3, 1, 10   # t = 0.3
    trainer.loss_components = trainer.build_loss_components()
    return trainer


def _hand_built_streams():
    g = torch.Generator().manual_seed(7)
    logits = {s: 2.0 * torch.randn(NUM_ROWS, CLASSES, 1, WIDTH, generator=g) for s in 'AB'}
    features = {s: torch.randn(NUM_ROWS, DIM, 1, WIDTH, generator=g) for s in 'AB'}
    target = torch.randint(0, CLASSES, (NUM_LABELED, 1, 1, WIDTH), generator=g).float()
    return logits, features, [target, target[..., ::2]]


# ----------------------------------------------------------------------------------------------------------------
# the independent computation (float64 numpy, one direction = teacher -> learner)
# ----------------------------------------------------------------------------------------------------------------
def _softmax(z, axis=1):
    e = np.exp(z - z.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def _voxels(t):
    """(rows, C, 1, W) -> (rows * W, C), the unlabeled rows' voxels in row-major order."""
    return t.detach().double().numpy()[NUM_LABELED:, :, 0, :].transpose(0, 2, 1).reshape(-1, t.shape[1])


def _teacher_view(z_teacher):
    """Pseudo-labels and the 20 % highest-entropy (ignored) voxels of the teacher over the unlabeled voxels."""
    p = _softmax(_voxels(z_teacher))
    entropy = -(p * np.log(p)).sum(1)
    ignored = np.zeros(len(p), bool)
    ignored[np.argsort(-entropy)[:round(0.2 * len(p))]] = True
    return p.argmax(1), ignored, entropy


def _pseudo(z_teacher, z_learner):
    """Eq. 4: CE of the learner to the teacher's argmax over the teacher's valid voxels; and its gradient."""
    labels, ignored, _ = _teacher_view(z_teacher)
    p = _softmax(_voxels(z_learner))
    valid = ~ignored
    value = -np.log(p[np.arange(len(p)), labels])[valid].mean()
    grad = (p - np.eye(CLASSES)[labels]) * valid[:, None] / valid.sum()
    return value, grad


def _uncertainty(z_teacher, z_learner, temperature=0.5):
    """Eq. 7-9: mean(exp(-KL) CE) + mean(KL), q = softmax(z_teacher / T); and its gradient on the learner logits:
    d/dz [w CE + KL] = w (p - y) - w CE (p - q) + (p - q),  w = exp(-KL)  (dKL/dz = p - q, sum_c q = 1)."""
    zt = _voxels(z_teacher)
    q = _softmax(zt / temperature)
    labels = zt.argmax(1)
    p = _softmax(_voxels(z_learner))
    kl = (q * (np.log(q) - np.log(p))).sum(1)
    ce = -np.log(p[np.arange(len(p)), labels])
    w = np.exp(-kl)
    value = np.mean(w * ce) + np.mean(kl)
    grad = (w[:, None] * (p - np.eye(CLASSES)[labels]) - (w * ce)[:, None] * (p - q) + (p - q)) / len(p)
    return value, grad


def _contrast(z_teacher, f_learner, f_pull_prototypes=None):
    """Eq. 10-11: prototypes = mean learner feature of the teacher's reliable voxels per teacher class; uncertain
    voxels pulled to their prototype; 2 - distance between prototypes; distances of unit vectors. The pull's
    prototypes are a constant (stop-gradient): ``f_pull_prototypes`` gives the features they are taken from."""
    labels, uncertain, _ = _teacher_view(z_teacher)
    e = _voxels(f_learner)
    e_fixed = e if f_pull_prototypes is None else _voxels(f_pull_prototypes)

    def unit(v):
        return v / np.linalg.norm(v, axis=-1, keepdims=True)
    prototypes = {c: e[(labels == c) & ~uncertain].mean(0) for c in range(CLASSES)
                  if ((labels == c) & ~uncertain).any()}
    fixed = {c: e_fixed[(labels == c) & ~uncertain].mean(0) for c in prototypes}
    pulls = [np.linalg.norm(unit(e[(labels == c) & uncertain]) - unit(fixed[c]), axis=-1).mean()
             for c in prototypes if ((labels == c) & uncertain).any()]
    classes = sorted(prototypes)
    pairs = [(i, j) for n, i in enumerate(classes) for j in classes[n + 1:]]
    separation = np.mean([2 - np.linalg.norm(unit(prototypes[i]) - unit(prototypes[j])) for i, j in pairs])
    return np.mean(pulls) + separation


def _cosine(z_a, z_b):
    pa, pb = (_softmax(z.detach().double().numpy()) for z in (z_a, z_b))
    return np.mean(1 - (pa * pb).sum(1) / (np.linalg.norm(pa, axis=1) * np.linalg.norm(pb, axis=1)))


def _unlabeled_grad(param):
    """The gradient of a stream's logits on the unlabeled rows, as (voxels, C)."""
    return _voxels(param.grad) if param.grad is not None else np.zeros((2 * WIDTH, CLASSES))


# ----------------------------------------------------------------------------------------------------------------
def test_documented_defaults():
    t = nnUNetTrainerDualStream
    assert (t.entropy_percentile, t.temperature, t.tempered_kl) == (80.0, 0.5, True)
    assert t.teaching_directions == BOTH_DIRECTIONS == (('A', 'B'), ('B', 'A'))
    assert (t.unsupervised_weight, t.rampup_length) == (0.1, 1.0)
    assert (t.pseudo_label_weight, t.uncertainty_weight, t.consistency_weight, t.contrast_weight) == (1, 1, 1, 1)
    assert (t.pseudo_label_rows, t.consistency_rows, t.separation_weight) == ('unlabeled', 'all', 1.0)
    assert (t.use_pseudo_label, t.use_uncertainty, t.use_consistency, t.use_contrast) == (True,) * 4


def test_the_hand_built_streams_disagree_where_it_matters():
    # Otherwise a test below could not tell teacher from learner, or a filtered term from an unfiltered one.
    logits, _, _ = _hand_built_streams()
    labels_a, ignored_a, entropy_a = _teacher_view(logits['A'])
    labels_b, ignored_b, entropy_b = _teacher_view(logits['B'])
    assert (labels_a != labels_b).sum() >= 3
    assert not np.array_equal(ignored_a, ignored_b) and ignored_a.sum() == ignored_b.sum() == 2
    assert not np.array_equal(np.argsort(entropy_a), np.argsort(entropy_b))
    # tempering changes the KL: q(T = 0.5) differs from the plain softmax
    assert _uncertainty(logits['A'], logits['B'])[0] != pytest.approx(
        _uncertainty(logits['A'], logits['B'], temperature=1.0)[0], rel=1e-3)


def test_default_terms_equal_the_independent_computation_in_both_directions():
    logits, features, target = _hand_built_streams()
    net = _FixedStreams(logits, features)
    trainer = _trainer()
    x = torch.zeros(NUM_ROWS, 1, 1, WIDTH)
    terms = trainer.composed_loss(net, x, target, NUM_LABELED)
    za, zb, fa, fb = logits['A'], logits['B'], features['A'], features['B']

    pseudo = _pseudo(za, zb)[0] + _pseudo(zb, za)[0]
    uncertainty = _uncertainty(za, zb)[0] + _uncertainty(zb, za)[0]
    contrast = _contrast(za, fb) + _contrast(zb, fa)
    cosine = _cosine(za, zb)
    assert terms['pseudo'].item() == pytest.approx(pseudo, rel=1e-5)
    assert terms['uncertainty'].item() == pytest.approx(uncertainty, rel=1e-5)
    assert terms['contrast'].item() == pytest.approx(contrast, rel=1e-5)
    assert terms['consistency'].item() == pytest.approx(cosine, rel=1e-5)

    y = target[0][:, 0, 0].long().numpy()
    sup = 0.0
    for z in (za, zb):
        p = _softmax(z.double().numpy()[:NUM_LABELED, :, 0, :].transpose(0, 2, 1).reshape(-1, CLASSES))
        sup += -np.log(p[np.arange(len(p)), y.reshape(-1)]).mean()
    lam = 0.1 * math.exp(-5 * (1 - 0.3) ** 2)
    assert terms['loss'].item() == pytest.approx(sup + lam * (pseudo + uncertainty + contrast + cosine), rel=1e-5)


@pytest.mark.parametrize('term', ['pseudo', 'uncertainty'])
def test_pseudo_label_gradients_reach_each_stream_only_as_the_learner(term):
    logits, features, target = _hand_built_streams()
    net = _FixedStreams(logits, features)
    terms = _trainer().composed_loss(net, torch.zeros(NUM_ROWS, 1, 1, WIDTH), target, NUM_LABELED)
    terms[term].backward()
    hand = _pseudo if term == 'pseudo' else _uncertainty
    za, zb = logits['A'], logits['B']
    # A's logits: only the B -> A direction (A learns); as the teacher of A -> B, A is a constant.
    assert np.allclose(_unlabeled_grad(net.logits['A']), hand(zb, za)[1], atol=1e-6)
    assert np.allclose(_unlabeled_grad(net.logits['B']), hand(za, zb)[1], atol=1e-6)
    for s in 'AB':
        assert net.logits[s].grad[:NUM_LABELED].abs().max() == 0      # labeled rows: no pseudo-supervision
        assert net.features[s].grad is None


def test_contrast_gradient_reaches_only_the_learners_features():
    logits, features, target = _hand_built_streams()
    net = _FixedStreams(logits, features)
    terms = _trainer().composed_loss(net, torch.zeros(NUM_ROWS, 1, 1, WIDTH), target, NUM_LABELED)
    grads = torch.autograd.grad(terms['contrast'], [net.logits['A'], net.logits['B'], net.features['A'],
                                                    net.features['B']], allow_unused=True)
    assert grads[0] is None and grads[1] is None                         # the teachers' logits are constants
    # each stream's features learn from the OTHER stream's reliability split: compare with the finite difference
    # of the independent computation in that one direction
    for learner, teacher, grad in (('A', 'B', grads[2]), ('B', 'A', grads[3])):
        assert grad[:NUM_LABELED].abs().max() == 0
        f = features[learner].double()
        for row in range(NUM_LABELED, NUM_ROWS):
            for d in range(DIM):
                for w in range(WIDTH):
                    step = torch.zeros_like(f)
                    step[row, d, 0, w] = 1e-6
                    numeric = (_contrast(logits[teacher], f + step, f)
                               - _contrast(logits[teacher], f - step, f)) / 2e-6
                    assert grad[row, d, 0, w].item() == pytest.approx(numeric, rel=1e-3, abs=1e-5)
