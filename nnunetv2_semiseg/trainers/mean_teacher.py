"""``nnUNetTrainerMeanTeacher``: the classic semi-supervised baseline (Tarvainen & Valpola 2017).

Recipe of SSL4MIS adapted to nnU-Net:

    L = L_sup(student(x_l), y_l) + w(t) * mean((p_student(x) - p_teacher(x + n))^2)
    w(t) = consistency_weight * sigmoid_rampup(t, consistency_ramp_length)
    n = clamp(N(0, 0.1^2), -0.2, 0.2) on the (normalised) teacher input
    teacher <- EMA of the student, alpha = min(1 - 1/(step + 1), 0.99)

L_sup is nnU-Net's deep-supervised DC+CE on the labeled rows; the consistency uses the full-resolution output
of the unlabeled rows, as SSL4MIS ``train_mean_teacher_3D.py`` does (``outputs_soft[labeled_bs:]`` against the
teacher's prediction of the noisy unlabeled volumes). ``nnUNetTrainerMeanTeacher_consistencyAllRows`` adds the
labeled rows to the consistency (Tarvainen & Valpola apply it to every sample); it costs one more teacher forward
on the labeled batch.

The teacher, its noise, the weight ramp and the loss are the
:class:`~nnunetv2_semiseg.trainers.mean_teacher_component.MeanTeacherConsistency` component (shared with other
methods); the checkpoint keeps the teacher under ``checkpoint['semiseg']['teacher_weights']``.
"""
from typing import Dict, List

import torch
from torch import nn

from nnunetv2_semiseg.trainers.components import LossComponent
from nnunetv2_semiseg.trainers.composed import nnUNetTrainerComposed
from nnunetv2_semiseg.trainers.mean_teacher_component import MeanTeacherConsistency


class nnUNetTrainerMeanTeacher(nnUNetTrainerComposed):
    ema_decay = 0.99
    consistency_weight = 0.1
    consistency_ramp_length = 0.4          # fraction of training over which the weight ramps up
    teacher_noise_std = 0.1
    teacher_noise_clip = 0.2
    consistency_on_labeled_rows = False     # SSL4MIS: unlabeled rows only
    loss_term_names = ('sup', 'cons')

    def build_loss_components(self) -> List[LossComponent]:
        self.consistency = MeanTeacherConsistency(
            self.unwrapped_network, weight=self.consistency_weight, ramp_length=self.consistency_ramp_length,
            ema_decay=self.ema_decay, noise_std=self.teacher_noise_std, noise_clip=self.teacher_noise_clip,
            rows='all' if self.consistency_on_labeled_rows else 'unlabeled')
        return [self.consistency]

    @property
    def teacher(self) -> nn.Module:
        return self.consistency.teacher

    def consistency_weight_now(self) -> float:
        return self.consistency.weight_at(self.training_fraction())

    def student_forward(self, net: nn.Module, x: torch.Tensor) -> dict:
        return {'seg': net(x)}

    def compute_loss_terms(self, data, target, unlabeled) -> Dict[str, torch.Tensor]:
        # A plain forward through the (DDP / torch.compile) network instead of the base's train_fn closure: Mean
        # Teacher needs no features, and nnU-Net's torch.compile of the student keeps working.
        num_labeled = data.shape[0]
        x = torch.cat((data, unlabeled['data']))
        return self.composed_loss(self.network, x, target, num_labeled)


class nnUNetTrainerMeanTeacher_consistencyAllRows(nnUNetTrainerMeanTeacher):
    """Consistency on labeled and unlabeled rows (the original Mean Teacher applies it to every sample)."""
    consistency_on_labeled_rows = True
