"""Bidirectional copy-paste (BCP, Bai et al. CVPR 2023) as components that know nothing of nnU-Net trainers.

* :class:`BoxMaskGenerator`   - the step's mask M (seeded; its seed is the state saved with the checkpoint).
* :func:`keep_largest_component_per_class` - BCP's pseudo-label filtering (``get_cut_mask(..., nms=1)``).
* :class:`BCPTeacher`         - the Mean Teacher component's EMA teacher, with BCP's constant decay, no input
                                noise and a one-time initialisation from the student at the phase switch.
* :class:`BidirectionalCopyPaste` - builds the mixed patches and their per-region weights, and computes the
                                mixed-patch loss of every direction (a :class:`LossComponent`).

Formulas and sources are in :mod:`nnunetv2_semiseg.losses.copy_paste`; choices are documented in ``docs/bcp.md``.
"""
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from nnunetv2_semiseg.losses.copy_paste import (box_mask, copy_paste, deep_supervised, downsample_like_targets,
                                                region_weighted_dc_ce)
from nnunetv2_semiseg.trainers.components import LossComponent, StepContext
from nnunetv2_semiseg.trainers.mean_teacher_component import MeanTeacherConsistency


class BoxMaskGenerator:
    """M for optimizer step ``step`` on rank ``rank``, drawn from ``numpy.random.default_rng([seed, rank, step])``.

    A counter-based draw: the mask of a step depends only on (seed, rank, step), so a run resumed with ``--c``
    (which restores the step counter) draws exactly the masks the uninterrupted run would have drawn, and every DDP
    rank draws its own. The state saved in the checkpoint is the seed.
    """

    def __init__(self, beta: float, seed: Optional[int] = None):
        if not 0 < beta < 1:
            raise ValueError(f'the box fraction beta must lie in (0, 1), got {beta}')
        self.beta = float(beta)
        # Without an explicit seed, drawn from numpy's global generator (nnUNet_semiseg_seed seeds it).
        self.seed = int(np.random.randint(0, 2 ** 31 - 1)) if seed is None else int(seed)

    def mask(self, spatial_shape: Sequence[int], step: int, rank: int = 0,
             device: Optional[torch.device] = None) -> torch.Tensor:
        return box_mask(spatial_shape, self.beta, np.random.default_rng([self.seed, rank, step]), device)

    def state_dict(self) -> dict:
        return {'seed': self.seed, 'beta': self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state['seed'])


def keep_largest_component_per_region(maps: np.ndarray) -> np.ndarray:
    """Region maps (K, *spatial) of 0/1 in which every region keeps only its largest connected component (same
    connectivity as :func:`keep_largest_component_per_class`). Each region is filtered on its own map, as BCP
    filters each class: nested regions (whole tumour / core / enhancing) are each one object."""
    out = maps.copy()
    for k in range(maps.shape[0]):
        out[k] = keep_largest_component_per_class(maps[k], (1,))
    return out


def keep_largest_component_per_class(labels: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Label map (spatial) in which every voxel of class c outside c's largest connected component becomes
    background (0). Components connect through faces, edges and corners (skimage ``label``'s default, which BCP's
    ``LargestCC`` / ``get_ACDC_2DLargestCC`` use)."""
    out = labels.copy()
    structure = np.ones((3,) * labels.ndim, dtype=bool)
    for c in classes:
        components, count = ndimage.label(labels == c, structure=structure)
        if count > 1:
            sizes = np.bincount(components.ravel())[1:]
            out[(components > 0) & (components != 1 + int(np.argmax(sizes)))] = 0
    return out


class BCPTeacher(MeanTeacherConsistency):
    """The Mean Teacher component's EMA teacher, used by BCP for pseudo-labels only (its consistency term is not
    used). Differences, all from BCP's released code (``update_model_ema(model, ema_model, 0.99)``; the teacher
    loads the pre-trained student): a constant decay (no ``1 - 1/(step + 1)`` warm start: the teacher starts from a
    trained student, not a random one), clean teacher inputs (no noise), and :meth:`initialise_from`, which copies
    the student once, at the phase switch; before it the teacher is neither used nor updated."""

    exclusive_reason = (
        'it is BCP\'s pseudo-label teacher, not a loss term of its own (weight 0): it is initialised from the '
        'student and EMA-updated only after nnUNetTrainerBCP\'s phase switch calls initialise_from, so in a composed '
        'trainer it would stay a copy of the initial student. For a teacher consistency term use '
        'MeanTeacherConsistency.')

    def __init__(self, student: nn.Module, ema_decay: float = 0.99):
        super().__init__(student, weight=0.0, ema_decay=ema_decay, noise_std=0.0)
        self.initialised = False

    def initialise_from(self, student: nn.Module) -> None:
        self.teacher.load_state_dict(student.state_dict())
        self.initialised = True

    @torch.no_grad()
    def after_optimizer_step(self, student: nn.Module, step: int) -> None:
        if not self.initialised:
            return
        for t, s in zip(self.teacher.parameters(), student.parameters()):
            t.mul_(self.ema_decay).add_(s.detach(), alpha=1.0 - self.ema_decay)
        for t, s in zip(self.teacher.buffers(), student.buffers()):
            t.copy_(s)

    def state_dict(self) -> dict:
        return {'weights': self.teacher.state_dict(), 'initialised': self.initialised}

    def load_state_dict(self, state: Optional[dict], student: Optional[nn.Module] = None) -> None:
        if state is None:
            self.initialised = False  # e.g. a plain nnU-Net checkpoint: the phase switch initialises it
            return
        self.teacher.load_state_dict(state['weights'])
        self.initialised = bool(state['initialised'])


@dataclass
class MixedPatches:
    """Mixed inputs, their targets at every deep-supervision level and the region weights of each direction.

    ``directions`` lists (name, rows, weight of region M, weight of region 1 - M); ``mask_levels[k]`` is M at level
    k, shape (1, 1, *spatial_k), broadcast over the rows.
    """
    x: torch.Tensor
    target_levels: List[torch.Tensor]
    mask_levels: List[torch.Tensor]
    directions: List[Tuple[str, slice, float, float]]


class BidirectionalCopyPaste(LossComponent):
    """BCP's mixing and mixed-patch loss (Bai et al. 2023).

    Pre-training (labeled rows only)::

        x = x_a * M + x_b * (1 - M),        y = y_a * M + y_b * (1 - M)             weights (1, 1)

    Self-training (x_l: labeled rows, u: unlabeled rows, p: the teacher's pseudo-labels)::

        x_in  = x_l * M + u * (1 - M),      y_in  = y_l * M + p * (1 - M)            weights (1, u_weight)
        x_out = u' * M + x_l * (1 - M),     y_out = p' * M + y_l * (1 - M)           weights (u_weight, 1)

    ``x_b``, ``u'``, ``p'``: the rows shifted by one (row i pairs with row i - 1 mod n), so each labeled patch
    meets a different unlabeled partner in each direction (BCP's code splits its batch into halves a and b
    instead; see docs/bcp.md). A direction's loss is the deep-supervised :func:`region_weighted_dc_ce` with its
    two weights (first: region M, second: the box); :meth:`loss` sums the directions (BCP: ``loss_l + loss_u``).
    """
    name = 'bcp'
    state_key = 'bcp_mask'
    exclusive_reason = (
        'it replaces the step\'s inputs and targets with copy-paste mixtures of labeled and unlabeled patches (its '
        'loss reads them from context.cache[\'bcp_patches\']), so every other component of the step would read '
        'rows the student does not train on. To add a term to BCP, subclass nnUNetTrainerBCP and state which mixed '
        'rows the term reads by overriding mixed_patch_terms, as nnUNetTrainerBCPFLPM does.')

    def __init__(self, beta: float = 2 / 3, u_weight: float = 0.5, keep_largest_component: bool = True,
                 bidirectional: bool = True, seed: Optional[int] = None):
        self.u_weight = float(u_weight)
        self.keep_largest_component = keep_largest_component
        self.sigmoid_regions = False
        self.bidirectional = bidirectional
        self.masks = BoxMaskGenerator(beta, seed)
        self.use_loss_pieces(None)

    def use_loss_pieces(self, dice: Optional[Callable], weight_dice: float = 1.0, weight_ce: float = 1.0,
                        ds_weights: Optional[Sequence[float]] = None, ds_scales: Optional[Sequence] = None,
                        ignore_label: Optional[int] = None, sigmoid_regions: bool = False
                        ) -> 'BidirectionalCopyPaste':
        """The pieces of the trainer's DC+CE (or, for region datasets, DC+BCE: ``sigmoid_regions=True``) this loss
        is built on: nnU-Net's soft Dice module, the Dice and CE weights, the deep-supervision level weights and
        scales, and the ignore label."""
        self.dice, self.weight_dice, self.weight_ce = dice, float(weight_dice), float(weight_ce)
        self.ds_weights, self.ds_scales, self.ignore_label = ds_weights, ds_scales, ignore_label
        self.sigmoid_regions = bool(sigmoid_regions)
        return self

    # --- pseudo-labels ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def pseudo_labels(self, teacher_logits: torch.Tensor) -> torch.Tensor:
        """(b, 1, *spatial) long: foreground probability >= 0.5 for two classes, argmax otherwise; then, if
        ``keep_largest_component``, only the largest connected component of each foreground class.

        Region datasets (``sigmoid_regions``): (b, K, *spatial) long, region k on where sigmoid(z_k) >= 0.5, then
        only the largest connected component of each region; plus an all-zero last channel when the dataset has an
        ignore label (nnU-Net's ignore channel: no pseudo-labelled voxel is ignored), so that pseudo-labels and
        ground-truth targets have the same channels and can be mixed."""
        if self.sigmoid_regions:
            maps = (torch.sigmoid(teacher_logits.float()) >= 0.5).long()
            if self.keep_largest_component:
                maps = torch.from_numpy(np.stack([keep_largest_component_per_region(row)
                                                  for row in maps.cpu().numpy()])).to(maps.device)
            if self.ignore_label is not None:
                maps = torch.cat((maps, torch.zeros_like(maps[:, :1])), 1)
            return maps
        probabilities = torch.softmax(teacher_logits.float(), 1)
        num_classes = probabilities.shape[1]
        labels = (probabilities[:, 1] >= 0.5).long() if num_classes == 2 else probabilities.argmax(1)
        if self.keep_largest_component:
            filtered = [keep_largest_component_per_class(row, range(1, num_classes)) for row in labels.cpu().numpy()]
            labels = torch.from_numpy(np.stack(filtered)).to(labels.device)
        return labels[:, None]

    # --- mixing -------------------------------------------------------------------------------------------------
    @staticmethod
    def shifted(t: torch.Tensor) -> torch.Tensor:
        return torch.roll(t, shifts=1, dims=0)

    def pretraining_patches(self, x_l: torch.Tensor, y_l: torch.Tensor, mask: torch.Tensor) -> MixedPatches:
        x = copy_paste(x_l, self.shifted(x_l), mask)
        y = copy_paste(y_l, self.shifted(y_l), mask)
        return self._patches(x, y, mask, [('pretrain', slice(0, x.shape[0]), 1.0, 1.0)])

    def self_training_patches(self, x_l: torch.Tensor, y_l: torch.Tensor, u: torch.Tensor, p: torch.Tensor,
                              mask: torch.Tensor) -> MixedPatches:
        if u.shape[0] != x_l.shape[0]:
            raise ValueError(f'BCP pairs every labeled patch with an unlabeled one, but this step has {x_l.shape[0]} '
                             f'labeled and {u.shape[0]} unlabeled patches: leave unlabeled_batch_size at None (the '
                             f'labeled batch size).')
        n, p = x_l.shape[0], p.to(y_l.dtype)    # targets keep the loader's label dtype
        xs, ys = [copy_paste(x_l, u, mask)], [copy_paste(y_l, p, mask)]
        directions = [('inward', slice(0, n), 1.0, self.u_weight)]
        if self.bidirectional:
            xs.append(copy_paste(self.shifted(u), x_l, mask))
            ys.append(copy_paste(self.shifted(p), y_l, mask))
            directions.append(('outward', slice(n, 2 * n), self.u_weight, 1.0))
        return self._patches(torch.cat(xs), torch.cat(ys), mask, directions)

    def _patches(self, x, y, mask, directions) -> MixedPatches:
        return MixedPatches(x=x, target_levels=downsample_like_targets(y, self.ds_scales),
                            mask_levels=downsample_like_targets(mask[None, None], self.ds_scales),
                            directions=directions)

    # --- loss ---------------------------------------------------------------------------------------------------
    def direction_losses(self, seg_outputs, patches: MixedPatches) -> Dict[str, torch.Tensor]:
        """{direction name: deep-supervised region-weighted DC+CE of its rows} for the student's output of
        ``patches.x`` (a deep-supervision list or one tensor)."""
        outputs = list(seg_outputs) if isinstance(seg_outputs, (list, tuple)) else [seg_outputs]
        losses = {}
        for name, rows, weight_m, weight_box in patches.directions:
            def level_loss(k: int, rows=rows, weight_m=weight_m, weight_box=weight_box) -> torch.Tensor:
                m = patches.mask_levels[k]
                return region_weighted_dc_ce(outputs[k][rows], patches.target_levels[k][rows],
                                             [(m, weight_m), (1 - m, weight_box)], self.dice, self.weight_dice,
                                             self.weight_ce, self.ignore_label, self.sigmoid_regions)
            losses[name] = deep_supervised(level_loss, self.ds_weights)
        return losses

    def loss(self, context: StepContext) -> torch.Tensor:
        """Sum over directions, for a context whose ``x`` is ``context.cache['bcp_patches'].x``."""
        return sum(self.direction_losses(context.seg, context.cache['bcp_patches']).values())

    # --- state --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return self.masks.state_dict()

    def load_state_dict(self, state: Optional[dict], student: Optional[nn.Module] = None) -> None:
        if state is not None:
            self.masks.load_state_dict(state)
