"""Voxel-wise BYOL feature loss (Lee et al., "Voxel-wise Adversarial Semi-supervised Learning", Eq. 3)."""
from typing import Sequence

import torch
import torch.nn.functional as F


def byol_class_loss(student_predictions: torch.Tensor, teacher_projections: torch.Tensor) -> torch.Tensor:
    """Normalised MSE over every same-class (student, teacher) pair of one class:

        L_c = 1/(n m) sum_i sum_j || p_i/|p_i| - sg(z_j)/|z_j| ||^2  =  2 - 2 < mean_i p_i/|p_i| , mean_j z_j/|z_j| >

    ``student_predictions`` (n, d) = prediction(projection(f_s)), ``teacher_projections`` (m, d) = the EMA teacher's
    projection. Source: BYOL (Grill et al. 2020, Eq. 2: ||q - z'||^2 of L2-normalised vectors = 2 - 2 cos), paired
    over all same-class voxels because the paper defines relations between voxels of the same class without saying
    which pairs (methods.md §3.2); the closed form costs O(n + m) instead of O(n m). The teacher side is detached.
    float32.
    """
    p = F.normalize(student_predictions.float(), dim=1)
    z = F.normalize(teacher_projections.detach().float(), dim=1)
    return 2.0 - 2.0 * (p.mean(0) * z.mean(0)).sum()


def byol_feature_loss(student_predictions: torch.Tensor, teacher_projections: torch.Tensor,
                      classes: torch.Tensor, class_indices: Sequence[int]) -> torch.Tensor:
    """L_feature = mean over the classes present of :func:`byol_class_loss` (student and teacher vectors of the
    same sampled voxels, ``classes`` their head index). 0 (a float32 scalar) when no class is present."""
    terms = []
    for c in class_indices:
        selected = classes == c
        if bool(selected.any()):
            terms.append(byol_class_loss(student_predictions[selected], teacher_projections[selected]))
    if not terms:
        return student_predictions.new_zeros((), dtype=torch.float32)
    return torch.stack(terms).mean()
