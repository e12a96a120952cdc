"""Exponential moving average (EMA) teacher, as in Mean Teacher (Tarvainen & Valpola 2017)."""
import copy

import torch
from torch import nn


def create_ema_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of the (unwrapped) student, in eval mode, that only changes through :func:`ema_update`."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.eval()
    return teacher


def ema_decay_at_step(step: int, decay: float) -> float:
    """alpha = min(1 - 1/(step + 1), decay): the warm start of SSL4MIS ``update_ema_variables``.

    ``step`` counts optimizer steps done (1 after the first step), so early teachers follow the student closely
    (alpha = 0.5 after the first step) instead of averaging in the random initialisation for ~100 steps.
    """
    return min(1.0 - 1.0 / (step + 1), decay)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, step: int, decay: float) -> float:
    """theta_t <- alpha * theta_t + (1 - alpha) * theta_s for parameters; buffers are copied. Returns alpha."""
    alpha = ema_decay_at_step(step, decay)
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(alpha).add_(s.detach(), alpha=1.0 - alpha)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)
    return alpha
