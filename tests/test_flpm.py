"""nnUNetTrainerFLPM: the FLPM against its formula, L_u and L_r against hand-computed values with gradient checks,
the trainer's loss path on tiny real nnU-Net networks (2D multi-class, 3D regions), and end to end through the stock
CLIs on the tiny synthetic dataset (CPU)."""
import math
import os

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from torch import nn

from nnunetv2_semiseg.losses.flpm_consistency import (feature_perturbed_consistency, prediction_entropy,
                                                      reconstruction_loss)
from nnunetv2_semiseg.networks.flpm import (STD_EPS, FeatureLevelPerturbation, batch_spread, instance_statistics,
                                            perturb_features)
from nnunetv2_semiseg.networks.reconstruction_decoder import ReconstructionDecoder
from nnunetv2_semiseg.networks.semiseg_network import SemiSegNetwork
from nnunetv2_semiseg.trainers.flpm import (nnUNetTrainerFLPM, nnUNetTrainerFLPM_L1, nnUNetTrainerFLPM_fullRec,
                                            nnUNetTrainerFLPM_noFPC, nnUNetTrainerFLPM_noRec)


# ----------------------------------------------------------------------------------------------------------------
# FLPM
# ----------------------------------------------------------------------------------------------------------------

def _flpm(features, epsilons):
    mean, std = instance_statistics(features)
    return perturb_features(features, epsilons, mean, std, batch_spread(mean), batch_spread(std))


def test_flpm_with_zero_epsilon_is_the_identity():
    f = torch.randn(3, 4, 5, 6) * 2 + 1
    out = _flpm(f, torch.zeros(4))
    assert out.shape == (12, 4, 5, 6)
    for m in range(4):
        assert torch.allclose(out[m * 3:(m + 1) * 3], f, atol=1e-5)


def test_flpm_output_matches_the_formula_on_a_hand_built_tensor():
    # 2 unlabeled samples, 1 channel, 4 voxels
    f = torch.tensor([[[1.0, 2.0, 3.0, 4.0]], [[0.0, 0.0, 2.0, 2.0]]])
    m0, m1 = 2.5, 1.0
    s0, s1 = math.sqrt(1.25 + STD_EPS), math.sqrt(1.0 + STD_EPS)          # population variances 1.25 and 1
    d_mu = abs(m0 - m1) / math.sqrt(2)                                    # unbiased std of two values
    d_sigma = abs(s0 - s1) / math.sqrt(2)
    eps = 0.07
    out = _flpm(f, torch.tensor([eps]))
    expected0 = [(s0 + eps * d_sigma) * (v - m0) / s0 + m0 + eps * d_mu for v in (1.0, 2.0, 3.0, 4.0)]
    expected1 = [(s1 + eps * d_sigma) * (v - m1) / s1 + m1 + eps * d_mu for v in (0.0, 0.0, 2.0, 2.0)]
    assert torch.allclose(out[0, 0], torch.tensor(expected0), atol=1e-6)
    assert torch.allclose(out[1, 0], torch.tensor(expected1), atol=1e-6)
    # the perturbed statistics are the shifted ones
    assert out[0, 0].mean().item() == pytest.approx(m0 + eps * d_mu, abs=1e-6)


def test_flpm_perturbations_differ_and_gradient_flows_through_the_normalised_map_only():
    torch.manual_seed(0)
    flpm = FeatureLevelPerturbation(num_perturbations=4, tau=0.1)
    flpm.generator = torch.Generator().manual_seed(0)
    epsilons = flpm.draw_epsilons(torch.device('cpu'))
    assert epsilons.abs().max() <= 0.1 and len(set(epsilons.tolist())) == 4
    f = (torch.randn(3, 2, 6, 6) * 3).requires_grad_(True)
    out = flpm(f, epsilons).view(4, 3, 2, 6, 6)
    for a in range(4):
        for b in range(a + 1, 4):
            assert (out[a] - out[b]).abs().max() > 1e-3
    out.sum().backward()
    # statistics detached: d out / d f = gamma / sigma per (sample, channel), summed over the perturbations
    mean, std = instance_statistics(f)
    gamma = std.unsqueeze(0) + epsilons.view(-1, 1, 1) * batch_spread(std).view(1, 1, -1)
    expected = (gamma / std.unsqueeze(0)).sum(0)
    assert torch.allclose(f.grad, expected[..., None, None].expand_as(f), atol=1e-5)


def test_one_unlabeled_sample_has_no_batch_spread():
    f = torch.randn(1, 3, 4, 4)
    mean, std = instance_statistics(f)
    assert torch.equal(batch_spread(mean), torch.zeros(3)) and torch.equal(batch_spread(std), torch.zeros(3))
    assert torch.allclose(_flpm(f, torch.tensor([0.1, -0.1])), f.repeat(2, 1, 1, 1), atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# L_u and L_r
# ----------------------------------------------------------------------------------------------------------------

def _entropy(p):
    return -sum(v * math.log(v) for v in p)


def test_consistency_hand_value_with_the_one_over_m_factor_and_entropy_weights():
    # M = 3 perturbations of B = 1 sample, C = 2 classes, 2 voxels
    voxel_a = [[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]]            # mean (0.6, 0.4)
    voxel_b = [[0.5, 0.5], [0.5, 0.5], [0.8, 0.2]]            # mean (0.6, 0.4)
    p = torch.tensor([[[voxel_a[m][c], voxel_b[m][c]] for c in range(2)] for m in range(3)]).view(3, 1, 2, 2)

    def g(voxel, norm, weighted):
        mean = [sum(v[c] for v in voxel) / 3 for c in range(2)]
        dist = [(sum(abs(v[c] - mean[c]) ** norm for c in range(2))) ** (1 / norm) for v in voxel]
        w = [math.exp(-_entropy(v)) if weighted else 1.0 for v in voxel]
        return sum(wi * di for wi, di in zip(w, dist)) / sum(w) / 3

    for norm in (1, 2):
        for weighted in (True, False):
            expected = (g(voxel_a, norm, weighted) + g(voxel_b, norm, weighted)) / 2
            value = feature_perturbed_consistency(p, norm=norm, entropy_weighted=weighted)
            assert value.item() == pytest.approx(expected, rel=1e-5), (norm, weighted)
    # e.g. voxel a, L2, weighted: distances (0.3 sqrt 2, 0, 0.3 sqrt 2)
    w = [math.exp(-_entropy(v)) for v in voxel_a]
    assert g(voxel_a, 2, True) == pytest.approx((w[0] + w[2]) * 0.3 * math.sqrt(2) / sum(w) / 3)


def test_consistency_weights_carry_no_gradient():
    torch.manual_seed(1)
    logits = torch.randn(4, 2, 3, 5, requires_grad=True)
    p = torch.softmax(logits, 2)
    feature_perturbed_consistency(p).backward()
    ours = logits.grad.clone()

    def reference(detach_weights):
        logits.grad = None
        q = torch.softmax(logits, 2)
        dist = (q - q.mean(0, keepdim=True)).pow(2).sum(2).sqrt()
        h = -(q * q.log()).sum(2)
        w = torch.exp(-(h.detach() if detach_weights else h))
        ((w * dist).sum(0) / w.sum(0) / 4).mean().backward()
        return logits.grad.clone()

    assert torch.allclose(ours, reference(True), atol=1e-6)
    assert not torch.allclose(ours, reference(False), atol=1e-4)


def test_region_entropy_sums_binary_entropies():
    p = torch.tensor([[0.9], [0.5]]).view(1, 2, 1)
    expected = _entropy([0.9, 0.1]) + _entropy([0.5, 0.5])
    assert prediction_entropy(p, regions=True).item() == pytest.approx(expected, rel=1e-6)
    assert prediction_entropy(p, regions=False).item() == pytest.approx(-(0.9 * math.log(0.9) + 0.5 * math.log(0.5)))


def _unet(dim=2, num_outputs=4, in_channels=1):
    conv = nn.Conv2d if dim == 2 else nn.Conv3d
    norm = nn.InstanceNorm2d if dim == 2 else nn.InstanceNorm3d
    return PlainConvUNet(in_channels, 3, (4, 8, 16), conv, 3, (1, 2, 2), (2, 2, 2), num_outputs, (2, 2),
                         conv_bias=True, norm_op=norm, norm_op_kwargs={'affine': True}, nonlin=nn.LeakyReLU,
                         deep_supervision=True)


@pytest.mark.parametrize('convs_per_stage', [1, 2])
def test_penultimate_feature_and_last_stage_head_reproduce_the_logits(convs_per_stage):
    torch.manual_seed(4)
    base = PlainConvUNet(1, 3, (4, 8, 16), nn.Conv2d, 3, (1, 2, 2), (2, 2, 2), 3, (convs_per_stage,) * 2,
                         conv_bias=True, norm_op=nn.InstanceNorm2d, norm_op_kwargs={'affine': True},
                         nonlin=nn.LeakyReLU, deep_supervision=True)
    net = SemiSegNetwork(base, None)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        out = net.forward_with_features(x)
        assert torch.allclose(net.last_stage_head(out['penultimate']), out['seg'][0], atol=1e-6)
        assert torch.allclose(out['seg'][0], base(x)[0], atol=1e-6)
    # one block per stage: the feature is the last stage's input (upsampled features + skip)
    expected_channels = 8 if convs_per_stage == 1 else 4
    assert out['penultimate'].shape[1] == expected_channels


def test_reconstruction_decoder_shape_keys_and_gradient_reaches_the_encoder():
    torch.manual_seed(2)
    base = _unet(2, 4, in_channels=2)
    decoder = ReconstructionDecoder(base)
    keys = list(decoder.state_dict())
    assert not any('encoder' in k for k in keys)                       # shared encoder is not duplicated
    assert len(decoder.decoder.seg_layers) == 1 and decoder.decoder.seg_layers[0].out_channels == 2
    x = torch.randn(2, 2, 16, 16)
    reconstruction = decoder(base.encoder(x))
    assert reconstruction.shape == x.shape
    loss = reconstruction_loss(reconstruction, x)
    assert loss.item() == pytest.approx(((reconstruction - x) ** 2).mean().item(), rel=1e-6)
    loss.backward()
    assert base.encoder.stages[0][0].convs[0].conv.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in decoder.parameters())      # DDP: every parameter gets a gradient
    assert all(p.grad is None for p in base.decoder.parameters() if p not in set(base.encoder.parameters()))


# ----------------------------------------------------------------------------------------------------------------
# The trainer's loss path without the nnU-Net data pipeline
# ----------------------------------------------------------------------------------------------------------------

def _sum_of_outputs_loss(seg_outputs, target):
    return sum(s.float().pow(2).mean() for s in seg_outputs) * 0.01


def _loss_only_trainer(cls, label_manager, dim, num_outputs, in_channels=1):
    base = _unet(dim, num_outputs, in_channels)
    trainer = object.__new__(cls)
    trainer.label_manager = label_manager
    trainer.network = SemiSegNetwork(base, cls.build_training_heads(base, num_outputs))
    trainer.device = torch.device('cpu')
    trainer.loss = _sum_of_outputs_loss
    trainer.global_iteration, trainer.num_epochs, trainer.num_iterations_per_epoch = 5, 1, 10
    trainer.loss_components = trainer.build_loss_components()
    return trainer


@pytest.mark.parametrize('dim,labels,regions', [
    (2, {'background': 0, 'RV': 1, 'Myo': 2, 'LV': 3}, None),
    (3, {'background': 0, 'whole': [1, 2], 'core': [2]}, [1, 2]),
])
def test_flpm_step_terms_gradients_and_untouched_labeled_rows(dim, labels, regions):
    torch.manual_seed(3)
    lm = LabelManager(labels, regions)
    trainer = _loss_only_trainer(nnUNetTrainerFLPM, lm, dim, lm.num_segmentation_heads, in_channels=2)
    spatial = (16, 16) if dim == 2 else (8, 16, 16)
    data = torch.randn(2, 2, *spatial, requires_grad=True)
    unlabeled = torch.randn(3, 2, *spatial)
    terms = trainer.compute_loss_terms(data, None, {'data': unlabeled})
    assert set(terms) == {'loss', 'sup', 'fpc', 'rec'}
    assert terms['fpc'].item() > 0 and terms['rec'].item() > 0
    fraction = 0.5
    assert terms['loss'].item() == pytest.approx(
        terms['sup'].item() + 0.1 * math.exp(-5 * (1 - fraction) ** 2) * terms['fpc'].item()
        + 0.5 * terms['rec'].item(), rel=1e-5)
    # labeled rows are not perturbed: L_u does not depend on them (InstanceNorm keeps rows independent)
    grad_labeled, = torch.autograd.grad(terms['fpc'], data, retain_graph=True)
    assert grad_labeled.abs().max() == 0
    terms['loss'].backward()
    assert [n for n, p in trainer.network.named_parameters() if p.grad is None] == []
    # inference is the plain U-Net: the heads never enter network(x)
    trainer.network.eval()
    x = torch.randn(1, 2, *spatial)
    with torch.no_grad():
        assert torch.equal(trainer.network(x)[0], _StockView(trainer.network)(x)[0])


class _StockView(nn.Module):
    """The student's encoder and decoder without heads (what the plain export keeps)."""

    def __init__(self, net):
        super().__init__()
        self.encoder, self.decoder = net.encoder, net.decoder

    def forward(self, x):
        return self.decoder(self.encoder(x))


def test_variants_change_one_thing():
    lm = LabelManager({'background': 0, 'fg': 1}, None)
    assert nnUNetTrainerFLPM_noRec.build_training_heads(_unet(), 2) is None
    default = nnUNetTrainerFLPM.build_training_heads(_unet(), 2)   # one block per stage: the 1.75x cost bound
    assert isinstance(default, ReconstructionDecoder) and [len(s.convs) for s in default.decoder.stages] == [1, 1]
    full = nnUNetTrainerFLPM_fullRec.build_training_heads(_unet(), 2)    # the segmentation decoder's shape
    assert [len(s.convs) for s in full.decoder.stages] == [2, 2]
    no_rec = _loss_only_trainer(nnUNetTrainerFLPM_noRec, lm, 2, 2)
    assert [c.name for c in no_rec.loss_components] == ['fpc']
    no_fpc = _loss_only_trainer(nnUNetTrainerFLPM_noFPC, lm, 2, 2)
    assert not no_fpc.loss_components[0].entropy_weighted and no_fpc.loss_components[0].norm == 2
    l1 = _loss_only_trainer(nnUNetTrainerFLPM_L1, lm, 2, 2)
    assert l1.loss_components[0].norm == 1 and l1.loss_components[0].entropy_weighted
    default = _loss_only_trainer(nnUNetTrainerFLPM, lm, 2, 2).loss_components[0]
    assert default.perturbation.num_perturbations == 4 and default.perturbation.tau == 0.1


# ----------------------------------------------------------------------------------------------------------------
# End to end through the stock CLIs (tiny synthetic dataset from conftest, CPU)
# ----------------------------------------------------------------------------------------------------------------

def run_train_resume_predict_export(ws, tmp_path, configuration, trainer, terms):
    """Train 1 epoch x 2 iterations, resume to 2 epochs with --c, predict strictly, export plain; returns the final
    checkpoint."""
    from test_ssnet_trainer import _load, _predict, _strictly_loaded_network, _train
    _train(ws, configuration, trainer, 1, 2)
    fold = os.path.join(ws.model_folder(trainer, configuration), 'fold_0')
    first = _load(os.path.join(fold, 'checkpoint_final.pth'))
    _train(ws, configuration, trainer, 2, 2, '--c')
    final = _load(os.path.join(fold, 'checkpoint_final.pth'))
    assert final['current_epoch'] == 2 and final['semiseg']['global_iteration'] == 4
    for term in terms:
        values = final['logging'][f'train_{term}']
        assert len(values) == 2 and all(np.isfinite(values)), (term, values)
        assert values[0] == pytest.approx(first['logging'][f'train_{term}'][0])
    _predict(ws, configuration, trainer, str(tmp_path / 'pred'))
    plain_folder = str(tmp_path / 'plain')
    ws.run('nnUNetv2_semiseg_export_plain', '-i', ws.model_folder(trainer, configuration), '-o', plain_folder)
    plain = _strictly_loaded_network(plain_folder)
    assert not any(k.startswith('heads.') for k in plain.state_dict())
    net = _strictly_loaded_network(ws.model_folder(trainer, configuration))
    x = torch.randn(1, 1, *net.patch_size)
    with torch.no_grad():
        assert torch.equal(plain(x), net(x))
    return final


@pytest.mark.parametrize('configuration', ['3d_fullres', '2d'])
def test_flpm_train_resume_predict_export(workspace, tmp_path, configuration):
    final = run_train_resume_predict_export(workspace, tmp_path, configuration, 'nnUNetTrainerFLPM',
                                            ('sup', 'fpc', 'rec'))
    assert final['logging']['train_fpc'][0] > 0 and final['logging']['train_rec'][0] > 0
    assert any(k.startswith('heads.decoder.stages.') for k in final['network_weights'])


def test_no_norm_after_variant_perturbs_the_last_decoder_feature():
    """_noNormAfter: the M perturbed copies are the last decoder feature of the unlabeled rows (not the
    penultimate one) through the 1x1 segmentation layer; a mean-only shift there reaches the logits."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from nnunetv2_semiseg.networks.semiseg_network import SemiSegNetwork
    from nnunetv2_semiseg.trainers.components import StepContext
    from nnunetv2_semiseg.trainers.flpm import nnUNetTrainerFLPM_noNormAfter
    from nnunetv2_semiseg.trainers.flpm_components import FeaturePerturbedConsistency
    assert nnUNetTrainerFLPM_noNormAfter.perturbation_placement == 'features'
    torch.manual_seed(0)
    base = PlainConvUNet(1, 2, (4, 8), torch.nn.Conv2d, 3, (1, 2), 2, 2, (2,), False, torch.nn.InstanceNorm2d,
                         {'eps': 1e-5, 'affine': True}, None, None, torch.nn.LeakyReLU, {'inplace': True})
    net = SemiSegNetwork(base)
    x = torch.randn(3, 1, 8, 8)
    out = net.forward_with_features(x)
    context = StepContext(net=net, x=x, num_labeled=1, target=None, out=out, fraction=0.5,
                          to_probabilities=lambda l: torch.softmax(l.float(), 1), to_hard_labels=lambda l: l.argmax(1))
    component = FeaturePerturbedConsistency(num_perturbations=2, placement='features')
    eps = torch.tensor([0.1, -0.05])
    component.perturbation = _FixedEps(component.perturbation, eps)
    got = component.perturbed_probabilities(context)
    f = out['features'][1:].detach()
    m, s = f.flatten(2).mean(2), (f.flatten(2).var(2, unbiased=False) + 1e-6).sqrt()
    dm, ds = m.std(0), s.std(0)
    expected = []
    for e in eps:
        g = ((s + e * ds)[..., None, None] * (f - m[..., None, None]) / s[..., None, None]
             + (m + e * dm)[..., None, None])
        expected.append(torch.softmax(net.decoder.seg_layers[-1](g), 1))
    assert torch.allclose(got, torch.stack(expected), atol=1e-5)
    with pytest.raises(ValueError, match='placement'):
        FeaturePerturbedConsistency(placement='skips')


class _FixedEps:
    def __init__(self, perturbation, eps):
        self.inner, self.eps, self.num_perturbations = perturbation, eps, perturbation.num_perturbations

    def __call__(self, features):
        return self.inner(features, self.eps)


def test_flpm_no_norm_after_trains_through_the_cli(workspace, tmp_path):
    final = run_train_resume_predict_export(workspace, tmp_path, '3d_fullres', 'nnUNetTrainerFLPM_noNormAfter',
                                            ('sup', 'fpc', 'rec'))
    assert final['logging']['train_fpc'][0] > 0
