"""Pure functions of bidirectional copy-paste (BCP; Bai et al., "Bidirectional Copy-Paste for Semi-Supervised Medical
Image Segmentation", CVPR 2023, and its released code ``DeepMed-Lab-ECNU/BCP``).

* :func:`box_mask`                - M: 1 outside one zero box covering ``beta`` of every spatial dimension.
* :func:`copy_paste`              - ``a * M + b * (1 - M)`` for images, label maps and masks alike.
* :func:`downsample_like_targets` - a full-resolution map at every deep-supervision resolution, with the very
                                    transform nnU-Net applies to its targets (so masks and targets stay aligned).
* :func:`region_weighted_dc_ce`   - nnU-Net's DC+CE where each region of the patch (ground-truth part, pseudo-label
                                    part) has its own weight and its own normalisation.
* :func:`deep_supervised`         - the deep-supervision sum of a per-level loss with nnU-Net's level weights.
"""
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform


def box_size(spatial_shape: Sequence[int], beta: float) -> Tuple[int, ...]:
    """Edge lengths of the zero box: ``round(beta * s)`` per spatial dimension (BCP: ``beta = 2/3``)."""
    return tuple(int(round(beta * s)) for s in spatial_shape)


def box_mask(spatial_shape: Sequence[int], beta: float, rng: np.random.Generator,
             device: Optional[torch.device] = None) -> torch.Tensor:
    """M (float32, shape ``spatial_shape``): 0 inside one box of ``box_size(spatial_shape, beta)`` voxels at a
    uniformly random position fully inside the patch, 1 elsewhere.

    Source: BCP ``context_mask`` (LA) / ``generate_mask`` (ACDC). The released code draws the corner with
    ``randint(0, s - box)`` (upper bound exclusive, so the last position is never drawn); here every position
    ``0 .. s - box`` is drawn with equal probability.
    """
    size = box_size(spatial_shape, beta)
    mask = torch.ones(tuple(spatial_shape), dtype=torch.float32, device=device)
    corner = [int(rng.integers(0, s - b + 1)) for s, b in zip(spatial_shape, size)]
    mask[tuple(slice(c, c + b) for c, b in zip(corner, size))] = 0
    return mask


def copy_paste(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``a * M + b * (1 - M)``: ``a`` outside the box, ``b`` inside (BCP Eq. 1/3/4).

    ``mask`` holds 0/1 and broadcasts against ``a``/``b`` over the trailing spatial dimensions. Integer label maps
    keep their dtype (selection, not arithmetic, so labels never become fractional).
    """
    return torch.where(mask.to(torch.bool), a, b)


def downsample_like_targets(full: torch.Tensor, scales: Optional[Sequence]) -> List[torch.Tensor]:
    """``full`` (b, c, *spatial) at every deep-supervision scale, via nnU-Net's own ``DownsampleSegForDSTransform``
    (nearest-exact). Applying the same transform to the mixed target and to the mask keeps them voxel-aligned at
    every level, and gives the loader's own low-resolution labels where the target is ground truth."""
    if scales is None:
        return [full]
    b, c = full.shape[:2]
    levels = DownsampleSegForDSTransform(scales)._apply_to_segmentation(full.reshape(b * c, *full.shape[2:]))
    return [level.reshape(b, c, *level.shape[1:]) for level in levels]


def region_weighted_dc_ce(logits: torch.Tensor, target: torch.Tensor, regions: Sequence[Tuple[torch.Tensor, float]],
                          dice: Callable, weight_dice: float = 1.0, weight_ce: float = 1.0,
                          ignore_label: Optional[int] = None, sigmoid_regions: bool = False) -> torch.Tensor:
    """Region-weighted Dice + CE (softmax classes) or Dice + BCE (sigmoid regions) of one output level::

        L = sum_r w_r * ( weight_dice * DC(p, y; R_r) + weight_ce * sum_v R_r(v) CE_v / sum_v R_r(v) )

    with ``R_r`` a 0/1 region mask (b, 1, *spatial) (the ground-truth part and the pseudo-label part of a mixed
    patch), ``DC(.; R)`` nnU-Net's soft Dice restricted to the region (its ``loss_mask``: both the intersection and
    the sums run over R only), ``CE_v`` the per-voxel cross-entropy. Source: BCP ``mix_loss`` (Dice and CE each
    normalised by its own region, then weighted by ``l_weight = 1`` / ``u_weight = 0.5``); the Dice is nnU-Net's
    (``MemoryEfficientSoftDiceLoss``, no background, batch Dice from the plans) so that with one region of weight 1
    covering the patch this is nnU-Net's DC+CE.

    Ignore label, softmax layout: ``target`` is a label map and voxels equal to ``ignore_label`` belong to no region.

    ``sigmoid_regions=True`` (nnU-Net's region-based datasets): ``logits`` (b, K, *spatial) are K sigmoid region
    channels and ``target`` (b, K, *spatial) their 0/1 maps, plus, when the dataset has an ignore label
    (``ignore_label`` not None), nnU-Net's extra last channel that is 1 on ignored voxels (those belong to no
    region). ``dice`` is then nnU-Net's sigmoid Dice (background channel kept, as in its DC_and_BCE_loss) and
    ``CE_v = (1/K) sum_k BCE(z_v,k, y_v,k)``: the per-voxel binary cross-entropy averaged over the regions, so that
    one region of weight 1 covering the patch gives nnU-Net's DC+BCE (its ``BCEWithLogitsLoss`` mean).
    """
    if sigmoid_regions:
        target = target.float()
        valid = None
        if ignore_label is not None:
            valid = target[:, -1:] < 0.5
            target = target[:, :-1]
        dice_target = target
        ce_voxels = F.binary_cross_entropy_with_logits(logits.float(), target, reduction='none').mean(1, keepdim=True)
    else:
        if target.ndim == logits.ndim - 1:
            target = target[:, None]
        target = target.long()
        valid = None if ignore_label is None else target != ignore_label
        dice_target = target if valid is None else torch.where(valid, target, 0)
        ce_voxels = F.cross_entropy(logits.float(), dice_target[:, 0], reduction='none')[:, None]
    total = logits.new_zeros((), dtype=torch.float32)
    for region, weight in regions:
        # expanded to every row, so that the CE normalisation counts the region's voxels in the whole batch
        region = region.to(torch.float32).expand_as(ce_voxels)
        if valid is not None:
            region = region * valid
        dc = dice(logits, dice_target, loss_mask=region) if weight_dice != 0 else 0.0
        ce = (ce_voxels * region).sum() / region.sum().clamp_min(1e-8) if weight_ce != 0 else 0.0
        total = total + weight * (weight_dice * dc + weight_ce * ce)
    return total


def deep_supervised(level_loss: Callable[[int], torch.Tensor], weights: Optional[Sequence[float]]) -> torch.Tensor:
    """``sum_k weights[k] * level_loss(k)`` over the levels with non-zero weight (nnU-Net's
    ``DeepSupervisionWrapper``: halving weights, the lowest level 0, normalised to sum 1); one level if None."""
    if weights is None:
        return level_loss(0)
    return sum(w * level_loss(k) for k, w in enumerate(weights) if w != 0.0)
