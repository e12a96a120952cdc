"""SFPC's losses (BIBM 2023, ``shared/papers/sfpc_feature_perturbed_consistency.md`` Eq. 4-6; methods.md §4.3).

Feature-perturbed consistency, per unlabeled voxel k with the M perturbed probability vectors p_m and their mean
p_bar (Eq. 5):

    g_k = (1/M) * sum_m w_m ||p_m - p_bar||_p / sum_m w_m,      w_m = exp(-H(p_m))      (weights detached)
    L_u = mean over unlabeled samples and voxels of g_k                                  (Eq. 4)

H is the Shannon entropy (natural log). For softmax outputs it is summed over classes; for region (sigmoid) outputs
every channel is a Bernoulli variable and H is the sum of the per-region binary entropies. ``p = 2`` (default) or
``1``. The paper's extra 1/M is kept (it only rescales lambda_1). Without entropy weighting (the ablation's "+FLPM
without FPC") w_m = 1, i.e. g_k = (1/M^2) sum_m ||p_m - p_bar||.

Reconstruction (Eq. 6's L_r): mean squared error between the reconstruction decoder's output and the input patch.
"""
import torch

LOG_EPS = 1e-8


def prediction_entropy(probabilities: torch.Tensor, regions: bool = False) -> torch.Tensor:
    """Shannon entropy per voxel over the channel axis 1: -sum_c p_c log p_c (softmax) or
    -sum_r [p_r log p_r + (1 - p_r) log(1 - p_r)] (regions). Probabilities are clamped to [1e-8, 1] in the log."""
    p = probabilities.float()
    h = -(p * p.clamp_min(LOG_EPS).log())
    if regions:
        q = 1.0 - p
        h = h - q * q.clamp_min(LOG_EPS).log()
    return h.sum(1)


def feature_perturbed_consistency(probabilities: torch.Tensor, norm: int = 2, entropy_weighted: bool = True,
                                  regions: bool = False) -> torch.Tensor:
    """L_u of Eq. 4-5 for ``probabilities`` of shape (M, B, C, *spatial) (M perturbations of B unlabeled rows).

    Gradient flows through every p_m and through p_bar; the entropy weights are constants."""
    if norm not in (1, 2):
        raise ValueError(f'norm must be 1 or 2, got {norm!r}')
    p = probabilities.float()
    m = p.shape[0]
    distance = torch.linalg.vector_norm(p - p.mean(0, keepdim=True), ord=norm, dim=2)     # (M, B, *spatial)
    if entropy_weighted:
        weights = torch.exp(-prediction_entropy(p.detach().flatten(0, 1), regions)).view(distance.shape)
    else:
        weights = torch.ones_like(distance)
    g = (weights * distance).sum(0) / weights.sum(0) / m
    return g.mean()


def reconstruction_loss(reconstruction: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L_r = mean over all elements of (G_2(E(x)) - x)^2, in float32; ``x`` is a constant target."""
    return (reconstruction.float() - x.detach().float()).pow(2).mean()
