"""``nnUNetTrainerVoxelAdversarial``: Lee et al., "Voxel-wise Adversarial Semi-supervised Learning for Medical Image
Segmentation" (methods.md §3; no official code) as an nnU-Net v2 trainer.

Loss of the student (paper Eq. 6, nnU-Net's DC+CE in place of the V-Net Dice):

    L = L_sup(labeled rows)                     nnU-Net's deep-supervised DC+CE
        + alpha   * L_adv                       -mean log D_c(f_u): unlabeled voxel features pushed towards "real"
        + beta    * L_feature                   BYOL: 2 - 2 cos(pred(proj(f_s)), sg(proj_teacher(f_t))), labeled rows
        + gamma(t) * L_c                        mean (p_student - sg(p_teacher))^2, all rows, full resolution
    gamma(t) = 0.001 * exp(-5 (1 - t)^2),  t = fraction of training done

and, after the student's optimizer step, one Adam step of the discriminator D on the same
(detached) voxels: BCE(D_c(f_l), 1) + BCE(D_c(f_u), 0). alpha = 0.01, beta = 0.1 (LA; ``_beta100`` = the paper's
multi-organ value), Adam(2e-4, betas (0.5, 0.999)) for D, pseudo-label threshold 0.7, width 64.

Open points of the paper, decided here (class attributes; docs/voxel_adversarial.md lists them with reasons):

* encoder levels: the first ``num_feature_levels = 4`` encoder stage outputs (fewer if the plans have fewer stages);
* fusion resolution: the input resolution, evaluated only at the sampled voxels (exact, see
  ``networks/voxel_discriminator.py``); the conv after the addition is 1x1;
* sampling: at most ``adv_voxels_per_class`` / ``feature_voxels_per_class`` = 256 voxels per class and row;
* one teacher pass per step on all rows with the Mean Teacher input noise; it gives the consistency target, the
  pseudo-labels (unlabeled rows) and the BYOL targets (labeled rows);
* BYOL pairs: every same-class (student, teacher) pair of the sampled voxels;
* the fusion belongs to D (trained by D's Adam); the BYOL feature layer is ``network.heads`` (student optimizer);
* regions: one head per region plus one for voxels in no region; a voxel goes to the head of its last active region;
* student optimizer and schedule: nnU-Net's (SGD, PolyLR), not the paper's.

Modules: the student (+ BYOL feature layer under ``network.heads``) is the deployed network (stock
``nnUNetv2_predict`` loads it strictly; ``nnUNetv2_semiseg_export_plain`` drops the heads). The teacher is
``checkpoint['semiseg']['teacher_weights']``; D, its optimizer and its GradScaler are
``checkpoint['semiseg']['voxel_discriminator']``.

Usage: ``nnUNetv2_train DatasetXXX 3d_fullres 0 -tr nnUNetTrainerVoxelAdversarial`` (after
``nnUNetv2_semiseg_preprocess_unlabeled``), then stock ``nnUNetv2_predict -tr nnUNetTrainerVoxelAdversarial``.
"""
from typing import Dict, List

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunetv2_semiseg.networks.voxel_discriminator import VoxelDiscriminator, VoxelFeatureHeads
from nnunetv2_semiseg.trainers.components import LossComponent
from nnunetv2_semiseg.trainers.composed import nnUNetTrainerComposed
from nnunetv2_semiseg.trainers.mean_teacher_component import MeanTeacherConsistency
from nnunetv2_semiseg.trainers.voxel_adversarial_components import (VoxelAdversarialAlignment, VoxelFeatureBYOL,
                                                                    VoxelRouting, num_routing_heads)


def encoder_levels(encoder: nn.Module, num_levels: int) -> List[int]:
    """Channel counts of the first ``num_levels`` encoder stage outputs (all of them if there are fewer)."""
    return list(encoder.output_channels)[:num_levels]


class nnUNetTrainerVoxelAdversarial(nnUNetTrainerComposed):
    # --- adversarial (Eq. 2) ---
    use_adv = True
    adv_weight = 0.01                       # alpha
    adv_voxels_per_class = 256              # per class and row, for the generator loss and the D step
    discriminator_lr = 2e-4
    discriminator_betas = (0.5, 0.999)
    # --- BYOL voxel representation (Eq. 3) ---
    use_feature = True
    feature_weight = 0.1                    # beta (LA); 100 for the paper's multi-organ set (_beta100)
    feature_voxels_per_class = 256          # per class and labeled row
    # --- mean-teacher consistency (Eq. 5) ---
    consistency_weight = 0.001              # gamma(t) = 0.001 * exp(-5 (1 - t)^2) ...
    consistency_ramp_length = 1.0           # ... over the whole schedule (t / t_max)
    ema_decay = 0.99                        # not given by the paper: the UA-MT / SSL4MIS default
    teacher_noise_std = 0.1                 # not mentioned by the paper: the UA-MT teacher input noise
    teacher_noise_clip = 0.2
    # --- shared ---
    pseudo_label_threshold = 0.7
    feature_dim = 64
    num_feature_levels = 4

    loss_term_names = ('sup', 'adv', 'feature', 'cons', 'disc')
    # The step passes a closure through the network and does data-dependent sampling: no torch.compile.
    allow_torch_compile = False

    @classmethod
    def build_component_heads(cls, base_network: nn.Module, num_output_channels: int) -> Dict[str, nn.Module]:
        if not cls.use_feature:
            return {}
        return {VoxelFeatureBYOL.heads_key: VoxelFeatureHeads(encoder_levels(base_network.encoder,
                                                                            cls.num_feature_levels),
                                                             cls.feature_dim)}

    def routing(self, voxels_per_class: int) -> VoxelRouting:
        return VoxelRouting(self.label_manager.num_segmentation_heads, self.label_manager.has_regions,
                            self.label_manager.has_ignore_label, self.pseudo_label_threshold, voxels_per_class)

    def build_loss_components(self) -> List[LossComponent]:
        student = self.unwrapped_network
        self.consistency = MeanTeacherConsistency(
            student, weight=self.consistency_weight, ramp_length=self.consistency_ramp_length,
            ema_decay=self.ema_decay, noise_std=self.teacher_noise_std, noise_clip=self.teacher_noise_clip,
            rows='all', teacher_features=True)
        components: List[LossComponent] = []
        self.adversarial = None
        if self.use_adv:
            levels = encoder_levels(student.encoder, self.num_feature_levels)
            discriminator = VoxelDiscriminator(
                levels, num_routing_heads(self.label_manager.num_segmentation_heads, self.label_manager.has_regions),
                self.feature_dim)
            self.adversarial = VoxelAdversarialAlignment(
                discriminator, self.consistency, self.routing(self.adv_voxels_per_class), len(levels),
                weight=self.adv_weight, lr=self.discriminator_lr, betas=self.discriminator_betas, device=self.device)
            if self.is_ddp:
                self.adversarial.wrap_for_ddp(lambda m: DDP(m, device_ids=[self.local_rank]))
            components.append(self.adversarial)
        if self.use_feature:
            components.append(VoxelFeatureBYOL(self.consistency, self.routing(self.feature_voxels_per_class),
                                               len(encoder_levels(student.encoder, self.num_feature_levels)),
                                               weight=self.feature_weight))
        components.append(self.consistency)
        return components

    @property
    def teacher(self) -> nn.Module:
        return self.consistency.teacher

    # --- what the discriminator heads saw (run log, once per epoch) -----------------------------------------------
    def head_names(self) -> List[str]:
        """Name of each discriminator head: the class of each label value (softmax), or 'no region' and the
        regions in channel order (regions)."""
        labels = {k: v for k, v in self.label_manager.label_dict.items() if k != 'ignore'}
        if self.label_manager.has_regions:
            return ['no region'] + [k for k, v in labels.items() if any(int(x) != 0 for x in
                                                                          (v if isinstance(v, (list, tuple)) else [v]))]
        by_value = {int(v): k for k, v in labels.items()}
        return [by_value.get(c, str(c)) for c in range(self.label_manager.num_segmentation_heads)]

    def adversarial_voxel_lines(self) -> List[str]:
        """The epoch's sampled voxels per head, and which heads got no unlabeled (fake) voxel: the teacher reached
        the confidence threshold nowhere in those classes, so their discriminator trained on labeled voxels only
        and L_adv did not act on them (on a small class early in training this is the method's threshold at work,
        not a fault, but the run should say so). Under DDP the counts are summed over ranks."""
        counts = self.adversarial.take_voxel_counts()
        if self.is_ddp:
            import torch.distributed as dist
            counts = counts.to(self.device)
            dist.all_reduce(counts)
            counts = counts.cpu()
        names = self.head_names()
        lines = ['adv voxels per discriminator head this epoch (real = labeled ground truth / fake = unlabeled, '
                 f'teacher confidence >= {self.pseudo_label_threshold:g}): ' +
                 ', '.join(f'{n} {int(r)}/{int(f)}' for n, r, f in zip(names, counts[0], counts[1]))]
        no_fake = [n for n, f in zip(names, counts[1]) if int(f) == 0]
        if no_fake:
            lines.append(f'adv: no unlabeled voxel reached the head(s) {", ".join(no_fake)} this epoch (no teacher '
                         f'confidence >= {self.pseudo_label_threshold:g} there): their discriminator trained on '
                         f'labeled voxels only and L_adv did not act on those classes.')
        return lines

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        if self.adversarial is not None:
            for line in self.adversarial_voxel_lines():
                self.print_to_log_file(line)

    # The discriminator's Adam step runs in VoxelAdversarialAlignment.after_optimizer_step (the composed base calls
    # it after the student's step) and its loss joins the step's terms as 'disc' (after_step_terms).


# ---------------------------------------------------------------------------------------------------------------
# Variants: the paper's ablation (table IV) and its multi-organ beta
# ---------------------------------------------------------------------------------------------------------------
class nnUNetTrainerVoxelAdversarial_noAdv(nnUNetTrainerVoxelAdversarial):
    """Without the discriminator and L_adv (no D is built)."""
    use_adv = False
    loss_term_names = ('sup', 'feature', 'cons')


class nnUNetTrainerVoxelAdversarial_noFeature(nnUNetTrainerVoxelAdversarial):
    """Without the BYOL feature layer and L_feature (no heads are built)."""
    use_feature = False
    loss_term_names = ('sup', 'adv', 'cons', 'disc')


class nnUNetTrainerVoxelAdversarial_noConsistency(nnUNetTrainerVoxelAdversarial):
    """gamma = 0: L_c is still computed and logged (the teacher pass runs anyway for the pseudo-labels and the
    BYOL targets) but does not enter the loss."""
    consistency_weight = 0.0


class nnUNetTrainerVoxelAdversarial_beta100(nnUNetTrainerVoxelAdversarial):
    """beta = 100, the paper's value for its multi-organ dataset."""
    feature_weight = 100.0
