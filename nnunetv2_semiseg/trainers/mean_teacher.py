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
"""
from typing import Dict, List

import torch
from torch import nn

from nnunetv2_semiseg.losses.consistency import clipped_gaussian_noise, probability_mse
from nnunetv2_semiseg.networks.ema import create_ema_teacher, ema_update
from nnunetv2_semiseg.trainers.ramps import sigmoid_rampup
from nnunetv2_semiseg.trainers.semi_supervised import nnUNetTrainerSemiSupervised


class nnUNetTrainerMeanTeacher(nnUNetTrainerSemiSupervised):
    ema_decay = 0.99
    consistency_weight = 0.1
    consistency_ramp_length = 0.4          # fraction of training over which the weight ramps up
    teacher_noise_std = 0.1
    teacher_noise_clip = 0.2
    consistency_on_labeled_rows = False     # SSL4MIS: unlabeled rows only
    loss_term_names = ('sup', 'cons')

    def initialize(self):
        super().initialize()
        # Created from the unwrapped, rank-synchronised student: it stays in sync under DDP without its own DDP.
        self.teacher = create_ema_teacher(self.unwrapped_network)
        self.teacher.decoder.deep_supervision = False  # the consistency uses the full-resolution output only

    def consistency_weight_now(self) -> float:
        return self.consistency_weight * sigmoid_rampup(self.training_fraction(), self.consistency_ramp_length)

    def compute_loss_terms(self, data, target, unlabeled) -> Dict[str, torch.Tensor]:
        num_labeled = data.shape[0]
        x = torch.cat((data, unlabeled['data']))
        output = self.network(x)
        loss_sup = self.supervised_loss(self.labeled_rows(output, num_labeled), target)

        rows = slice(0, None) if self.consistency_on_labeled_rows else slice(num_labeled, None)
        with torch.no_grad():
            x_teacher = x[rows]
            x_teacher = x_teacher + clipped_gaussian_noise(x_teacher, self.teacher_noise_std, self.teacher_noise_clip)
            teacher_probabilities = self.rows_to_probabilities(self.teacher(x_teacher))
        student_probabilities = self.rows_to_probabilities(self.full_resolution(output)[rows])
        loss_cons = probability_mse(student_probabilities, teacher_probabilities)

        loss = loss_sup + self.consistency_weight_now() * loss_cons
        return {'loss': loss, 'sup': loss_sup, 'cons': loss_cons}

    def after_optimizer_step(self) -> None:
        ema_update(self.teacher, self.unwrapped_network, self.global_iteration, self.ema_decay)

    def semiseg_state(self) -> dict:
        state = super().semiseg_state()
        state['teacher_weights'] = self.teacher.state_dict()
        return state

    def load_semiseg_state(self, state) -> None:
        super().load_semiseg_state(state)
        if state is not None and 'teacher_weights' in state:
            self.teacher.load_state_dict(state['teacher_weights'])
        else:
            # e.g. starting from a plain nnU-Net checkpoint: the teacher starts as the student.
            self.teacher.load_state_dict(self.unwrapped_network.state_dict())


class nnUNetTrainerMeanTeacher_consistencyAllRows(nnUNetTrainerMeanTeacher):
    """Consistency on labeled and unlabeled rows (the original Mean Teacher applies it to every sample)."""
    consistency_on_labeled_rows = True
