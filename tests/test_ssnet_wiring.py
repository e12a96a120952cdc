"""SS-Net wiring: each test fails on a specific broken copy of the trainer's wiring (features detached before L_cs,
prediction instead of ground truth for the labeled L_cs / memory, VAT passes moving BatchNorm statistics) and the
VAT probe's non-finite fallback is counted instead of silent."""
import copy

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from torch import nn

from nnunetv2_semiseg.losses.dice_vat import (_probe_gradient, dice_discrepancy, l2_normalize_per_sample,
                                              vat_direction_and_fallbacks)
from nnunetv2_semiseg.networks.semiseg_network import SemiSegNetwork
from nnunetv2_semiseg.trainers.components import StepContext
from nnunetv2_semiseg.trainers.ssnet import nnUNetTrainerSSNet_noCS, nnUNetTrainerSSNet_noLDS
from nnunetv2_semiseg.trainers.ssnet_components import DiceVATSmoothness

ACDC_LABELS = {'background': 0, 'RV': 1, 'Myo': 2, 'LV': 3}


def _unet(norm=nn.InstanceNorm2d, num_outputs=4):
    return PlainConvUNet(1, 3, (4, 8, 16), nn.Conv2d, 3, (1, 2, 2), (2, 2, 2), num_outputs, (2, 2), conv_bias=True,
                         norm_op=norm, norm_op_kwargs={'affine': True}, nonlin=nn.LeakyReLU, deep_supervision=True)


def _trainer(cls, norm=nn.InstanceNorm2d):
    base = _unet(norm)
    trainer = object.__new__(cls)
    trainer.label_manager = LabelManager(ACDC_LABELS, None)
    trainer.network = SemiSegNetwork(base, cls.build_training_heads(base, 4))
    trainer.device = torch.device('cpu')
    # stand-in for DC+CE that touches every deep-supervision output
    trainer.loss = lambda seg, target: sum(s.float().pow(2).mean() for s in seg) * 0.01
    trainer.global_iteration, trainer.num_epochs, trainer.num_iterations_per_epoch = 5, 1, 10
    trainer.build_components()
    return trainer


def _targets(full):
    return [full, full[..., ::2, ::2]]


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    data, unlabeled = torch.randn(2, 1, 16, 16, generator=g), torch.randn(2, 1, 16, 16, generator=g)
    # ground truth that differs from the network's own prediction
    gt = torch.randint(0, 4, (2, 1, 16, 16), generator=g)
    return data, unlabeled, gt


class _AllPrototypes(nnUNetTrainerSSNet_noLDS):
    # memory large enough to hold every candidate, no voxel subsampling: counts and losses are exact
    num_prototypes = 512
    cs_max_voxels_per_class = None


def test_cs_gradient_reaches_the_decoder_and_encoder_through_the_features():
    torch.manual_seed(0)
    trainer = _trainer(nnUNetTrainerSSNet_noLDS)
    data, unlabeled, gt = _batch(0)
    terms = trainer.compute_loss_terms(data, _targets(gt), {'data': unlabeled})
    terms['cs'].backward()                               # L_cs alone
    net = trainer.network
    last_stage_conv = net.decoder.stages[-1].convs[-1].conv.weight
    first_encoder_conv = net.encoder.stages[0][0].convs[0].conv.weight
    assert last_stage_conv.grad is not None and last_stage_conv.grad.abs().sum() > 0
    assert first_encoder_conv.grad is not None and first_encoder_conv.grad.abs().sum() > 0
    # the segmentation layers are not on the feature path: L_cs gives them no gradient
    assert net.decoder.seg_layers[-1].weight.grad is None


def test_labeled_memory_and_labeled_cs_use_the_ground_truth_unlabeled_cs_the_prediction():
    torch.manual_seed(1)
    trainer = _trainer(_AllPrototypes)
    data, unlabeled, gt = _batch(1)
    x = torch.cat((data, unlabeled))
    with torch.no_grad():
        prediction = trainer.network(x)[0].argmax(1, keepdim=True)
    terms = trainer.compute_loss_terms(data, _targets(gt), {'data': unlabeled})
    sep = trainer.separation
    counts_if_prediction_were_used = []
    for c in (1, 2, 3):
        correct = int(((gt == c) & (prediction[:2] == c)).sum())
        assert int(sep.memory.counts[c]) == correct, c
        counts_if_prediction_were_used.append(int((prediction[:2] == c).sum()))
    assert counts_if_prediction_were_used != [int(sep.memory.counts[c]) for c in (1, 2, 3)]

    # the term equals L_cs(labeled rows, ground truth) + L_cs(unlabeled rows, prediction) with this memory
    net, heads = trainer.network, trainer.network.heads
    with torch.no_grad():
        features = net.forward_with_features(x)['features']
        gt_masks, gt_rest = sep.class_masks(gt, True)
        pseudo_masks, pseudo_rest = sep.class_masks(prediction[2:], False)
        expected = sep.group_loss(heads, features[:2], gt_masks, gt_rest) \
            + sep.group_loss(heads, features[2:], pseudo_masks, pseudo_rest)
        wrong_masks, wrong_rest = sep.class_masks(prediction[:2], False)
        with_prediction = sep.group_loss(heads, features[:2], wrong_masks, wrong_rest) \
            + sep.group_loss(heads, features[2:], pseudo_masks, pseudo_rest)
    assert terms['cs'].item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(with_prediction.item() - expected.item()) > 1e-4


def test_vat_passes_leave_batchnorm_running_statistics_as_the_main_pass_left_them():
    torch.manual_seed(2)
    trainer = _trainer(nnUNetTrainerSSNet_noCS, norm=nn.BatchNorm2d)
    reference = copy.deepcopy(trainer.network)
    data, unlabeled, gt = _batch(2)
    terms = trainer.compute_loss_terms(data, _targets(gt), {'data': unlabeled})
    assert terms['lds'].item() > 0
    with torch.no_grad():
        reference.forward_with_features(torch.cat((data, unlabeled)))     # the main pass only
    norms = [(n, m) for n, m in trainer.network.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms
    reference_modules = dict(reference.named_modules())
    for name, bn in norms:
        ref = reference_modules[name]
        assert torch.allclose(bn.running_mean, ref.running_mean, atol=1e-7), name
        assert torch.allclose(bn.running_var, ref.running_var, atol=1e-7), name
        assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == 1, name


# ----------------------------------------------------------------------------------------------------------------
# VAT probe: non-finite gradients are counted, float16 overflow is retried in float32
# ----------------------------------------------------------------------------------------------------------------

class _PoisonGradient(torch.autograd.Function):
    """Identity forward; the backward makes the input gradient of sample 1 infinite."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        grad[1] = float('inf')
        return grad


def _toy_predict(model, poison=False):
    def predict(inp):
        return torch.softmax(model(_PoisonGradient.apply(inp) if poison else inp).float(), 1)
    return predict


def test_vat_fallback_count_zero_on_normal_inputs_one_for_a_poisoned_sample():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.LeakyReLU(), nn.Conv2d(3, 3, 1))
    x = torch.randn(3, 1, 8, 8)
    target = _toy_predict(model)(x).detach()
    d0 = torch.rand(x.shape) - 0.5
    clean, count = vat_direction_and_fallbacks(_toy_predict(model), x, target, 0.5, dice_discrepancy, d0)
    assert count.item() == 0
    poisoned, count = vat_direction_and_fallbacks(_toy_predict(model, True), x, target, 0.5, dice_discrepancy, d0)
    assert count.item() == 1
    assert torch.allclose(poisoned[1], l2_normalize_per_sample(d0)[1], atol=1e-6)      # the random direction
    assert torch.allclose(poisoned[[0, 2]], clean[[0, 2]], atol=1e-6)                  # others unaffected


def test_component_logs_the_fallback_count_of_its_step():
    torch.manual_seed(4)
    inner = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.LeakyReLU(), nn.Conv2d(2, 2, 1))

    class Net(nn.Module):
        def __init__(self, poison):
            super().__init__()
            self.inner, self.poison = inner, poison

        def forward(self, x):
            return self.inner(_PoisonGradient.apply(x) if self.poison else x)

    x = torch.randn(2, 1, 8, 8)
    for poison, expected in ((False, 0), (True, 1)):
        net = Net(poison)
        context = StepContext(net=net, x=x, num_labeled=1, target=None, out={'seg': net(x)}, fraction=0.5,
                              to_probabilities=lambda z: torch.softmax(z.float(), 1),
                              to_hard_labels=lambda z: z.argmax(1))
        value = DiceVATSmoothness().loss(context)
        assert torch.isfinite(value)
        assert context.logged['lds_nonfinite'].item() == expected


class _OverflowsInFloat16(torch.autograd.Function):
    """Identity forward; the backward overflows (to inf) when it runs in float16 and is exact in float32: a stand-in
    for a layer whose input gradient exceeds float16's range (65504) under AMP."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if grad.dtype == torch.float16:
            return grad * torch.tensor(7e4, dtype=torch.float16) * 1e4
        return grad


def test_float16_overflow_in_the_probe_is_retried_in_float32():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.LeakyReLU(), nn.Conv2d(2, 2, 1))

    def predict(inp):
        return torch.softmax(model[2](_OverflowsInFloat16.apply(model[1](model[0](inp)))).float(), 1)

    x = torch.randn(2, 1, 16, 16)
    target = torch.softmax(model(x), 1).detach()
    d0 = torch.rand(x.shape) - 0.5
    reference, _ = vat_direction_and_fallbacks(predict, x, target, 0.5, dice_discrepancy, d0)
    with torch.autocast('cpu', dtype=torch.float16):
        raw = _probe_gradient(predict, x, l2_normalize_per_sample(d0), 0.5, dice_discrepancy, target)
        assert not bool(torch.isfinite(raw).any()), 'the float16 probe overflows in this set-up'
        mixed, count = vat_direction_and_fallbacks(predict, x, target, 0.5, dice_discrepancy, d0)
    assert count.item() == 0
    assert torch.allclose(mixed, reference, atol=1e-5)
    assert not torch.allclose(mixed, l2_normalize_per_sample(d0), atol=1e-2)          # not the random fallback
