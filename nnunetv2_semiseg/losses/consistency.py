"""Mean Teacher consistency: squared difference between student and teacher probabilities."""
import torch


def probability_mse(student_probabilities: torch.Tensor, teacher_probabilities: torch.Tensor) -> torch.Tensor:
    """L_cons = mean over batch, channels and voxels of (p_student - sg(p_teacher))^2.

    Source: Tarvainen & Valpola 2017 (Mean Teacher), SSL4MIS ``softmax_mse_loss`` averaged over all elements.
    The teacher side is detached: the teacher only changes through the EMA update. Computed in float32.
    """
    return torch.mean((student_probabilities.float() - teacher_probabilities.detach().float()) ** 2)


def clipped_gaussian_noise(x: torch.Tensor, std: float, clip: float) -> torch.Tensor:
    """clamp(N(0, std^2), -clip, clip) with the shape of x (SSL4MIS teacher input noise; 0.1 / 0.2)."""
    return torch.clamp(torch.randn_like(x) * std, -clip, clip)
