"""Voxel-wise modules of Lee et al., "Voxel-wise Adversarial Semi-supervised Learning" (Fig. 3), evaluated at
sampled voxels only.

Both the discriminator (Fig. 3a) and the BYOL feature layer (Fig. 3b) start with the same multi-resolution fusion:
a 1x1 conv per encoder level to ``dim`` channels, upsampling of every level to the input resolution, addition and
a conv. Only a bounded number of voxels per class is ever scored, so the fusion is evaluated at those voxels
instead of densely: :func:`sample_upsampled` linearly interpolates each raw encoder level at the sampled
full-resolution voxels exactly as ``F.interpolate(..., mode='(tri|bi)linear', align_corners=False)`` followed by
indexing would, and the 1x1 conv is applied afterwards (a 1x1 conv commutes with linear interpolation: both are
linear and the interpolation weights sum to 1). The conv after the addition is pointwise (a 1x1 conv, i.e. a
``Linear`` on voxel vectors; the paper does not give its size). The result equals the dense full-resolution
fusion at the sampled voxels without ever building a full-resolution 64-channel map (docs/voxel_adversarial.md).
"""
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def sample_upsampled(feature_map: torch.Tensor, rows: torch.Tensor, flat_index: torch.Tensor,
                     full_shape: Sequence[int]) -> torch.Tensor:
    """Values of ``F.interpolate(feature_map, size=full_shape, mode='(bi|tri)linear', align_corners=False)`` at
    the voxels (row ``rows[i]``, flat spatial index ``flat_index[i]`` of ``full_shape``), as (n, C).

    Computed with ``grid_sample`` at the centres of the sampled full-resolution voxels (``align_corners=False``,
    border padding = interpolate's clamping of source indices at the edges); gradients flow into ``feature_map``.
    """
    n, channels = rows.numel(), feature_map.shape[1]
    if n == 0:
        return feature_map.new_zeros((0, channels)) + 0 * feature_map.sum()   # empty, still in the graph
    full_shape = tuple(int(s) for s in full_shape)
    coords = []
    rest = flat_index
    for size in reversed(full_shape):                      # unravel: last spatial axis varies fastest
        coords.append(rest % size)
        rest = torch.div(rest, size, rounding_mode='floor')
    # grid_sample wants (x, y[, z]) = last axis first, in [-1, 1] at voxel centres: (2 i + 1) / S - 1
    grid = torch.stack([(2 * c.float() + 1) / size - 1 for c, size in zip(coords, reversed(full_shape))], -1)
    values, order = [], []
    for b in torch.unique(rows).tolist():
        selected = (rows == b).nonzero(as_tuple=False).squeeze(1)
        g = grid[selected].to(feature_map.dtype).view(1, *([1] * (len(full_shape) - 1)), -1, len(full_shape))
        sampled = F.grid_sample(feature_map[b:b + 1], g, mode='bilinear', padding_mode='border', align_corners=False)
        values.append(sampled.reshape(channels, -1).t())
        order.append(selected)
    out = torch.zeros((n, channels), dtype=values[0].dtype, device=feature_map.device)
    return out.index_copy(0, torch.cat(order), torch.cat(values))


def sample_levels(skips: Sequence[torch.Tensor], rows: torch.Tensor, flat_index: torch.Tensor,
                  full_shape: Sequence[int]) -> List[torch.Tensor]:
    """:func:`sample_upsampled` of every encoder level at the same voxels."""
    return [sample_upsampled(s, rows, flat_index, full_shape) for s in skips]


class SparseMultiResolutionFusion(nn.Module):
    """1x1 conv per level -> (upsampled to full resolution, done by the caller's sampling) -> sum -> 1x1 conv ->
    LeakyReLU, on voxel vectors: ``forward([v_1 (n, C_1), ..., v_L (n, C_L)]) -> (n, dim)``."""

    def __init__(self, in_channels: Sequence[int], dim: int = 64):
        super().__init__()
        self.in_channels, self.dim = list(in_channels), dim
        self.level_convs = nn.ModuleList([nn.Linear(c, dim) for c in in_channels])
        self.fuse = nn.Linear(dim, dim)
        self.activation = nn.LeakyReLU(0.2)

    def forward(self, level_vectors: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(level_vectors) != len(self.level_convs):
            raise ValueError(f'expected {len(self.level_convs)} encoder levels, got {len(level_vectors)}')
        summed = sum(conv(v) for conv, v in zip(self.level_convs, level_vectors))
        return self.activation(self.fuse(summed))


class VoxelDiscriminator(nn.Module):
    """Fig. 3a: fusion -> 2-layer MLP trunk -> one linear real/fake head per class; a voxel is scored by the head
    of its class. ``forward(level_vectors, classes) -> (n,)`` logits. All heads are one ``Linear(dim, num_heads)``
    (row c = head c), so a voxel of class c reaches only row c of it through the gather."""

    def __init__(self, in_channels: Sequence[int], num_heads: int, dim: int = 64):
        super().__init__()
        self.num_heads = num_heads
        self.fusion = SparseMultiResolutionFusion(in_channels, dim)
        self.trunk = nn.Sequential(nn.Linear(dim, dim), nn.LeakyReLU(0.2), nn.Linear(dim, dim), nn.LeakyReLU(0.2))
        self.heads = nn.Linear(dim, num_heads)

    def forward(self, level_vectors: Sequence[torch.Tensor], classes: torch.Tensor) -> torch.Tensor:
        all_heads = self.heads(self.trunk(self.fusion(level_vectors)))
        return all_heads.gather(1, classes.long().view(-1, 1)).squeeze(1)


def _mlp(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))


class VoxelFeatureHeads(nn.Module):
    """Fig. 3b, the student's voxel-wise feature layer (trained with the student, ``network.heads``; the EMA
    teacher holds a copy): fusion -> projection MLP (-> prediction MLP on the student side). Hidden width 64
    everywhere (paper §IV-B). Use the named methods; there is deliberately no ``forward``."""

    def __init__(self, in_channels: Sequence[int], dim: int = 64):
        super().__init__()
        self.num_levels = len(in_channels)
        self.fusion = SparseMultiResolutionFusion(in_channels, dim)
        self.projector = _mlp(dim)
        self.predictor = _mlp(dim)

    def project(self, level_vectors: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.projector(self.fusion(level_vectors))

    def project_and_predict(self, level_vectors: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.predictor(self.project(level_vectors))
