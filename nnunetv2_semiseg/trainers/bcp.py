"""``nnUNetTrainerBCP``: bidirectional copy-paste (Bai et al., "Bidirectional Copy-Paste for Semi-Supervised Medical
Image Segmentation", CVPR 2023) as an nnU-Net v2 trainer.

One ``nnUNetv2_train`` run holds both phases of the paper (released code ``DeepMed-Lab-ECNU/BCP``, LA: 2,000
pre-training iterations, then 15,000 of self-training):

    pre-training   (t < pretrain_fraction):   L = L_mix(x_a*M + x_b*(1-M), y_a*M + y_b*(1-M); weights 1, 1)
    self-training  (t >= pretrain_fraction):  L = L_in + L_out
        L_in  = L_mix(x_l*M + u*(1-M),   y_l*M + p*(1-M);   weights 1, u_weight)
        L_out = L_mix(u'*M + x_l*(1-M),  p'*M + y_l*(1-M);  weights u_weight, 1)

M: 1 outside one box covering ``beta`` of every spatial dimension (0 inside). L_mix: nnU-Net's deep-supervised
DC+CE with region-weighted, region-normalised Dice and CE (:func:`~nnunetv2_semiseg.losses.copy_paste.
region_weighted_dc_ce`). p: pseudo-labels of the EMA teacher (decay 0.99, initialised from the student once, at
the phase switch), largest connected component per class. Region-based datasets (sigmoid outputs): per-region
pseudo-labels (p_k >= 0.5), largest component per region, nnU-Net's DC+BCE in place of DC+CE (docs/bcp.md). Mixing happens on the patches the loaders deliver,
after nnU-Net's augmentation (docs/bcp.md says why). The student is what ``nnUNetv2_predict`` runs.

Usage: ``nnUNetv2_train DatasetXXX 3d_fullres 0 -tr nnUNetTrainerBCP`` (after
``nnUNetv2_semiseg_preprocess_unlabeled``), then stock ``nnUNetv2_predict -tr nnUNetTrainerBCP``.
"""
import operator
import os
from functools import reduce
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist

from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

from nnunetv2_semiseg.trainers.bcp_components import BCPTeacher, BidirectionalCopyPaste, MixedPatches
from nnunetv2_semiseg.trainers.schedule import SWITCH_CHECKPOINT, SWITCH_CHECKPOINT_ENV_VAR, env_flag
from nnunetv2_semiseg.trainers.semi_supervised import nnUNetTrainerSemiSupervised


class nnUNetTrainerBCP(nnUNetTrainerSemiSupervised):
    pretrain_fraction = 2000 / 17000        # LA: 2,000 pre-training of 17,000 iterations in all
    mask_beta = 2 / 3                       # box edge = round(beta * patch edge), every spatial dimension
    u_weight = 0.5                          # weight of pseudo-labelled voxels (ground-truth voxels: 1)
    ema_decay = 0.99                        # constant, as the released code's update_model_ema
    keep_largest_component = True           # pseudo-labels: largest connected component per foreground class
    bidirectional = True                    # False: inward mixing only
    mask_seed = None                        # None: drawn from numpy (nnUNet_semiseg_seed makes it repeatable)
    loss_term_names = ('pretrain', 'inward', 'outward')

    def initialize(self):
        super().initialize()
        self.copy_paste = BidirectionalCopyPaste(self.mask_beta, self.u_weight, self.keep_largest_component,
                                                 self.bidirectional, self.mask_seed)
        self.copy_paste.use_loss_pieces(**self.supervised_loss_pieces())
        if self.is_ddp:
            # One seed for all ranks (the rank is a separate key of every draw, so the masks still differ): only
            # rank 0 writes the checkpoint, and a resumed rank must get back the seed it drew its masks from.
            seed = [self.copy_paste.masks.seed]
            dist.broadcast_object_list(seed, src=0)
            self.copy_paste.masks.seed = int(seed[0])
        # Built from the unwrapped, rank-synchronised student; initialised from it again at the phase switch.
        self.teacher = BCPTeacher(self.unwrapped_network, self.ema_decay).to(self.device)

    def supervised_loss_pieces(self) -> dict:
        """nnU-Net's DC+CE pieces (soft Dice module, Dice/CE weights, deep-supervision weights and scales)."""
        loss = self.loss
        ds_weights = None
        if isinstance(loss, DeepSupervisionWrapper):
            ds_weights, loss = loss.weight_factors, loss.loss
        expected = DC_and_BCE_loss if self.label_manager.has_regions else DC_and_CE_loss
        if not isinstance(loss, expected):
            raise TypeError(f'{type(self).__name__} builds its region-weighted loss on nnU-Net\'s '
                            f'{expected.__name__}, but _build_loss returned {type(loss).__name__}.')
        return {'dice': loss.dc, 'weight_dice': loss.weight_dice, 'weight_ce': loss.weight_ce,
                'ds_weights': ds_weights, 'ds_scales': self._get_deep_supervision_scales(),
                'ignore_label': self.label_manager.ignore_label,
                'sigmoid_regions': self.label_manager.has_regions}

    # ------------------------------------------------------------------------------------------------------------
    # phases
    def switch_step(self) -> int:
        """First optimizer step of the self-training phase."""
        return int(round(self.pretrain_fraction * self.total_iterations()))

    def in_pretraining(self) -> bool:
        return self.global_iteration < self.switch_step()

    # what the run log says each epoch (weights) and at the start (terms)
    def current_term_weights(self) -> Dict[str, float]:
        """BCP switches its terms by phase instead of ramping them: 1 for the terms of the phase of the epoch's
        last optimizer step, 0 for the other phase's (the pseudo-labelled voxels' u_weight is inside the terms)."""
        active = ('pretrain',) if self.epoch_last_step() < self.switch_step() else ('inward', 'outward')
        return {name: float(name in active) for name in ('pretrain', 'inward', 'outward')
                if name in self.loss_term_names}

    def term_weight_lines(self) -> List[str]:
        switch, total = self.switch_step(), self.total_iterations()
        mixed = ' / '.join(n for n in ('inward', 'outward') if n in self.loss_term_names)
        return [f'Loss term pretrain: labeled-only copy-paste (both patches ground truth), weight 1 for steps '
                f'0-{switch - 1} ({self.pretrain_fraction:.4g} of {total} steps), then 0.' if switch > 0 else
                'Loss term pretrain: no pre-training phase (pretrain_fraction 0).',
                f'Loss terms {mixed}: copy-paste of labeled and unlabeled patches with the EMA teacher\'s pseudo-labels, '
                f'weight 1 each from step {switch} on (the teacher starts there as a copy of the student); pseudo-'
                f'labelled voxels weigh u_weight={self.u_weight:g}, ground-truth voxels 1.']

    def start_self_training_once(self) -> None:
        if not self.teacher.initialised:
            self.teacher.initialise_from(self.unwrapped_network)
            self.print_to_log_file(f'BCP: self-training starts at step {self.global_iteration}; teacher '
                                   f'initialised from the student.')
            if env_flag(SWITCH_CHECKPOINT_ENV_VAR):
                # The weights the teacher starts from, as a normal checkpoint that nnUNetv2_predict -chk loads:
                # the quality of the first pseudo-labels is then measurable on any labeled data (diagnostic only)
                path = os.path.join(self.output_folder, SWITCH_CHECKPOINT)
                self.save_checkpoint(path)
                if os.path.isfile(path):
                    self.print_to_log_file(f'BCP: {path} written ({SWITCH_CHECKPOINT_ENV_VAR} is set).')

    @property
    def rank(self) -> int:
        return dist.get_rank() if self.is_ddp else 0

    # ------------------------------------------------------------------------------------------------------------
    def compute_loss_terms(self, data, target, unlabeled) -> Dict[str, torch.Tensor]:
        labels = self.full_resolution(target)   # mixed at full resolution, then downsampled like nnU-Net's targets
        mask = self.copy_paste.masks.mask(data.shape[2:], self.global_iteration, self.rank, data.device)
        zero = data.new_zeros((), dtype=torch.float32)
        # every logged term is present in both phases (0 where the phase has none), so epoch means stay defined
        terms = {name: zero for name in ('pretrain', 'inward', 'outward') + tuple(self.loss_term_names)}
        if self.in_pretraining():
            patches = self.copy_paste.pretraining_patches(data, labels, mask)
            step_terms, loss = self.mixed_patch_terms(patches, self_training=False)
        else:
            self.start_self_training_once()
            u = unlabeled['data']
            pseudo = self.copy_paste.pseudo_labels(self.teacher.teacher_logits(u, noise=False))
            patches = self.copy_paste.self_training_patches(data, labels, u, pseudo, mask)
            step_terms, loss = self.mixed_patch_terms(patches, self_training=True)
        terms.update(step_terms)
        terms['loss'] = loss
        return terms

    def mixed_patch_terms(self, patches: MixedPatches, self_training: bool) -> Tuple[Dict[str, torch.Tensor],
                                                                                       torch.Tensor]:
        """The student's one pass on the mixed patches: ({term: value}, loss to minimise). BCP: one term per
        direction and their sum (pre-training: L_mix; self-training: L_in + L_out). A subclass that adds a term
        reading the same pass overrides this (``nnUNetTrainerBCPFLPM``)."""
        terms = self.copy_paste.direction_losses(self.network(patches.x), patches)
        # reduce, not sum(): with one direction the loss is that term itself (no 0 + term copy)
        return terms, reduce(operator.add, terms.values())

    def after_optimizer_step(self) -> None:
        self.teacher.after_optimizer_step(self.unwrapped_network, self.global_iteration)

    # ------------------------------------------------------------------------------------------------------------
    def semiseg_state(self) -> dict:
        state = super().semiseg_state()
        state['bcp_teacher'] = self.teacher.state_dict()
        state[self.copy_paste.state_key] = self.copy_paste.state_dict()
        return state

    def load_semiseg_state(self, state) -> None:
        super().load_semiseg_state(state)
        state = state or {}
        self.teacher.load_state_dict(state.get('bcp_teacher'), student=self.unwrapped_network)
        self.copy_paste.load_state_dict(state.get(self.copy_paste.state_key))


# ---------------------------------------------------------------------------------------------------------------
# Variants (one change each)
# ---------------------------------------------------------------------------------------------------------------
class nnUNetTrainerBCP_noPretrain(nnUNetTrainerBCP):
    """Self-training from the first step (the teacher starts as the randomly initialised student)."""
    pretrain_fraction = 0.0


class nnUNetTrainerBCP_oneDirection(nnUNetTrainerBCP):
    """Inward mixing only (labeled outside the box, unlabeled inside): the student sees half the mixed patches."""
    bidirectional = False
    loss_term_names = ('pretrain', 'inward')


class nnUNetTrainerBCP_noLCC(nnUNetTrainerBCP):
    """Pseudo-labels without connected-component filtering."""
    keep_largest_component = False
