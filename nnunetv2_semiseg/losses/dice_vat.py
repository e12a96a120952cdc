"""Virtual adversarial training with a Dice discrepancy (SS-Net's pixel-level smoothness, L_lds).

Sources
-------
* SS-Net, Wu et al., MICCAI 2022 (``shared/papers/ssnet_smoothness_class_separation.md``), Eq. (1)-(3) and
  Algorithm 1: r_adv = epsilon * g / ||g||_2 with g = grad_r D[p(y|x), p(y|x + r)] at a random r, and
  L_lds = D[p(y|x), p(y|x + r_adv)], D a soft Dice loss.
* Miyato et al., "Virtual adversarial training", TPAMI 2018: the same construction with D = KL divergence and
  one power-iteration step of size xi (the SS-Net ablation "L_lds with KL").
* Released SS-Net code (methods.md §2.2): xi = 10, one power step, uniform(-0.5, 0.5) initial direction normalised
  per sample, epsilon = 10 on LA (112x112x80 crops, z-scored intensities) and 6 on ACDC.

Everything here is a pure function of tensors and a ``predict`` callable; the trainer decides which network pass
``predict`` runs. The direction is obtained with ``torch.autograd.grad`` with respect to the perturbation only, so
parameter ``.grad`` fields and an AMP ``GradScaler`` are never touched by the power step.
"""
import math
from typing import Callable, Optional, Sequence, Tuple

import torch

# The paper's LA setting (methods.md §2.1/2.2): epsilon = xi = 10 as an L2 norm over one 112x112x80 single-channel
# z-scored crop.
PAPER_LA_PATCH_SIZE = (112, 112, 80)
PAPER_LA_EPSILON = 10.0
PAPER_LA_XI = 10.0


def per_element_rms(norm: float, patch_size: Sequence[int], num_channels: int = 1) -> float:
    """Per-element RMS of a perturbation whose L2 norm over one (C, *patch) sample is ``norm``.

    ||r||_2 = norm spread evenly over n = C * prod(patch) elements gives RMS = norm / sqrt(n) (methods.md §2.6).
    For the paper's LA setting: 10 / sqrt(112 * 112 * 80) = 0.009982 in z-score units.
    """
    n = num_channels * math.prod(int(s) for s in patch_size)
    return float(norm) / math.sqrt(n)


def norm_for_sample_size(rms: float, elements_per_sample: int) -> float:
    """Inverse of :func:`per_element_rms`: the per-sample L2 norm with per-element RMS ``rms``.

    ``epsilon_nnunet = rms * sqrt(C * prod(patch_nnunet))`` (= epsilon_paper * sqrt(N_nnunet / N_paper) when the
    intensity scales agree, as they do for LA: both z-score).
    """
    return float(rms) * math.sqrt(int(elements_per_sample))


def l2_normalize_per_sample(d: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """d / (||d_b||_2 + eps) for every sample b, the norm taken over all non-batch dimensions."""
    norms = d.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (d.dim() - 1)))
    return d / (norms + eps)


def dice_discrepancy(pred: torch.Tensor, target: torch.Tensor, smooth: float = 1e-10) -> torch.Tensor:
    """Soft Dice discrepancy between two probability maps, per channel, averaged over channels.

        D(p_hat, p) = 1 - (1/C) * sum_c (2 * sum_v p_hat_cv p_cv + s) / (sum_v p_hat_cv^2 + sum_v p_cv^2 + s)

    with v running over the batch and all spatial positions (one Dice per channel for the whole batch) and
    s = ``smooth``. This is SS-Net's Eq. (3) in the per-class form of the released 2D code (``softDiceLoss``:
    squared denominator, all channels including background, smooth 1e-10), generalised from its hard-coded 4
    classes to any C.

    Multi-class (softmax) outputs: channels are the classes, background included. Region (sigmoid) outputs:
    channels are the regions, each an independent foreground probability map (there is no background channel);
    the formula is the same.

    Inputs (B, C, *spatial) in float32; the result is a 0-dim tensor in [0, 1].
    """
    dims = [0] + list(range(2, pred.dim()))
    intersection = (pred * target).sum(dims)
    denominator = (pred * pred).sum(dims) + (target * target).sum(dims)
    dice_per_channel = (2.0 * intersection + smooth) / (denominator + smooth)
    return 1.0 - dice_per_channel.mean()


def kl_discrepancy(pred: torch.Tensor, target: torch.Tensor, regions: bool = False,
                   eps: float = 1e-8) -> torch.Tensor:
    """KL(target || pred) per voxel, averaged over batch and voxels: classic VAT's D (Miyato et al. 2018).

    Softmax outputs (``regions=False``): sum_c q_c (log q_c - log p_c), averaged over voxels.
    Region outputs (``regions=True``): every channel is a Bernoulli variable,
    q log(q/p) + (1-q) log((1-q)/(1-p)), averaged over channels and voxels.
    ``pred`` = p (perturbed prediction), ``target`` = q (clean prediction). Probabilities are clamped to
    [eps, 1] inside the logarithms.
    """
    p = pred.clamp_min(eps)
    q = target.clamp_min(eps)
    if not regions:
        return (target * (q.log() - p.log())).sum(1).mean()
    p1 = (1.0 - pred).clamp_min(eps)
    q1 = (1.0 - target).clamp_min(eps)
    kl = target * (q.log() - p.log()) + (1.0 - target) * (q1.log() - p1.log())
    return kl.mean()


def _autocast_active(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_enabled() if device_type == 'cuda' else torch.is_autocast_cpu_enabled()


def _probe_gradient(predict, x, d, xi, discrepancy, target) -> torch.Tensor:
    with torch.enable_grad():
        d = d.clone().requires_grad_(True)
        dist = discrepancy(predict(x + xi * d).float(), target.float())
        grad, = torch.autograd.grad(dist * float(x[0].numel()), d)
    return grad.float()


def _non_finite_samples(grad: torch.Tensor) -> torch.Tensor:
    return ~torch.isfinite(grad).flatten(1).all(1)


def vat_direction_and_fallbacks(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                                target: torch.Tensor, xi: float,
                                discrepancy: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                                initial_direction: Optional[torch.Tensor] = None,
                                generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One power-iteration step of VAT: the unit (per sample) direction g / ||g||_2 in float32, and the number of
    samples whose probe gradient was non-finite (they keep their random direction).

        d0 ~ U(-0.5, 0.5), d0 <- d0 / ||d0||  (per sample)
        g  = grad_d D(predict(x + xi * d), target)  at d = d0
        return g / ||g||  (per sample)

    ``predict`` maps an input batch to probabilities (float32); ``target`` must be detached. The gradient is taken
    with ``torch.autograd.grad`` with respect to ``d`` only, so no parameter ``.grad`` is written and the graph of
    the probe pass is freed on return.

    Mixed precision: under autocast the probe's backward runs in float16, where the per-voxel gradients of a
    mean-type discrepancy (of order D / #voxels) underflow. The discrepancy is therefore multiplied by the number of
    elements per sample before differentiation; the direction is normalised afterwards, so this only changes the
    scale at which float16 sees the gradient, never the result in exact arithmetic. float16 can then overflow
    (max 65504) inside the backward: if any sample's gradient is non-finite, the whole probe (the discrepancy
    couples the samples of the batch) is recomputed once with autocast disabled, in float32, where neither the
    underflow nor the overflow happens. A sample that is still non-finite (e.g. a non-finite input), or whose
    gradient vanishes, keeps its random direction; the non-finite ones are counted in the second return value
    (a 0-dim float32 tensor) so that a trainer can log them instead of falling back silently.
    """
    x = x.detach().float()
    if initial_direction is None:
        initial_direction = torch.rand(x.shape, generator=generator, dtype=torch.float32,
                                       device='cpu' if generator is not None else x.device).to(x.device) - 0.5
    d0 = l2_normalize_per_sample(initial_direction.float())
    grad = _probe_gradient(predict, x, d0, xi, discrepancy, target)
    if bool(_non_finite_samples(grad).any()) and _autocast_active(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            grad = _probe_gradient(predict, x, d0, xi, discrepancy, target)
    non_finite = _non_finite_samples(grad)
    grad = torch.where(non_finite.view(-1, *([1] * (grad.dim() - 1))), torch.zeros_like(grad), grad)
    vanished = grad.flatten(1).norm(dim=1) == 0
    if bool(vanished.any()):
        grad = torch.where(vanished.view(-1, *([1] * (grad.dim() - 1))), d0, grad)
    return l2_normalize_per_sample(grad).detach(), non_finite.sum().float()


def vat_direction(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, target: torch.Tensor,
                  xi: float, discrepancy: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  initial_direction: Optional[torch.Tensor] = None,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The direction of :func:`vat_direction_and_fallbacks` alone."""
    return vat_direction_and_fallbacks(predict, x, target, xi, discrepancy, initial_direction, generator)[0]


def virtual_adversarial_loss_and_fallbacks(
        predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, target: torch.Tensor, epsilon: float,
        xi: float, discrepancy: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        initial_direction: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L_lds = D(predict(x + r_adv), sg(target)), r_adv = epsilon * vat_direction(...) (SS-Net Eq. 2-3, Alg. 1).

    ``epsilon`` and ``xi`` are per-sample L2 norms (see :func:`norm_for_sample_size`). Returns
    ``(loss, r_adv, non_finite_probe_samples)``; ``r_adv`` is a constant, so gradients flow only through the
    perturbed prediction, into the parameters used by ``predict``.
    """
    target = target.detach().float()
    direction, fallbacks = vat_direction_and_fallbacks(predict, x, target, xi, discrepancy, initial_direction,
                                                       generator)
    r_adv = epsilon * direction
    loss = discrepancy(predict(x.detach() + r_adv.to(x.dtype)).float(), target)
    return loss, r_adv, fallbacks


def virtual_adversarial_loss(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                             target: torch.Tensor, epsilon: float, xi: float,
                             discrepancy: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                             initial_direction: Optional[torch.Tensor] = None,
                             generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(loss, r_adv)`` of :func:`virtual_adversarial_loss_and_fallbacks`."""
    loss, r_adv, _ = virtual_adversarial_loss_and_fallbacks(predict, x, target, epsilon, xi, discrepancy,
                                                            initial_direction, generator)
    return loss, r_adv
