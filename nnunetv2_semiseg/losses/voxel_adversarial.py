"""Voxel-wise adversarial losses (Lee et al., "Voxel-wise Adversarial Semi-supervised Learning for Medical Image
Segmentation", Eq. 2) and the class routing of voxels to discriminator heads (Eq. 1).

Labeled voxels are "real", unlabeled voxels "fake"; D(f) = sigmoid(logit of the head of f's class).
"""
from typing import Tuple

import torch
import torch.nn.functional as F

NO_CLASS = -1   # a voxel that enters no head (ignore label, or an unconfident pseudo-label)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """L_D = BCE(D(sg f_l), 1) + BCE(D(sg f_u), 0) = -mean log D(f_l) - mean log(1 - D(f_u)).

    Source: the discriminator side of Eq. 2 of the paper (maximising mean log D(f_l) + mean log(1 - D(f_u))),
    written as a minimisation as in DCGAN (Radford et al. 2016, the paper's ref. [38]). Each mean runs over the
    sampled voxels of its group; an empty group contributes 0 (its sum divided by max(count, 1)), so every rank
    calls the discriminator the same way whatever its batch holds. float32.
    """
    real = F.binary_cross_entropy_with_logits(real_logits.float(), torch.ones_like(real_logits, dtype=torch.float32),
                                              reduction='sum') / max(real_logits.numel(), 1)
    fake = F.binary_cross_entropy_with_logits(fake_logits.float(), torch.zeros_like(fake_logits, dtype=torch.float32),
                                              reduction='sum') / max(fake_logits.numel(), 1)
    return real + fake


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """L_adv^G = -mean log D(f_u) = BCE(D(f_u), 1) over the sampled unlabeled voxels (0 if there are none).

    The paper writes only the discriminator objective (Eq. 2); this is the standard non-saturating generator loss
    (Goodfellow et al. 2014, §3): the student's encoder is pushed to make unlabeled voxel features look "real".
    """
    return F.binary_cross_entropy_with_logits(fake_logits.float(), torch.ones_like(fake_logits, dtype=torch.float32),
                                              reduction='sum') / max(fake_logits.numel(), 1)


def classes_from_labels(labels: torch.Tensor, num_heads: int, regions: bool, has_ignore_label: bool) -> torch.Tensor:
    """Head index of every labeled voxel, (B, *spatial) long, NO_CLASS where the voxel enters no head.

    Softmax layout: ``labels`` (B, 1, *spatial) integer map; head = label, the ignore label (>= num_heads) ->
    NO_CLASS. Region layout: ``labels`` (B, R (+1 ignore channel), *spatial) binary maps; head = 1 + the last active
    region (nnU-Net lists regions from the outermost to the innermost, e.g. whole tumour, core, enhancing, so the
    last active one is the most specific), head 0 = in no region; ignored voxels -> NO_CLASS.
    """
    if not regions:
        lab = labels[:, 0].long()
        return torch.where((lab >= 0) & (lab < num_heads), lab, torch.full_like(lab, NO_CLASS))
    region_maps = labels[:, :-1] if has_ignore_label else labels
    classes = region_head_index(region_maps > 0.5)
    if has_ignore_label:
        classes = torch.where(labels[:, -1] > 0.5, torch.full_like(classes, NO_CLASS), classes)
    return classes


def region_head_index(active: torch.Tensor) -> torch.Tensor:
    """(B, R, *spatial) bool -> (B, *spatial) long: 1 + index of the last active region, 0 where none is active."""
    num_regions = active.shape[1]
    order = torch.arange(1, num_regions + 1, device=active.device).view(1, -1, *([1] * (active.dim() - 2)))
    return (active.long() * order).amax(1)


def classes_from_probabilities(probabilities: torch.Tensor, threshold: float, regions: bool) -> torch.Tensor:
    """Pseudo-label head index of every unlabeled voxel from teacher probabilities (paper Eq. 1), NO_CLASS where
    the teacher is not confident.

    Softmax: head = argmax_c p_c where max_c p_c > threshold. Regions (sigmoid): each region's decision p_r > 0.5
    must be confident, i.e. max(p_r, 1 - p_r) > threshold for every region; head as in :func:`classes_from_labels`.
    """
    probabilities = probabilities.float()
    if not regions:
        confidence, classes = probabilities.max(1)
    else:
        confidence = torch.maximum(probabilities, 1 - probabilities).amin(1)
        classes = region_head_index(probabilities > 0.5)
    return torch.where(confidence > threshold, classes, torch.full_like(classes, NO_CLASS))


def sample_class_voxels(classes: torch.Tensor, num_heads: int, per_class: int,
                        generator: torch.Generator = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """At most ``per_class`` voxels of every head class in every row, drawn uniformly without replacement.

    ``classes``: (B, *spatial) long (NO_CLASS excluded). Returns (row index, flat spatial index, class), each (n,).
    """
    rows, flat, labels = [], [], []
    flat_classes = classes.reshape(classes.shape[0], -1)
    for b in range(flat_classes.shape[0]):
        for c in range(num_heads):
            idx = (flat_classes[b] == c).nonzero(as_tuple=False).squeeze(1)
            if idx.numel() > per_class:
                keep = torch.randperm(idx.numel(), device='cpu', generator=generator)[:per_class].to(idx.device)
                idx = idx[keep]
            rows.append(torch.full_like(idx, b))
            flat.append(idx)
            labels.append(torch.full_like(idx, c))
    empty = classes.new_zeros((0,), dtype=torch.long)
    return (torch.cat(rows) if rows else empty, torch.cat(flat) if flat else empty,
            torch.cat(labels) if labels else empty)
