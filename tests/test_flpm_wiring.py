"""nnUNetTrainerFLPM's step wiring against an independent computation on a tiny real PlainConvUNet.

The network has two convolution blocks per decoder stage, so the penultimate feature (input of the last block) and
the last decoder feature have the same channel count: feeding the wrong one cannot fail by a shape mismatch, only by
its values. The expected L_u is rebuilt from a forward hook on the stock network (not from the package's forward),
SFPC Eq. 1-5 written out with the batch spread over the unlabeled rows only and perturbation m of sample j kept
together; the expected L_r is the reconstruction decoder on the stock encoder's skips of every row.
"""
import math

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from torch import nn

from nnunetv2_semiseg.networks.semiseg_network import SemiSegNetwork
from nnunetv2_semiseg.trainers.flpm import nnUNetTrainerFLPM

NUM_LABELED, NUM_UNLABELED, CLASSES, SEED = 2, 3, 3, 11


pytestmark = pytest.mark.usefixtures('one_torch_thread')


def _trainer():
    torch.manual_seed(5)
    base = PlainConvUNet(1, 3, (4, 8, 16), nn.Conv2d, 3, (1, 2, 2), (2, 2, 2), CLASSES, (2, 2), conv_bias=True,
                         norm_op=nn.InstanceNorm2d, norm_op_kwargs={'affine': True}, nonlin=nn.LeakyReLU,
                         deep_supervision=True)
    with torch.no_grad():      # confident logits: the perturbations' effect on the probabilities is well measurable
        base.decoder.seg_layers[-1].weight.mul_(10.0)
    trainer = object.__new__(nnUNetTrainerFLPM)
    trainer.label_manager = LabelManager({'background': 0, 'a': 1, 'b': 2}, None)
    trainer.network = SemiSegNetwork(base, nnUNetTrainerFLPM.build_training_heads(base, CLASSES))
    trainer.device = torch.device('cpu')
    trainer.loss = lambda seg, target: sum(s.float().pow(2).mean() for s in seg) * 0.01
    trainer.global_iteration, trainer.num_epochs, trainer.num_iterations_per_epoch = 5, 1, 10   # t = 0.5
    trainer.loss_components = trainer.build_loss_components()
    trainer.loss_components[0].perturbation.generator = torch.Generator().manual_seed(SEED)
    return trainer, base


def _batch():
    g = torch.Generator().manual_seed(1)
    # labeled rows with a much larger scale: their statistics would change the batch spread if they were included
    data = 5.0 * torch.randn(NUM_LABELED, 1, 16, 16, generator=g) + 3.0
    return data, torch.randn(NUM_UNLABELED, 1, 16, 16, generator=g)


def sfpc_by_hand(f, decode, seed=SEED, num_perturbations=4, epsilon=0.1):
    """SFPC Eq. 1-5 by hand on the captured penultimate feature ``f`` (float64, spread over all its rows): M epsilons
    drawn as the trainer draws them (U[-epsilon, epsilon] from a generator seeded ``seed``), gamma/beta of Eq. 1-3,
    ``decode`` (last block + 1x1 segmentation layer), entropy weights exp(-H) and the L2 distance to the mean of
    Eq. 4-5. Returns (L_u, the M perturbed probabilities)."""
    with torch.no_grad():
        return _sfpc_by_hand(f, decode, seed, num_perturbations, epsilon)


def _sfpc_by_hand(f, decode, seed, num_perturbations, epsilon):
    mean = f.mean((2, 3))
    std = (f.var((2, 3), unbiased=False) + 1e-6).sqrt()
    mean_spread, std_spread = mean.std(0), std.std(0)
    u = torch.rand(num_perturbations, generator=torch.Generator().manual_seed(seed)).double()
    probabilities = []
    for eps in (2 * u - 1) * epsilon:
        gamma, beta = std + eps * std_spread, mean + eps * mean_spread
        g = gamma[..., None, None] * (f - mean[..., None, None]) / std[..., None, None] + beta[..., None, None]
        probabilities.append(torch.softmax(decode(g.float()).double(), 1))
    p = torch.stack(probabilities)                                               # (M, B_u, C, H, W)
    weights = torch.exp((p * torch.log(p)).sum(2))                               # exp(-H(p_m))
    distance = ((p - p.mean(0, keepdim=True)) ** 2).sum(2).sqrt()
    return ((weights * distance).sum(0) / weights.sum(0) / num_perturbations).mean().item(), p


def _expected_consistency(base, x):
    """L_u by hand: penultimate feature from a hook on the stock network, Eq. 1-3 with M = 4 epsilons drawn as the
    trainer draws them (U[-0.1, 0.1]), last block + 1x1 segmentation layer, Eq. 4-5 with entropy weights."""
    seen = {}
    last_block = base.decoder.stages[-1].convs[-1]
    handle = last_block.register_forward_pre_hook(lambda module, args: seen.setdefault('f', args[0]))
    with torch.no_grad():
        base(x)
        handle.remove()
        f = seen['f'][NUM_LABELED:].double()                                         # unlabeled rows only
    return sfpc_by_hand(f, lambda g: base.decoder.seg_layers[-1](last_block(g)))


def test_fpc_perturbs_the_penultimate_feature_of_the_unlabeled_rows_with_their_own_spread():
    trainer, base = _trainer()
    data, unlabeled = _batch()
    expected, expected_probabilities = _expected_consistency(base, torch.cat((data, unlabeled)))
    terms = trainer.compute_loss_terms(data, None, {'data': unlabeled})
    assert terms['fpc'].item() == pytest.approx(expected, rel=1e-4)
    assert terms['fpc'].item() > 1e-4
    # the same M x B_u probabilities, perturbation-major (row m * B_u + j = perturbation m of sample j)
    trainer.loss_components[0].perturbation.generator = torch.Generator().manual_seed(SEED)
    x = torch.cat((data, unlabeled))
    context = trainer.make_context(trainer.network, x, None, NUM_LABELED)
    with torch.no_grad():
        got = trainer.loss_components[0].perturbed_probabilities(context)
    assert torch.allclose(got.double(), expected_probabilities, atol=1e-5)


def test_reconstruction_reads_every_row_and_trains_the_encoder():
    trainer, base = _trainer()
    data, unlabeled = _batch()
    x = torch.cat((data, unlabeled))
    with torch.no_grad():
        reconstruction = trainer.network.heads(base.encoder(x))
        expected = ((reconstruction.double() - x.double()) ** 2).mean().item()
        only_unlabeled = ((reconstruction[NUM_LABELED:].double() - unlabeled.double()) ** 2).mean().item()
    assert abs(expected - only_unlabeled) > 0.05 * expected                # the rows matter for the value
    terms = trainer.compute_loss_terms(data, None, {'data': unlabeled})
    assert terms['rec'].item() == pytest.approx(expected, rel=1e-5)
    assert terms['loss'].item() == pytest.approx(
        terms['sup'].item() + 0.1 * math.exp(-5 * 0.5 ** 2) * terms['fpc'].item() + 0.5 * expected, rel=1e-5)
    # L_r's gradient reaches the shared encoder through the skips, on every stage
    encoder_weights = [stage[0].convs[0].conv.weight for stage in base.encoder.stages]
    grads = torch.autograd.grad(terms['rec'], encoder_weights, allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
