"""Unit tests of SS-Net's losses and components against hand-computed values, with gradient checks."""
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_semiseg.losses.dice_vat import (PAPER_LA_EPSILON, PAPER_LA_PATCH_SIZE, dice_discrepancy,
                                              kl_discrepancy, l2_normalize_per_sample, norm_for_sample_size,
                                              per_element_rms, vat_direction, virtual_adversarial_loss)
from nnunetv2_semiseg.losses.prototypes import (PrototypeMemory, class_separation_loss, gather_selected_across_ranks,
                                                gather_voxel_features, select_prototypes, subsample_indices,
                                                weighted_prototype_distance)
from nnunetv2_semiseg.networks.ssnet_heads import SSNetHeads
from nnunetv2_semiseg.trainers.ssnet_components import DiceVATSmoothness, PrototypeSeparation, frozen_norm_statistics


# ----------------------------------------------------------------------------------------------------------------
# Discrepancies
# ----------------------------------------------------------------------------------------------------------------

def test_dice_discrepancy_hand_value():
    # one sample, two classes, two voxels
    pred = torch.tensor([[[0.8, 0.4], [0.2, 0.6]]])
    target = torch.tensor([[[1.0, 0.5], [0.0, 0.5]]])
    # class 0: I = 0.8*1 + 0.4*0.5 = 1.0, S = 0.64 + 0.16 + 1 + 0.25 = 2.05
    # class 1: I = 0.2*0 + 0.6*0.5 = 0.3, S = 0.04 + 0.36 + 0 + 0.25 = 0.65
    expected = 1.0 - (2 * 1.0 / 2.05 + 2 * 0.3 / 0.65) / 2
    assert dice_discrepancy(pred, target).item() == pytest.approx(expected, rel=1e-6)
    assert dice_discrepancy(target, target).item() == pytest.approx(0.0, abs=1e-7)


def test_dice_discrepancy_sums_over_batch_and_space():
    # (B=2, C=1, 1x2) sigmoid/region layout: one Dice per channel over batch and voxels
    pred = torch.tensor([[[[0.9, 0.1]]], [[[0.5, 0.5]]]])
    target = torch.tensor([[[[1.0, 0.0]]], [[[1.0, 1.0]]]])
    inter = 0.9 + 0.5 + 0.5
    den = (0.81 + 0.01 + 0.25 + 0.25) + (1 + 0 + 1 + 1)
    assert dice_discrepancy(pred, target).item() == pytest.approx(1 - 2 * inter / den, rel=1e-6)


def test_kl_discrepancy_hand_values():
    q = torch.tensor([[[0.5, 1.0], [0.5, 0.0]]])       # target (clean prediction)
    p = torch.tensor([[[0.25, 0.5], [0.75, 0.5]]])     # perturbed prediction
    kl1 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    kl2 = 1.0 * math.log(1.0 / 0.5)
    assert kl_discrepancy(p, q).item() == pytest.approx((kl1 + kl2) / 2, rel=1e-5)
    # Bernoulli form for regions: 1 channel, 2 voxels
    qr = torch.tensor([[[0.5, 0.9]]])
    pr = torch.tensor([[[0.25, 0.6]]])
    b1 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    b2 = 0.9 * math.log(0.9 / 0.6) + 0.1 * math.log(0.1 / 0.4)
    assert kl_discrepancy(pr, qr, regions=True).item() == pytest.approx((b1 + b2) / 2, rel=1e-5)


def test_epsilon_conversion_matches_paper_la_rms():
    rms = per_element_rms(PAPER_LA_EPSILON, PAPER_LA_PATCH_SIZE)
    assert rms == pytest.approx(10 / math.sqrt(112 * 112 * 80))
    assert rms == pytest.approx(0.009982, abs=1e-6)
    # the paper's own patch gives back epsilon = 10; a 128^3 nnU-Net patch needs 10 * sqrt(128^3 / 1003520)
    assert norm_for_sample_size(rms, 112 * 112 * 80) == pytest.approx(10.0)
    assert norm_for_sample_size(rms, 128 ** 3) == pytest.approx(10 * math.sqrt(128 ** 3 / (112 * 112 * 80)))
    # DiceVATSmoothness derives the norms from the actual per-sample size (channels included)
    smooth = DiceVATSmoothness(rms, rms)
    eps, xi = smooth.norms(torch.zeros(3, 2, 8, 8))
    assert eps == pytest.approx(rms * math.sqrt(2 * 64)) and xi == pytest.approx(eps)


# ----------------------------------------------------------------------------------------------------------------
# VAT direction on a toy 1x1-convolution softmax model, compared with the analytic gradient
# ----------------------------------------------------------------------------------------------------------------

A = torch.tensor([1.0, -2.0, 0.5])      # per-class weight of the single input channel
BIAS = torch.tensor([0.1, 0.0, -0.3])


def _toy_model():
    conv = nn.Conv2d(1, 3, 1)
    with torch.no_grad():
        conv.weight.copy_(A.view(3, 1, 1, 1))
        conv.bias.copy_(BIAS)
    return conv


def _toy_probs(x):  # analytic model: p = softmax(a * x + b) per voxel, no autograd needed
    return torch.softmax(A.view(1, 3, 1, 1) * x + BIAS.view(1, 3, 1, 1), dim=1)


def _analytic_dice_gradient_wrt_input(x_pert, q, smooth=1e-10):
    """dD/dx' for D = 1 - 1/C sum_c (2 I_c + s) / (S_c + s), p = softmax(a x' + b), written out by hand."""
    p = _toy_probs(x_pert)
    C = p.shape[1]
    dims = (0, 2, 3)
    inter = (p * q).sum(dims).view(1, C, 1, 1)
    s = ((p * p).sum(dims) + (q * q).sum(dims)).view(1, C, 1, 1)
    # dD/dp_cv = -(1/C) [2 q_cv (S_c + s) - (2 I_c + s) 2 p_cv] / (S_c + s)^2
    g_p = -(1.0 / C) * (2 * q * (s + smooth) - (2 * inter + smooth) * 2 * p) / (s + smooth) ** 2
    # softmax Jacobian: dD/dz_k = p_k (g_k - sum_c g_c p_c); dz_k/dx' = a_k
    g_z = p * (g_p - (g_p * p).sum(1, keepdim=True))
    return (g_z * A.view(1, 3, 1, 1)).sum(1, keepdim=True)


def test_vat_direction_matches_analytic_gradient_and_leaves_params_untouched():
    torch.manual_seed(0)
    model = _toy_model()
    predict = lambda inp: torch.softmax(model(inp), 1)
    x = torch.randn(2, 1, 3, 4)
    q = _toy_probs(x)                                    # clean prediction as VAT target
    d0 = torch.rand(x.shape) - 0.5
    xi = 0.7
    direction = vat_direction(predict, x, q, xi, dice_discrepancy, initial_direction=d0)

    x_pert = x + xi * l2_normalize_per_sample(d0)
    g = xi * _analytic_dice_gradient_wrt_input(x_pert, q)      # chain rule through x' = x + xi d
    expected = g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert torch.allclose(direction, expected, atol=1e-5)
    assert torch.allclose(direction.flatten(1).norm(dim=1), torch.ones(2), atol=1e-6)
    for p in model.parameters():
        assert p.grad is None, 'the power step must not write parameter gradients'


def test_virtual_adversarial_loss_norm_value_and_gradients():
    torch.manual_seed(1)
    model = _toy_model()
    predict = lambda inp: torch.softmax(model(inp), 1)
    x = torch.randn(3, 1, 4, 5)
    target_leaf = _toy_probs(x).clone().requires_grad_(True)   # must be treated as a constant
    d0 = torch.rand(x.shape) - 0.5
    eps, xi = 2.5, 0.3
    loss, r_adv = virtual_adversarial_loss(predict, x, target_leaf, eps, xi, dice_discrepancy, initial_direction=d0)

    # ||r_adv||_2 = epsilon for every sample
    assert torch.allclose(r_adv.flatten(1).norm(dim=1), torch.full((3,), eps), atol=1e-5)
    # hand-computed value: analytic direction, then the Dice formula written out
    q = _toy_probs(x)
    g = _analytic_dice_gradient_wrt_input(x + xi * l2_normalize_per_sample(d0), q)
    r_expected = eps * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert torch.allclose(r_adv, r_expected, atol=1e-5)
    p_adv = _toy_probs(x + r_expected).numpy()
    qn = q.numpy()
    dice = [(2 * (p_adv[:, c] * qn[:, c]).sum() + 1e-10) / ((p_adv[:, c] ** 2).sum() + (qn[:, c] ** 2).sum() + 1e-10)
            for c in range(3)]
    assert loss.item() == pytest.approx(1 - np.mean(dice), rel=1e-4, abs=1e-7)
    assert loss.item() > 0

    for p in model.parameters():
        assert p.grad is None
    loss.backward()
    assert target_leaf.grad is None, 'the VAT target must be detached'
    assert model.weight.grad is not None and model.weight.grad.abs().sum() > 0
    assert model.bias.grad is not None


def test_kl_vat_direction_matches_autograd_reference():
    """KL-VAT: the direction equals the normalised input gradient of KL(q || p(x + xi d)) computed directly."""
    torch.manual_seed(2)
    model = _toy_model()
    predict = lambda inp: torch.softmax(model(inp), 1)
    x = torch.randn(2, 1, 3, 3)
    q = _toy_probs(x)
    d0 = torch.rand(x.shape) - 0.5
    direction = vat_direction(predict, x, q, 0.5, kl_discrepancy, initial_direction=d0)
    # reference via the analytic KL gradient: dKL/dz_k = (p_k - q_k) / #voxels  (mean over B * H * W)
    xp = x + 0.5 * l2_normalize_per_sample(d0)
    p = _toy_probs(xp)
    g = ((p - q) * A.view(1, 3, 1, 1)).sum(1, keepdim=True)
    expected = g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert torch.allclose(direction, expected, atol=1e-5)


def test_vat_direction_zero_gradient_keeps_random_direction():
    # a constant predictor has zero input gradient: the random unit direction is kept
    predict = lambda inp: torch.full((inp.shape[0], 2, *inp.shape[2:]), 0.5) + 0 * inp
    x = torch.randn(2, 1, 3, 3)
    d0 = torch.rand(x.shape) - 0.5
    direction = vat_direction(predict, x, predict(x), 1.0, dice_discrepancy, initial_direction=d0)
    assert torch.allclose(direction, l2_normalize_per_sample(d0), atol=1e-6)


def test_frozen_norm_statistics_keeps_running_stats():
    bn = nn.BatchNorm2d(2)
    before = bn.running_mean.clone()
    with frozen_norm_statistics(bn):
        bn(torch.randn(4, 2, 3, 3) + 5)
    assert torch.equal(bn.running_mean, before) and bn.track_running_stats
    bn(torch.randn(4, 2, 3, 3) + 5)
    assert not torch.equal(bn.running_mean, before)


# ----------------------------------------------------------------------------------------------------------------
# Prototype memory and separation loss
# ----------------------------------------------------------------------------------------------------------------

def test_select_prototypes_highest_and_lowest():
    cand = torch.arange(10.0).view(5, 2)
    scores = torch.tensor([0.3, 0.9, 0.1, 0.7, 0.5])
    rows, s = select_prototypes(cand, scores, 2, 'highest')
    assert torch.equal(rows, cand[[1, 3]]) and torch.equal(s, scores[[1, 3]])
    rows, _ = select_prototypes(cand, scores, 2, 'lowest')
    assert torch.equal(rows, cand[[2, 0]])
    rows, _ = select_prototypes(cand, scores, 32, 'highest')
    assert rows.shape == (5, 2)
    with pytest.raises(ValueError):
        select_prototypes(cand, scores, 2, 'middle')


def test_prototype_memory_update_persist_and_state_dict():
    mem = PrototypeMemory(num_classes=3, num_prototypes=3, dim=2, keep='highest')
    cand = torch.tensor([[1., 0.], [2., 0.], [3., 0.], [4., 0.], [5., 0.]])
    scores = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7])
    mem.update(1, cand, scores)
    assert torch.equal(mem.get(1), cand[[2, 4, 0]])           # exactly the top-3
    assert mem.get(2).shape == (0, 2) and mem.get(0).shape == (0, 2)
    mem.update(2, cand[:2], scores[:2])
    assert torch.equal(mem.get(2), cand[[0, 1]])
    mem.update(1, cand[:0], scores[:0])                        # class 1 absent from the batch: persists
    assert torch.equal(mem.get(1), cand[[2, 4, 0]])
    mem.update(1, cand[3:4], scores[3:4])                      # replaced, not accumulated
    assert torch.equal(mem.get(1), cand[[3]])
    restored = PrototypeMemory(3, 3, 2)
    restored.load_state_dict(mem.state_dict())
    assert torch.equal(restored.get(2), mem.get(2)) and torch.equal(restored.counts, mem.counts)
    assert not mem.prototypes.requires_grad
    low = PrototypeMemory(3, 3, 2, keep='lowest')
    low.update(1, cand, scores)
    assert torch.equal(low.get(1), cand[[1, 3, 0]])


def test_weighted_prototype_distance_hand_value():
    f = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    s_f = torch.tensor([0.2, 0.6])        # -> weights 0.5, 1.5 (mean 1)
    s_z = torch.tensor([0.5, 0.5])        # -> weights 1, 1
    r = 1 - 1 / math.sqrt(2)
    # distances: [[0, r], [1, r]]
    expected = (0.5 * (0 + r) + 1.5 * (1 + r)) / 4
    assert weighted_prototype_distance(f, z, s_f, s_z).item() == pytest.approx(expected, rel=1e-6)
    assert class_separation_loss([torch.tensor(0.5), torch.tensor(0.25)], 3).item() == pytest.approx(0.25)


def test_subsample_and_gather():
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(2, 4, 5, dtype=torch.bool)
    mask[0, 1, :] = True
    mask[1, 3, 2:] = True                                   # 8 True entries
    idx = subsample_indices(mask, 4, g)
    assert idx.numel() == 4 and idx.unique().numel() == 4 and bool(mask.reshape(-1)[idx].all())
    assert subsample_indices(mask, None).numel() == 8 and subsample_indices(mask, 100).numel() == 8
    feats = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    flat_idx = torch.tensor([0, 7, 20 + 13])
    rows = gather_voxel_features(feats, flat_idx)
    assert torch.equal(rows[0], feats[0, :, 0, 0]) and torch.equal(rows[1], feats[0, :, 1, 2])
    assert torch.equal(rows[2], feats[1, :, 2, 3])


class _FakeHeads(nn.Module):
    """Identity projector/predictor and transparent selectors, to check what the component feeds them."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.w_f = nn.Parameter(torch.tensor([1.0, -1.0]))
        self.w_z = nn.Parameter(torch.tensor([0.5, 0.5]))
        self.modes = []

    def project(self, x):
        self.modes.append(self.training)
        return x

    def project_and_predict(self, x):
        return x * self.scale

    def feature_score(self, c, x):
        assert not x.requires_grad, 'the feature selector must see detached features'
        return torch.sigmoid(x @ self.w_f)

    def memory_score(self, c, z):
        assert not z.requires_grad, 'the memory is a constant'
        return torch.sigmoid(z @ self.w_z)


def _tiny_batch():
    # 1 sample, 2-d features on a 2x3 grid; classes 0 (bg), 1, 2; label 3 = ignore
    feats = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]],
                          [[0.5, -1.0, 2.0], [1.0, 0.0, -2.0]]]).unsqueeze(0)   # (1, 2, 2, 3)
    gt = torch.tensor([[[1, 1, 0], [1, 2, 3]]]).unsqueeze(1)                    # (1, 1, 2, 3)
    pred = torch.tensor([[[1, 2, 0], [1, 2, 1]]]).unsqueeze(1)
    return feats, gt, pred


def test_refresh_memory_topk_ignores_background_and_wrong_predictions():
    feats, gt, pred = _tiny_batch()
    heads = _FakeHeads()
    heads.train()
    comp = PrototypeSeparation(num_classes=3, num_prototypes=1, embedding_dim=2, keep='highest')
    tm, _ = comp.class_masks(gt, is_target=True)
    pm, _ = comp.class_masks(pred, is_target=False)
    comp.refresh_memory(heads, feats, tm, pm)
    # class-1 candidates: (0,0) f=(1,0.5) score s(0.5); (1,0) f=(4,1) score s(3). (0,1) is predicted 2: excluded.
    assert torch.allclose(comp.memory.get(1), torch.tensor([[4.0, 1.0]]))
    # class-2 candidate: (1,1) only; background (0,2) is correct but never stored
    assert torch.allclose(comp.memory.get(2), torch.tensor([[5.0, 0.0]]))
    assert comp.memory.get(0).shape[0] == 0
    assert heads.modes and not any(heads.modes), 'Phi must run in eval mode' 
    assert heads.training, 'train mode restored'
    low = PrototypeSeparation(num_classes=3, num_prototypes=1, embedding_dim=2, keep='lowest')
    low.refresh_memory(heads, feats, tm, pm)
    assert torch.allclose(low.memory.get(1), torch.tensor([[1.0, 0.5]]))
    # a batch without class 2 candidates keeps the class-2 memory
    gt2 = torch.ones_like(gt)
    tm2, _ = comp.class_masks(gt2, True)
    pm2, _ = comp.class_masks(torch.ones_like(pred), False)
    comp.refresh_memory(heads, feats, tm2, pm2)
    assert torch.allclose(comp.memory.get(2), torch.tensor([[5.0, 0.0]]))
    assert comp.memory.get(1).shape[0] == 1


def test_separation_loss_hand_value_and_gradients():
    feats, gt, _ = _tiny_batch()
    feats = feats.clone().requires_grad_(True)
    heads = _FakeHeads()
    comp = PrototypeSeparation(num_classes=3, num_prototypes=4, embedding_dim=2, max_voxels_per_class=None)
    z1 = torch.tensor([[1.0, 1.0], [2.0, -1.0]])
    comp.memory.update(1, z1, torch.tensor([1.0, 0.0]))
    comp.memory.update(2, torch.tensor([[0.0, 1.0]]), torch.tensor([1.0]))   # one prototype only: class skipped
    masks, rest = comp.class_masks(gt, is_target=True)
    loss = comp.group_loss(heads, feats, masks, rest)

    # by hand: class 1 voxels (ground truth) (0,0) f=(1,0.5), (0,1) f=(2,-1), (1,0) f=(4,1); ignore (1,2) excluded
    f = np.array([[1.0, 0.5], [2.0, -1.0], [4.0, 1.0]])
    z = np.array([[1.0, 1.0], [2.0, -1.0]])
    sig = lambda v: 1 / (1 + np.exp(-v))
    s_f = sig(f @ np.array([1.0, -1.0]))
    s_z = sig(z @ np.array([0.5, 0.5]))
    w_f, w_z = s_f * 3 / s_f.sum(), s_z * 2 / s_z.sum()
    cos = (f / np.linalg.norm(f, axis=1, keepdims=True)) @ (z / np.linalg.norm(z, axis=1, keepdims=True)).T
    term1 = ((1 - cos) * w_f[:, None] * w_z[None, :]).mean()
    assert loss.item() == pytest.approx(term1 / 3, rel=1e-5)            # / C = 3, background included

    loss.backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    assert heads.w_z.grad is not None and heads.w_z.grad.abs().sum() > 0   # memory-side selector learns
    assert heads.w_f.grad is not None and heads.w_f.grad.abs().sum() > 0   # feature-side selector learns
    # voxels of background / ignore / class 2 (skipped) receive no gradient through the loss
    assert feats.grad[0, :, 0, 2].abs().sum() == 0 and feats.grad[0, :, 1, 2].abs().sum() == 0
    assert feats.grad[0, :, 1, 1].abs().sum() == 0
    assert not comp.memory.prototypes.requires_grad and comp.memory.prototypes.grad is None


def test_separation_with_real_heads_gradients_reach_heads_not_memory():
    torch.manual_seed(0)
    heads = SSNetHeads(in_channels=4, num_classes=3)
    comp = PrototypeSeparation(num_classes=3, num_prototypes=32, embedding_dim=32, max_voxels_per_class=10)
    comp.generator = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 4, 6, 6, requires_grad=True)
    labels = torch.randint(0, 3, (2, 1, 6, 6))
    masks, rest = comp.class_masks(labels, True)
    comp.refresh_memory(heads, feats, masks, masks)                   # predictions == labels
    assert int(comp.memory.counts[1]) > 1 and int(comp.memory.counts[2]) > 1
    loss = comp.group_loss(heads, feats, masks, rest)
    loss.backward()
    assert loss.item() > 0
    for name in ('projector', 'predictor'):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(heads, name).parameters()), name
    for c in (1, 2):
        assert heads.feature_selectors[c][0].weight.grad.abs().sum() > 0
        assert heads.memory_selectors[c][0].weight.grad.abs().sum() > 0
    # background selectors are unused but touched (zero gradient), so DDP without find_unused_parameters is happy
    assert heads.feature_selectors[0][0].weight.grad is not None
    assert heads.feature_selectors[0][0].weight.grad.abs().sum() == 0
    assert comp.memory.prototypes.grad is None


def test_region_class_masks_with_ignore_channel():
    comp = PrototypeSeparation(num_classes=2, regions=True, has_ignore_label=True, embedding_dim=2)
    # target layout: 2 region channels + 1 ignore channel, 1 sample, 1x3 voxels
    target = torch.tensor([[[[1, 1, 0]], [[0, 1, 1]], [[0, 0, 1]]]]).float()
    masks, rest = comp.class_masks(target, is_target=True)
    assert masks[0].tolist() == [[[True, True, False]]]
    assert masks[1].tolist() == [[[False, True, False]]]          # voxel 2 is ignored
    assert rest.tolist() == [[[False, False, False]]]
    pred = torch.tensor([[[[0, 1, 0]], [[0, 0, 0]]]]).float()
    pm, prest = comp.class_masks(pred, is_target=False)
    assert pm[0].tolist() == [[[False, True, False]]] and prest.tolist() == [[[True, False, True]]]


# ----------------------------------------------------------------------------------------------------------------
# Memory selection under torch.distributed (gloo, 2 CPU processes)
# ----------------------------------------------------------------------------------------------------------------

def _ddp_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world)
    # rank 0 holds 3 candidates, rank 1 holds 1 candidate; keep the global top-2
    if rank == 0:
        cand, scores = torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0]]), torch.tensor([0.1, 0.8, 0.3])
    else:
        cand, scores = torch.tensor([[1.0, 0.0]]), torch.tensor([0.5])
    cand, scores = select_prototypes(cand, scores, 2)
    rows, s = gather_selected_across_ranks(cand, scores, 2)
    mem = PrototypeMemory(2, 2, 2)
    mem.update(1, rows, s)
    torch.save(mem.get(1), os.path.join(out_dir, f'rank{rank}.pt'))
    dist.destroy_process_group()


def test_memory_selection_across_ranks(tmp_path):
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    expected = torch.tensor([[0.0, 2.0], [1.0, 0.0]])             # scores 0.8 (rank 0) and 0.5 (rank 1)
    for r in range(2):
        assert torch.equal(torch.load(tmp_path / f'rank{r}.pt'), expected)


def test_vat_direction_survives_float16_autocast():
    """Under float16 autocast the per-voxel gradients of a mean-type Dice underflow to 0 unless the probe
    discrepancy is rescaled; the direction must stay close to the float32 one (CPU float16 autocast stands in for
    CUDA AMP here)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.InstanceNorm3d(4), nn.LeakyReLU(),
                        nn.Conv3d(4, 2, 3, padding=1))
    x = torch.randn(2, 1, 32, 32, 32)
    q = torch.softmax(net(x), 1).detach()
    d0 = torch.rand(x.shape) - 0.5
    predict = lambda inp: torch.softmax(net(inp).float(), 1)
    reference = vat_direction(predict, x, q, 0.5, dice_discrepancy, initial_direction=d0)
    with torch.autocast('cpu', dtype=torch.float16):
        mixed = vat_direction(predict, x, q, 0.5, dice_discrepancy, initial_direction=d0)
    assert mixed.dtype == torch.float32
    cosine = (reference * mixed).flatten(1).sum(1)
    assert bool((cosine > 0.8).all()), cosine


def test_row_batchnorm_matches_batchnorm1d_and_stays_per_rank():
    from nnunetv2_semiseg.networks.ssnet_heads import RowBatchNorm
    torch.manual_seed(0)
    ours, ref = RowBatchNorm(5), nn.BatchNorm1d(5)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(5))
        ref.weight.copy_(ours.weight)
    assert set(ours.state_dict()) == set(ref.state_dict())
    for _ in range(3):
        x = torch.randn(7, 5) * 3 + 1
        assert torch.allclose(ours(x), ref(x), atol=1e-6)
    assert torch.allclose(ours.running_mean, ref.running_mean) and torch.allclose(ours.running_var, ref.running_var)
    assert int(ours.num_batches_tracked) == 3
    ours.eval(), ref.eval()
    x = torch.randn(4, 5)
    assert torch.allclose(ours(x), ref(x), atol=1e-6)
    # nnU-Net's DDP set-up converts _BatchNorm layers to SyncBatchNorm; the heads must stay per rank
    heads = nn.SyncBatchNorm.convert_sync_batchnorm(SSNetHeads(8, 3))
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in heads.modules())
