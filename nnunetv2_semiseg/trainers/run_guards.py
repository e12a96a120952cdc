"""Guards against a training run that silently diverges: non-finite losses and non-finite checkpoints.

A NaN or Inf loss for one step is tolerated: under AMP nnU-Net's GradScaler skips steps whose gradients overflow
and lowers the scale, so an isolated inf step is part of normal mixed-precision training. More than
``max_consecutive`` non-finite steps in a row means the run has diverged (weights or inputs are non-finite), and
the guard stops training with an error naming the term, the epoch and the likely causes.
"""
import os
from typing import Dict, List, Mapping, Optional

import numpy as np
import torch

MAX_NON_FINITE_STEPS_ENV = 'nnUNet_semiseg_max_nonfinite_steps'
# A few skipped AMP steps in a row happen while the GradScaler lowers its initial scale (2**16); five in a row of
# a non-finite *loss* (not only gradients) does not happen in a healthy run.
DEFAULT_MAX_NON_FINITE_STEPS = 5


class NonFiniteTrainingError(RuntimeError):
    """Training diverged: the loss or a logged term stayed NaN/Inf for several steps."""


def max_non_finite_steps_from_env() -> int:
    value = os.environ.get(MAX_NON_FINITE_STEPS_ENV)
    if value is None or value == '':
        return DEFAULT_MAX_NON_FINITE_STEPS
    try:
        parsed = int(value)
    except ValueError:
        parsed = -1
    if parsed < 0:
        raise ValueError(f'{MAX_NON_FINITE_STEPS_ENV}={value!r} must be an integer >= 0 (number of consecutive '
                         f'non-finite steps tolerated).')
    return parsed


def non_finite_terms(values: Mapping[str, object]) -> List[str]:
    """Names of the values (scalars or arrays) that hold a NaN or Inf, in the given order."""
    return [name for name, value in values.items() if not np.all(np.isfinite(np.asarray(value, dtype=np.float64)))]


class NonFiniteLossGuard:
    """Counts consecutive steps with a non-finite loss or term; raises once there are more than ``max_consecutive``."""

    def __init__(self, max_consecutive: Optional[int] = None, trainer_name: str = 'trainer'):
        self.max_consecutive = max_non_finite_steps_from_env() if max_consecutive is None else max_consecutive
        self.trainer_name = trainer_name
        self.consecutive = 0

    def check_step(self, values: Mapping[str, object], epoch: int, uses_amp: bool = False) -> List[str]:
        """Record one step's logged values. Returns the non-finite names (empty for a healthy step)."""
        bad = non_finite_terms(values)
        if not bad:
            self.consecutive = 0
            return bad
        self.consecutive += 1
        if self.consecutive > self.max_consecutive:
            shown = {n: float(np.asarray(values[n], dtype=np.float64).ravel()[0]) for n in bad}
            amp = ('AMP overflow (the GradScaler skips such steps, but not for this long)' if uses_amp
                   else 'AMP is off, so not a mixed-precision overflow')
            raise NonFiniteTrainingError(
                f'{self.trainer_name}: training diverged in epoch {epoch}: '
                f'{", ".join(f"{n}={v}" for n, v in shown.items())} for {self.consecutive} consecutive steps. '
                f'Likely causes: non-finite (NaN/Inf) voxels in the input images (check imagesTr and '
                f'imagesUnlabeled; .mha/.nrrd keep NaN), a learning rate too high for this method, or {amp}. '
                f'The last finite checkpoint is kept; no checkpoint with non-finite weights is written. '
                f'Tolerated consecutive non-finite steps: {self.max_consecutive} ({MAX_NON_FINITE_STEPS_ENV}).')
        return bad


def non_finite_tensors(state_dict: Dict[str, torch.Tensor]) -> List[str]:
    """Keys of floating-point tensors holding a NaN or Inf."""
    return [k for k, v in state_dict.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def describe_non_finite_weights(bad: List[str], total: int) -> str:
    shown = ', '.join(bad[:3]) + (', ...' if len(bad) > 3 else '')
    return f'{len(bad)} of {total} weight tensors are non-finite ({shown})'



ALLOW_CROSS_TRAINER_RESUME_ENV = 'nnUNet_semiseg_allow_cross_trainer_resume'


class CrossTrainerResumeError(RuntimeError):
    """``--c`` found a checkpoint written by another semi-supervised trainer."""


def check_resume_trainer(checkpoint: dict, trainer_name: str, source: str = 'the checkpoint') -> None:
    """Refuse to continue another semi-supervised trainer's checkpoint (its extra state means something else).

    Checkpoints without our ``semiseg`` state (plain nnU-Net trainers) stay allowed: they are the usual warm start.
    ``nnUNet_semiseg_allow_cross_trainer_resume=1`` accepts a mismatch on purpose.
    """
    saved = checkpoint.get('trainer_name')
    if checkpoint.get('semiseg') is None or saved is None or saved == trainer_name:
        return
    if os.environ.get(ALLOW_CROSS_TRAINER_RESUME_ENV, '') == '1':
        return
    raise CrossTrainerResumeError(
        f'{source} was written by {saved}, not by {trainer_name}: continuing it (--c) would reinterpret '
        f'{saved}\'s state as {trainer_name}\'s and re-save it under the wrong name. Train {trainer_name} in its own '
        f'output folder (without --c), continue with -tr {saved}, or set {ALLOW_CROSS_TRAINER_RESUME_ENV}=1 if you '
        f'really want to continue this checkpoint with {trainer_name}.')
