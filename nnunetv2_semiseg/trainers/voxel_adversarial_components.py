"""The two voxel-wise components of Lee et al., "Voxel-wise Adversarial Semi-supervised Learning" (methods.md §3),
each owning its hyperparameters, its state and its loss; they know nothing of nnU-Net trainers.

* :class:`VoxelAdversarialAlignment` - the voxel-wise feature discriminator (its own optimizer, GradScaler and
  optional DDP wrapper) and the student's non-saturating generator loss L_adv (Eq. 2).
* :class:`VoxelFeatureBYOL`          - the BYOL voxel representation loss L_feature on labeled rows (Eq. 3).

Both read the EMA teacher of a :class:`~nnunetv2_semiseg.trainers.mean_teacher_component.MeanTeacherConsistency`
component through its shared per-step teacher pass (pseudo-labels for the unlabeled rows; the teacher's feature
layer for the BYOL targets). Formulas and sources: ``losses/voxel_adversarial.py``, ``losses/byol.py``; choices and
deviations: ``docs/voxel_adversarial.md``.
"""
from typing import Callable, List, Optional, Tuple

import torch
from torch import autocast, nn
from torch.func import functional_call

from nnunetv2.utilities.helpers import dummy_context

from nnunetv2_semiseg.losses.byol import byol_feature_loss
from nnunetv2_semiseg.losses.voxel_adversarial import (classes_from_labels, classes_from_probabilities,
                                                       discriminator_loss, generator_loss, sample_class_voxels)
from nnunetv2_semiseg.networks.voxel_discriminator import VoxelDiscriminator, sample_levels
from nnunetv2_semiseg.trainers.components import LossComponent, StepContext, heads_of
from nnunetv2_semiseg.trainers.mean_teacher_component import MeanTeacherConsistency
from nnunetv2_semiseg.trainers.ssnet_components import zero_touch


def num_routing_heads(num_output_channels: int, regions: bool) -> int:
    """Softmax: one head per output channel (background included). Regions: one per region plus head 0 for voxels
    in no region (there is no background channel to route them to)."""
    return num_output_channels + 1 if regions else num_output_channels


class VoxelRouting:
    """Which head (class) a voxel belongs to: ground truth on labeled rows, the teacher's confident pseudo-label on
    unlabeled rows; and the bounded per-class voxel sampling."""

    def __init__(self, num_output_channels: int, regions: bool, has_ignore_label: bool, threshold: float,
                 voxels_per_class: int):
        self.regions, self.has_ignore_label, self.threshold = regions, has_ignore_label, float(threshold)
        self.num_heads = num_routing_heads(num_output_channels, regions)
        self.voxels_per_class = int(voxels_per_class)
        self.generator: Optional[torch.Generator] = None  # tests may fix the sampling

    def labeled_classes(self, context: StepContext) -> torch.Tensor:
        return classes_from_labels(context.full_resolution_target, self.num_heads, self.regions,
                                   self.has_ignore_label)

    def pseudo_classes(self, teacher_probabilities: torch.Tensor) -> torch.Tensor:
        return classes_from_probabilities(teacher_probabilities, self.threshold, self.regions)

    def sample(self, classes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return sample_class_voxels(classes, self.num_heads, self.voxels_per_class, self.generator)


def _teacher_rows(teacher: MeanTeacherConsistency, context: StepContext, rows: slice) -> dict:
    """The shared teacher pass restricted to ``rows`` of the step's batch (the pass covers every row)."""
    out = teacher.teacher_pass(context)
    return {'probabilities': out['probabilities'][rows], 'skips': [s[rows] for s in out.get('skips', [])]}


class VoxelAdversarialAlignment(LossComponent):
    """L_adv^G = -mean log D_c(f_u) (student side) and the discriminator step on the same, detached voxels.

    Per step, :meth:`loss` samples at most ``voxels_per_class`` voxels per class and row (labeled rows by ground
    truth = real, unlabeled rows by the teacher's pseudo-label where its confidence exceeds the threshold = fake),
    reads the student's first ``num_levels`` encoder outputs at those voxels (upsampled to the input resolution)
    and scores the unlabeled ones with the discriminator's weights held constant (``functional_call`` on detached
    parameters: the student loss puts no gradient on D). The detached voxel vectors are kept for
    :meth:`discriminator_step`, which :meth:`after_optimizer_step` runs after the student's optimizer step (so any
    trainer that uses this component trains its discriminator); its loss is logged as term ``disc``.
    """
    name = 'adv'
    state_key = 'voxel_discriminator'

    def __init__(self, discriminator: VoxelDiscriminator, teacher: MeanTeacherConsistency, routing: VoxelRouting,
                 num_levels: int, weight: float = 0.01, lr: float = 2e-4, betas: Tuple[float, float] = (0.5, 0.999),
                 device: torch.device = torch.device('cpu')):
        if teacher.rows != 'all':
            raise ValueError("VoxelAdversarialAlignment needs a teacher pass over all rows (rows='all')")
        self.discriminator, self.teacher, self.routing = discriminator, teacher, routing
        self.num_levels, self.weight, self.device = int(num_levels), float(weight), torch.device(device)
        self.discriminator.to(self.device)
        self.optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=tuple(betas))
        # Its own scaler: D's loss scale must not be tied to the student's (a D overflow would skip student steps).
        self.grad_scaler = torch.amp.GradScaler('cuda') if self.device.type == 'cuda' else None
        self.discriminator_call: nn.Module = discriminator  # replaced by a DDP wrapper under DDP (wrap_for_ddp)
        self.pending: Optional[Tuple[List[torch.Tensor], torch.Tensor, torch.Tensor]] = None
        self.last_discriminator_loss: Optional[torch.Tensor] = None
        # sampled voxels per head since the last take_voxel_counts(): row 0 real (labeled), row 1 fake (unlabeled)
        self.voxel_counts: Optional[torch.Tensor] = None

    def wrap_for_ddp(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        self.discriminator_call = wrap(self.discriminator)

    # --- student side --------------------------------------------------------------------------------------------
    def sampled_voxels(self, context: StepContext):
        """(level vectors with gradient, classes, is_real) of the sampled labeled and confident unlabeled voxels."""
        skips = context.out['skips'][:self.num_levels]
        full_shape = context.x.shape[2:]
        with torch.no_grad():
            labeled = self.routing.labeled_classes(context)
            unlabeled = self.routing.pseudo_classes(_teacher_rows(self.teacher, context, context.unlabeled)
                                                    ['probabilities'])
            rows, flat, classes = self.routing.sample(torch.cat((labeled, unlabeled)))
        is_real = rows < context.num_labeled
        return sample_levels(skips, rows, flat, full_shape), classes, is_real

    def count_voxels(self, classes: torch.Tensor, is_real: torch.Tensor) -> None:
        """Add the step's sampled voxels per head (real, fake) to :attr:`voxel_counts` (kept on the device: no
        synchronisation per step)."""
        n = self.routing.num_heads
        step = torch.stack((torch.bincount(classes[is_real], minlength=n), torch.bincount(classes[~is_real],
                                                                                         minlength=n)))
        self.voxel_counts = step if self.voxel_counts is None else self.voxel_counts + step

    def take_voxel_counts(self) -> torch.Tensor:
        """(2, heads) int64 on the CPU: real / fake voxels per head since the last call; resets the count."""
        counts = self.voxel_counts
        self.voxel_counts = None
        return torch.zeros(2, self.routing.num_heads, dtype=torch.long) if counts is None else counts.cpu()

    def loss(self, context: StepContext) -> torch.Tensor:
        levels, classes, is_real = self.sampled_voxels(context)
        self.count_voxels(classes, is_real)
        self.pending = ([v.detach() for v in levels], classes, is_real)
        fake = ~is_real
        frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        fake_logits = functional_call(self.discriminator, frozen, ([v[fake] for v in levels], classes[fake]))
        return generator_loss(fake_logits)

    # --- discriminator side --------------------------------------------------------------------------------------
    def discriminator_step(self) -> torch.Tensor:
        """One Adam step of D on the voxels kept by the last :meth:`loss` (detached from the student). Always runs
        D's (DDP) forward/backward, also on an empty voxel set, so no rank skips the gradient all-reduce."""
        if self.pending is None:
            raise RuntimeError('discriminator_step() before loss(): no sampled voxels to train on')
        levels, classes, is_real = self.pending
        self.pending = None
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == 'cuda' else dummy_context():
            logits = self.discriminator_call(levels, classes)
            loss = discriminator_loss(logits[is_real], logits[~is_real])
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return loss.detach()

    def after_optimizer_step(self, student: nn.Module, step: int) -> None:
        # D learns from the voxels of the step the student just took (detached, so the order relative to the
        # teacher's EMA update does not matter).
        self.last_discriminator_loss = self.discriminator_step()

    def after_step_terms(self):
        return {} if self.last_discriminator_loss is None else {'disc': self.last_discriminator_loss}

    # --- component plumbing --------------------------------------------------------------------------------------
    def extra_modules(self) -> List[nn.Module]:
        return [self.discriminator]

    def to(self, device: torch.device) -> 'VoxelAdversarialAlignment':
        self.discriminator.to(device)
        return self

    def state_dict(self) -> dict:
        return {'weights': self.discriminator.state_dict(), 'optimizer': self.optimizer.state_dict(),
                'grad_scaler': self.grad_scaler.state_dict() if self.grad_scaler is not None else None}

    def load_state_dict(self, state: Optional[dict], student: Optional[nn.Module] = None) -> None:
        if state is None:
            return  # e.g. a plain nnU-Net checkpoint: the discriminator starts fresh
        self.discriminator.load_state_dict(state['weights'])
        self.optimizer.load_state_dict(state['optimizer'])
        if self.grad_scaler is not None and state.get('grad_scaler') is not None:
            self.grad_scaler.load_state_dict(state['grad_scaler'])


class VoxelFeatureBYOL(LossComponent):
    """L_feature on labeled rows: per class, the student's prediction(projection(fused features)) of the sampled
    ground-truth voxels against the EMA teacher's projection of the same voxels (teacher encoder + teacher feature
    layer), all same-class pairs, stop-gradient on the teacher. The student's feature layer is the network's heads
    entry ``heads_key`` (:class:`~nnunetv2_semiseg.networks.voxel_discriminator.VoxelFeatureHeads`); the teacher's is
    the same entry of the EMA copy."""
    name = 'feature'
    heads_key = 'voxel_feature'

    def __init__(self, teacher: MeanTeacherConsistency, routing: VoxelRouting, num_levels: int, weight: float = 0.1):
        if teacher.rows != 'all':
            raise ValueError("VoxelFeatureBYOL needs a teacher pass over all rows (rows='all')")
        self.teacher, self.routing = teacher, routing
        self.num_levels, self.weight = int(num_levels), float(weight)

    def loss(self, context: StepContext) -> torch.Tensor:
        heads = context.heads_for(self.heads_key)
        labeled = context.labeled
        full_shape = context.x.shape[2:]
        with torch.no_grad():
            rows, flat, classes = self.routing.sample(self.routing.labeled_classes(context))
            teacher_skips = _teacher_rows(self.teacher, context, labeled)['skips'][:self.num_levels]
            teacher_projections = heads_of(self.teacher.teacher, self.heads_key).project(
                sample_levels(teacher_skips, rows, flat, full_shape)).float()
        student_levels = sample_levels([s[labeled] for s in context.out['skips'][:self.num_levels]], rows, flat,
                                       full_shape)
        predictions = heads.project_and_predict(student_levels)
        value = byol_feature_loss(predictions, teacher_projections, classes, range(self.routing.num_heads))
        # Zero-weighted touch of every head parameter: DDP without find_unused_parameters also accepts a step in
        # which this rank sampled no voxel.
        return value + zero_touch(heads, predictions)
