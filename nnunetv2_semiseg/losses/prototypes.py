"""Prototype memory and the weighted cosine separation loss of SS-Net (inter-class separation, L_cs).

Sources
-------
* SS-Net, Wu et al., MICCAI 2022 (``shared/papers/ssnet_smoothness_class_separation.md``), Eq. (4) and
  Algorithm 2: prototypes are the top-K attention-ranked projections of correctly predicted, non-background
  labeled voxels; every voxel feature (labeled: grouped by ground truth, unlabeled: by prediction) is pulled
  towards the prototypes of its class with a weighted cosine distance.
* Released SS-Net code (methods.md §2.2, ``feature_memory.py`` and ``contrastive_losses.py``): 32 prototypes of
  32 dims per class, replaced (not accumulated) every iteration, kept unchanged for a class without candidates;
  weights are sigmoid attention scores rescaled to mean 1 on each axis; the memory is a constant; the feature-side
  selector sees detached features; L_cs = sum_c loss_c / C with C counting background too. The released code
  sorts ascending and so keeps the 32 *lowest*-scoring candidates, whereas the paper keeps the highest; both are
  available here (``keep='highest'`` / ``'lowest'``).

No trainer state lives here: :class:`PrototypeMemory` is a small module of buffers that a trainer owns and
checkpoints, the rest are pure functions.
"""
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

KEEP_CHOICES = ('highest', 'lowest')


def select_prototypes(candidates: torch.Tensor, scores: torch.Tensor, num_prototypes: int,
                      keep: str = 'highest') -> Tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``num_prototypes`` candidates with the highest (paper) or lowest (released code) scores.

    candidates (n, D), scores (n,). Returns (rows, their scores), sorted best-first for ``keep='highest'`` and
    lowest-first for ``keep='lowest'``; all candidates are kept when n <= num_prototypes.
    """
    if keep not in KEEP_CHOICES:
        raise ValueError(f"keep must be one of {KEEP_CHOICES}, got {keep!r}")
    k = min(int(num_prototypes), candidates.shape[0])
    _, order = torch.topk(scores, k, largest=(keep == 'highest'), sorted=True)
    return candidates[order], scores[order]


class PrototypeMemory(nn.Module):
    """Per-class memory of up to ``num_prototypes`` vectors of ``dim`` dims (SS-Net: 32 x 32 per class).

    ``update(c, candidates, scores)`` *replaces* class c's memory with the selected candidates (SS-Net refreshes
    the memory every iteration without accumulation); a class without candidates in a batch keeps its previous
    memory. The memory is stored in buffers, so ``state_dict()`` / ``load_state_dict()`` checkpoint it; it never
    requires gradient.
    """

    def __init__(self, num_classes: int, num_prototypes: int = 32, dim: int = 32, keep: str = 'highest'):
        super().__init__()
        if keep not in KEEP_CHOICES:
            raise ValueError(f"keep must be one of {KEEP_CHOICES}, got {keep!r}")
        self.num_classes, self.num_prototypes, self.dim, self.keep = num_classes, num_prototypes, dim, keep
        self.register_buffer('prototypes', torch.zeros(num_classes, num_prototypes, dim))
        self.register_buffer('counts', torch.zeros(num_classes, dtype=torch.long))

    @torch.no_grad()
    def update(self, class_index: int, candidates: torch.Tensor, scores: torch.Tensor) -> None:
        if candidates.shape[0] == 0:
            return  # absent class: previous memory persists
        rows, _ = select_prototypes(candidates.detach(), scores.detach(), self.num_prototypes, self.keep)
        n = rows.shape[0]
        self.prototypes[class_index].zero_()
        self.prototypes[class_index, :n] = rows.to(self.prototypes.dtype)
        self.counts[class_index] = n

    def get(self, class_index: int) -> torch.Tensor:
        """The stored prototypes of a class, (count, dim); empty when the class was never seen."""
        return self.prototypes[class_index, :int(self.counts[class_index])]


def gather_selected_across_ranks(candidates: torch.Tensor, scores: torch.Tensor, num_prototypes: int
                                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Under torch.distributed, the union of every rank's (already top-K selected) candidates of one class.

    Selecting top-K of the union of per-rank top-K sets equals top-K over all ranks' candidates, so a trainer can
    select per rank, gather, and select again to get the memory of the global batch (identical on every rank).
    Without an initialised process group the inputs are returned unchanged. All ranks must call this for the same
    classes in the same order.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return candidates, scores
    k, dim = int(num_prototypes), candidates.shape[1]
    padded = candidates.new_zeros(k, dim)
    padded_scores = scores.new_zeros(k)
    n = candidates.shape[0]
    padded[:n], padded_scores[:n] = candidates, scores
    count = torch.tensor([n], device=candidates.device, dtype=torch.long)
    world = dist.get_world_size()
    all_rows = [torch.empty_like(padded) for _ in range(world)]
    all_scores = [torch.empty_like(padded_scores) for _ in range(world)]
    all_counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(all_rows, padded)
    dist.all_gather(all_scores, padded_scores)
    dist.all_gather(all_counts, count)
    rows = torch.cat([r[:int(c)] for r, c in zip(all_rows, all_counts)])
    out_scores = torch.cat([s[:int(c)] for s, c in zip(all_scores, all_counts)])
    return rows, out_scores


def mean_one_weights(scores: torch.Tensor) -> torch.Tensor:
    """w = s * n / sum(s): the L1-normalised scores times their count (mean 1), as in the released code."""
    return scores * (scores.shape[0] / scores.sum())


def weighted_prototype_distance(features: torch.Tensor, prototypes: torch.Tensor,
                                feature_scores: torch.Tensor, prototype_scores: torch.Tensor) -> torch.Tensor:
    """One class's term of SS-Net Eq. (4), in the released code's weighting:

        loss_c = (1 / (M N)) * sum_j sum_i  w_f,j * w_z,i * (1 - <f_j, z_i> / (||f_j|| ||z_i||))

    f (M, D) are the class's projected voxel features, z (N, D) its prototypes, w_f = s_f * M / sum(s_f) and
    w_z = s_z * N / sum(s_z) the attention scores (sigmoid outputs) rescaled to mean 1. Gradients flow into
    ``features`` and the scores exactly as they are passed; callers pass a constant memory.
    """
    f = F.normalize(features.float(), dim=1)
    z = F.normalize(prototypes.float(), dim=1)
    distance = 1.0 - f @ z.t()                                     # (M, N), in [0, 2]
    w_f = mean_one_weights(feature_scores.float().reshape(-1))
    w_z = mean_one_weights(prototype_scores.float().reshape(-1))
    return (distance * w_f[:, None] * w_z[None, :]).mean()


def class_separation_loss(per_class_terms: List[torch.Tensor], num_classes: int,
                          reference: Optional[torch.Tensor] = None) -> torch.Tensor:
    """L_cs = (1 / C) * sum over evaluated classes of loss_c (SS-Net Eq. 4; C counts every class, also those skipped
    because they have no memory or too few voxels, background included for softmax outputs).

    ``reference`` gives device/dtype for the zero returned when no class could be evaluated.
    """
    if len(per_class_terms) == 0:
        if reference is None:
            return torch.zeros(())
        return reference.new_zeros((), dtype=torch.float32)
    return torch.stack([t.float() for t in per_class_terms]).sum() / float(num_classes)


def subsample_indices(mask: torch.Tensor, max_count: Optional[int],
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Flat indices of the True entries of ``mask``; a uniform random subset of ``max_count`` of them when there
    are more (``None`` or a non-positive value: no bound). Used to bound the number of voxels per class that go
    through the heads; the mean in :func:`weighted_prototype_distance` over a uniform subset is an unbiased
    estimate of the mean over all voxels of the class.
    """
    idx = mask.reshape(-1).nonzero(as_tuple=False).squeeze(1)
    if max_count is None or max_count <= 0 or idx.numel() <= max_count:
        return idx
    if generator is not None:
        perm = torch.randperm(idx.numel(), generator=generator).to(idx.device)
    else:
        perm = torch.randperm(idx.numel(), device=idx.device)
    return idx[perm[:max_count]]


def gather_voxel_features(features: torch.Tensor, flat_indices: torch.Tensor) -> torch.Tensor:
    """Rows of a (B, C, *spatial) feature map at flat (b, *spatial) indices -> (n, C), without copying the whole
    map into voxel-major layout."""
    b, c = features.shape[:2]
    flat = features.reshape(b, c, -1)
    num_voxels = flat.shape[2]
    return flat[flat_indices // num_voxels, :, flat_indices % num_voxels]
