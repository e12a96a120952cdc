"""Dual-stream losses (losses/dualstream.py) against hand-computed values, and their stop-gradients."""
import math

import pytest
import torch

from nnunetv2_semiseg.losses.dualstream import (class_prototypes, cosine_consistency, cross_reliable_mistake_loss,
                                                ensemble_log_probabilities, entropy_filtered_pseudo_label_loss,
                                                high_entropy_mask, prototype_contrast_loss,
                                                squared_foreground_dice_loss, uncertainty_weighted_pseudo_label_loss,
                                                voxel_entropy)


pytestmark = pytest.mark.usefixtures('one_torch_thread')


def _binary_probabilities(foreground):
    fg = torch.tensor(foreground, dtype=torch.float32)
    return torch.stack((1 - fg, fg))[None]                               # (1, 2, n)


def test_entropy_filter_ignores_exactly_the_top_20_percent():
    # Ten voxels; the two closest to 0.5 (indices 3 and 7) have the highest entropy.
    fg = [0.9, 0.95, 0.2, 0.52, 0.99, 0.7, 0.8, 0.45, 0.03, 0.85]
    entropy = voxel_entropy(_binary_probabilities(fg))
    expected_h0 = -(0.1 * math.log(0.1) + 0.9 * math.log(0.9))
    assert entropy[0, 0].item() == pytest.approx(expected_h0, rel=1e-5)
    mask = high_entropy_mask(entropy, 80.0)
    assert mask[0].tolist() == [i in (3, 7) for i in range(10)]
    # 25 voxels -> exactly 5 ignored, the 5 highest entropies, also with tied values below them
    fg25 = [0.5, 0.51, 0.49, 0.48, 0.53] + [0.99] * 20
    mask25 = high_entropy_mask(voxel_entropy(_binary_probabilities(fg25)), 80.0)
    assert int(mask25.sum()) == 5 and bool(mask25[0, :5].all())


def test_entropy_filtered_ce_is_normalised_by_the_valid_count():
    logits = torch.tensor([[[2.0, 0.0, -1.0, 0.5], [0.0, 1.0, 1.0, 0.5]]], requires_grad=True)   # (1, 2, 4)
    pseudo = torch.tensor([[0, 1, 0, 1]])
    ignore = torch.tensor([[False, False, True, False]])
    loss = entropy_filtered_pseudo_label_loss(logits, pseudo, ignore)

    def ce(z0, z1, label):
        return math.log(math.exp(z0) + math.exp(z1)) - (z0 if label == 0 else z1)
    expected = (ce(2.0, 0.0, 0) + ce(0.0, 1.0, 1) + ce(0.5, 0.5, 1)) / 3     # ignored voxel out of sum AND count
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.all(logits.grad[..., 2] == 0) and logits.grad[..., 0].abs().sum() > 0


def test_uncertainty_weighted_loss_matches_hand_value_and_teacher_is_detached():
    teacher = torch.tensor([[[2.0], [0.0]]], requires_grad=True)          # (1, 2, 1): one voxel
    student = torch.tensor([[[0.5], [1.0]]], requires_grad=True)
    t = 0.5
    q1 = 1 / (1 + math.exp(2.0 / t))                                      # softmax([4, 0])[1]
    q = [1 - q1, q1]
    log_s = [0.5 - math.log(math.exp(0.5) + math.exp(1.0)), 1.0 - math.log(math.exp(0.5) + math.exp(1.0))]
    kl = sum(qc * (math.log(qc) - ls) for qc, ls in zip(q, log_s))
    ce = -log_s[0]                                                         # pseudo-label = argmax = class 0
    expected = math.exp(-kl) * ce + kl
    loss = uncertainty_weighted_pseudo_label_loss(student, teacher, temperature=t, tempered_kl=True)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0

    # released code: untempered KL, so T changes nothing
    p1 = 1 / (1 + math.exp(2.0))
    kl_plain = sum(pc * (math.log(pc) - ls) for pc, ls in zip([1 - p1, p1], log_s))
    for temperature in (0.1, 0.5, 2.0):
        value = uncertainty_weighted_pseudo_label_loss(student, teacher, temperature, tempered_kl=False)
        assert value.item() == pytest.approx(math.exp(-kl_plain) * ce + kl_plain, rel=1e-6)


def test_cosine_consistency_hand_value_and_both_sides_get_gradient():
    p_a = torch.tensor([[[1.0, 0.3], [0.0, 0.7]]], requires_grad=True)  # voxels (1, 0) and (0.3, 0.7)
    p_b = torch.tensor([[[0.6, 0.3], [0.8, 0.7]]], requires_grad=True)  # voxels (0.6, 0.8) and (0.3, 0.7)
    loss = cosine_consistency(p_a, p_b)
    assert loss.item() == pytest.approx(((1 - 0.6) + 0.0) / 2, abs=1e-6)
    loss.backward()
    assert p_a.grad.abs().sum() > 0 and p_b.grad.abs().sum() > 0


def _contrast_inputs():
    # 2-D embeddings of 6 voxels; classes 0 / 1; voxels 2 and 5 uncertain.
    e = torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.2, 1.0],     # class 0 (reliable, reliable, uncertain)
                      [0.1, 1.0], [-0.1, 1.0], [1.0, 0.3]])    # class 1 (reliable, reliable, uncertain)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    reliable = torch.tensor([True, True, False, True, True, False])
    return e.t().reshape(1, 2, 6).clone(), labels.reshape(1, 6), reliable.reshape(1, 6)


def test_prototypes_are_means_of_reliable_voxels():
    e, labels, reliable = _contrast_inputs()
    prototypes = class_prototypes(e, labels, reliable, 2)
    assert torch.allclose(prototypes[0], torch.tensor([1.0, 0.0])) and torch.allclose(prototypes[1],
                                                                                      torch.tensor([0.0, 1.0]))


def test_prototype_contrast_pull_and_push_lower_the_loss():
    e, labels, reliable = _contrast_inputs()
    pull, separation = prototype_contrast_loss(e, labels, reliable, 2)
    # hand value: prototypes (1, 0) and (0, 1); uncertain voxel of class 0 at (0.2, 1) normalised, of class 1 at
    # (1, 0.3) normalised; separation 2 - sqrt(2)
    def dist(v, mu):
        n = math.hypot(*v)
        return math.hypot(v[0] / n - mu[0], v[1] / n - mu[1])
    assert pull.item() == pytest.approx((dist((0.2, 1.0), (1, 0)) + dist((1.0, 0.3), (0, 1))) / 2, rel=1e-5)
    assert separation.item() == pytest.approx(2 - math.sqrt(2), rel=1e-5)
    base = (pull + separation).item()
    # the uncertain class-0 voxel moves towards its prototype (1, 0): the loss drops
    closer = e.clone()
    closer[0, :, 2] = torch.tensor([1.0, 0.2])
    assert sum(prototype_contrast_loss(closer, labels, reliable, 2)).item() < base
    # the reliable voxels of the two classes move apart (prototypes (1, -0.5) and (-0.5, 1)): the loss drops
    apart = e.clone()
    apart[0, :, 0:2] = torch.tensor([[1.0, 1.0], [-0.4, -0.6]])
    apart[0, :, 3:5] = torch.tensor([[-0.4, -0.6], [1.0, 1.0]])
    _, separation_apart = prototype_contrast_loss(apart, labels, reliable, 2)
    assert separation_apart.item() < separation.item()


def test_prototype_contrast_gradients_pull_detaches_prototype_push_does_not():
    e, labels, reliable = _contrast_inputs()
    e.requires_grad_(True)
    pull, separation = prototype_contrast_loss(e, labels, reliable, 2)
    pull.backward(retain_graph=True)
    # pull moves only the uncertain voxels (the prototype is detached there)
    assert e.grad[0, :, [0, 1, 3, 4]].abs().sum() == 0 and e.grad[0, :, [2, 5]].abs().sum() > 0
    e.grad = None
    separation.backward()
    assert e.grad[0, :, [0, 1, 3, 4]].abs().sum() > 0 and e.grad[0, :, [2, 5]].abs().sum() == 0


def test_prototype_contrast_with_a_single_class_is_a_zero_with_a_graph():
    e, labels, reliable = _contrast_inputs()
    e.requires_grad_(True)
    pull, separation = prototype_contrast_loss(e, torch.zeros_like(labels), torch.ones_like(reliable), 2)
    assert pull.item() == 0 and separation.item() == 0
    (pull + separation).backward()
    assert e.grad is not None


def test_released_supervised_pieces_hand_values():
    p = _binary_probabilities([0.9, 0.2, 0.7, 0.4]).reshape(1, 2, 2, 2)
    y = torch.tensor([[[1, 0], [0, 1]]])
    inter, p2, y2 = 0.9 + 0.4, 0.81 + 0.04 + 0.49 + 0.16, 2
    assert squared_foreground_dice_loss(p, y).item() == pytest.approx(1 - (2 * inter + 1e-5) / (p2 + y2 + 1e-5),
                                                                      rel=1e-6)
    # stream A confident fg at voxel 0 (0.9) and 2 (0.7); stream B only at voxel 0 -> XOR mask = voxel 2
    p_b = _binary_probabilities([0.95, 0.1, 0.55, 0.3]).reshape(1, 2, 2, 2)
    mistake = cross_reliable_mistake_loss(p, y, p, p_b, confidence=0.6)
    assert mistake.item() == pytest.approx((0.7 - 0.0) ** 2, rel=1e-5)


def test_ensemble_is_log_of_averaged_softmax():
    torch.manual_seed(0)
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    expected = torch.log((torch.softmax(a, 1) + torch.softmax(b, 1)) / 2)
    assert torch.allclose(ensemble_log_probabilities(a, b), expected, atol=1e-6)
