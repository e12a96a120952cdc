"""The Mean Teacher component: an EMA teacher of the student and the probability consistency against it.

    L_cons = mean((p_student(x_rows) - sg(p_teacher(x_rows + n)))^2)          (Tarvainen & Valpola 2017)
    w(t)   = weight * sigmoid_rampup(t, ramp_length),  t = fraction of training done
    n      = clamp(N(0, noise_std^2), -noise_clip, noise_clip)               (SSL4MIS; noise_std 0 = no noise)
    teacher <- EMA of the student after every optimizer step, alpha = min(1 - 1/(step + 1), ema_decay)

``rows`` is 'unlabeled' (SSL4MIS ``train_mean_teacher_3D.py``) or 'all' (the original Mean Teacher; the
voxel-adversarial paper's Eq. 5). The teacher is a frozen copy of the whole unwrapped student (``heads.*``
included, so a method's training heads get EMA twins too); its state is saved under
``checkpoint['semiseg']['teacher_weights']`` (the layout ``nnUNetTrainerMeanTeacher`` always had).

Other components and trainers reuse the teacher without gradient: :meth:`MeanTeacherConsistency.teacher_logits` /
:meth:`MeanTeacherConsistency.teacher_probabilities` on any input rows (pseudo-labels),
:meth:`MeanTeacherConsistency.teacher_outputs` (logits plus encoder skips), and
:meth:`MeanTeacherConsistency.teacher_pass`, the step's one teacher pass on the consistency rows, cached in the
step context so that every component of the step shares it.
"""
from typing import Callable, Dict, Optional

import torch
from torch import nn

from nnunetv2_semiseg.losses.consistency import clipped_gaussian_noise, probability_mse
from nnunetv2_semiseg.networks.ema import create_ema_teacher, ema_update
from nnunetv2_semiseg.trainers.components import LossComponent, StepContext
from nnunetv2_semiseg.trainers.ramps import sigmoid_rampup

ROWS = ('unlabeled', 'all')


class MeanTeacherConsistency(LossComponent):
    """Owns the EMA teacher built from ``student`` (the unwrapped :class:`SemiSegNetwork`), the teacher input noise,
    the weight and its sigmoid ramp-up, and the consistency loss on the chosen rows."""
    name = 'cons'
    state_key = 'teacher_weights'

    def __init__(self, student: nn.Module, weight: float = 0.1, ramp_length: float = 0.4, ema_decay: float = 0.99,
                 noise_std: float = 0.1, noise_clip: float = 0.2, rows: str = 'unlabeled',
                 teacher_features: bool = False):
        if rows not in ROWS:
            raise ValueError(f'rows must be one of {ROWS}, got {rows!r}')
        self.weight, self.ramp_length, self.ema_decay = float(weight), float(ramp_length), float(ema_decay)
        self.noise_std, self.noise_clip, self.rows = float(noise_std), float(noise_clip), rows
        # True: the step's teacher pass also returns the teacher's features and skips (for components that use them)
        self.teacher_features = teacher_features
        # Built from the unwrapped, rank-synchronised student: it stays in sync under DDP without its own DDP.
        self.teacher = create_ema_teacher(student)
        if hasattr(self.teacher, 'decoder'):
            self.teacher.decoder.deep_supervision = False  # the teacher's output is used at full resolution only

    # --- schedule -----------------------------------------------------------------------------------------------
    def ramp(self, fraction: float) -> float:
        return sigmoid_rampup(fraction, self.ramp_length)

    # --- teacher ------------------------------------------------------------------------------------------------
    def noisy(self, x: torch.Tensor) -> torch.Tensor:
        if self.noise_std <= 0:
            return x
        return x + clipped_gaussian_noise(x, self.noise_std, self.noise_clip)

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor, noise: bool = True) -> torch.Tensor:
        """Full-resolution teacher logits of ``x`` (with the input noise unless ``noise=False``)."""
        return self.teacher(self.noisy(x) if noise else x)

    @torch.no_grad()
    def teacher_probabilities(self, x: torch.Tensor, to_probabilities: Callable[[torch.Tensor], torch.Tensor],
                              noise: bool = True) -> torch.Tensor:
        """float32 teacher probabilities (``to_probabilities`` = softmax or sigmoid, e.g. the context's)."""
        return to_probabilities(self.teacher_logits(x, noise))

    @torch.no_grad()
    def teacher_outputs(self, x: torch.Tensor, noise: bool = True) -> Dict[str, torch.Tensor]:
        """One teacher pass returning ``'seg'`` (full-resolution logits), ``'features'`` and ``'skips'``."""
        return self.teacher.forward_with_features(self.noisy(x) if noise else x)

    def row_slice(self, context: StepContext) -> slice:
        return slice(0, None) if self.rows == 'all' else context.unlabeled

    def teacher_pass(self, context: StepContext) -> Dict[str, torch.Tensor]:
        """The step's one teacher pass on the noisy :meth:`row_slice` rows: ``'seg'`` (full-resolution logits),
        ``'probabilities'`` (float32) and, with ``teacher_features``, ``'features'`` / ``'skips'``. Cached in
        ``context.cache`` under this component's :attr:`cache_key`: the consistency, pseudo-labels and feature
        targets of one step see the same teacher prediction of the same noisy input, and two teacher components of
        one trainer never share (or overwrite) each other's pass."""
        key = self.cache_key
        if key not in context.cache:
            x = context.x[self.row_slice(context)]
            out = dict(self.teacher_outputs(x)) if self.teacher_features else {'seg': self.teacher_logits(x)}
            out['probabilities'] = context.to_probabilities(out['seg'])
            context.cache[key] = out
        return context.cache[key]

    @property
    def cache_key(self) -> str:
        # One entry per component instance (its state_key is unique within a trainer, see composed.py)
        return f'teacher_pass:{self.state_key}:{id(self)}'

    # --- loss ---------------------------------------------------------------------------------------------------
    def consistency(self, student_probabilities: torch.Tensor, teacher_probabilities: torch.Tensor) -> torch.Tensor:
        return probability_mse(student_probabilities, teacher_probabilities)

    def loss(self, context: StepContext) -> torch.Tensor:
        """L_cons on the :meth:`row_slice` rows against the step's (shared) teacher pass."""
        student_probabilities = context.to_probabilities(context.logits[self.row_slice(context)])
        return self.consistency(student_probabilities, self.teacher_pass(context)['probabilities'])

    # --- state --------------------------------------------------------------------------------------------------
    def after_optimizer_step(self, student: nn.Module, step: int) -> None:
        ema_update(self.teacher, student, step, self.ema_decay)

    def to(self, device: torch.device) -> 'MeanTeacherConsistency':
        self.teacher.to(device)
        return self

    def state_dict(self) -> dict:
        return self.teacher.state_dict()

    def load_state_dict(self, state: Optional[dict], student: Optional[nn.Module] = None) -> None:
        if state is not None:
            self.teacher.load_state_dict(state)
        elif student is not None:
            # e.g. starting from a plain nnU-Net checkpoint: the teacher starts as the student.
            self.teacher.load_state_dict(student.state_dict())
