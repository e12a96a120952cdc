"""Feature-Level Perturbation Module (FLPM) of SFPC (BIBM 2023, ``shared/papers/sfpc_feature_perturbed_consistency.md``
§II-B, Eq. 1-3; methods.md §4.2).

For the unlabeled rows' feature map f (B, C, *spatial) at the segmentation decoder's second-last convolution:

    m_jc, s_jc  = spatial mean and std of f_jc                       (per sample j and channel c)
    dmu_c, ds_c = std over the unlabeled mini-batch of m_jc and s_jc
    f_hat       = (f_jc - m_jc) / s_jc
    out         = (s_jc + eps * ds_c) * f_hat + (m_jc + eps * dmu_c),    eps ~ U[-tau, tau]

``eps`` is drawn once per perturbation and shared by all channels (the paper) and by all samples of the batch (as
the first author's released W2S ``FeaturePerturbation`` does). The statistics are detached (W2S does the same;
methods.md §4.2 recommends it): gradient flows through f_hat only, so the perturbation cannot be "learned away" by
moving the statistics. ``M`` perturbations come out as one batch of M * B rows, perturbation-major, so the layers
after the perturbation point run once on all of them. The module has no parameters and is only used in training;
inference runs the plain U-Net.
"""
from typing import Optional, Tuple

import torch
import torch.distributed as dist

STD_EPS = 1e-6  # inside the square root of the spatial variance (W2S uses the same value)


def instance_statistics(features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Detached float32 spatial mean and std per sample and channel, each (B, C); std = sqrt(var + 1e-6),
    var the population variance over all spatial positions."""
    flat = features.detach().float().flatten(2)
    return flat.mean(2), (flat.var(2, unbiased=False) + STD_EPS).sqrt()


def gather_across_ranks(rows: torch.Tensor) -> torch.Tensor:
    """The rows of every rank concatenated (detached; ranks may hold different numbers of rows). Without an
    initialised process group: ``rows`` itself."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    world = dist.get_world_size()
    count = torch.tensor([rows.shape[0]], device=rows.device, dtype=torch.long)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    most = int(max(int(c) for c in counts))
    padded = rows.new_zeros((most, *rows.shape[1:]))
    padded[:rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([g[:int(c)] for g, c in zip(gathered, counts)])


def batch_spread(statistic: torch.Tensor) -> torch.Tensor:
    """Std over the (global, under DDP) unlabeled mini-batch of a (B, C) statistic -> (C,), unbiased.

    One sample has no batch spread: the result is 0 (the perturbation of that step is the identity and L_u is 0;
    see docs/flpm.md). Under DDP the statistics of all ranks are gathered first, so one unlabeled sample per GPU
    still gets the spread of the global batch."""
    rows = gather_across_ranks(statistic.detach())
    if rows.shape[0] < 2:
        return torch.zeros_like(statistic[0])
    return rows.std(0, unbiased=True)


def perturb_features(features: torch.Tensor, epsilons: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                     mean_spread: torch.Tensor, std_spread: torch.Tensor) -> torch.Tensor:
    """Eq. 1-3 for every epsilon: (M * B, C, *spatial), row m * B + j = perturbation m of sample j.

    ``features`` (B, C, *spatial); ``epsilons`` (M,); ``mean``/``std`` (B, C); ``*_spread`` (C,). Computed in
    float32 and returned in the dtype of ``features``."""
    b, c = features.shape[:2]
    extra = (1,) * (features.dim() - 2)
    f = features.float()
    normalised = (f - mean.view(b, c, *extra)) / std.view(b, c, *extra)
    eps = epsilons.float().view(-1, 1, 1)                                   # (M, 1, 1)
    gamma = std.unsqueeze(0) + eps * std_spread.view(1, 1, c)               # (M, B, C)
    beta = mean.unsqueeze(0) + eps * mean_spread.view(1, 1, c)
    out = gamma.view(*gamma.shape, *extra) * normalised.unsqueeze(0) + beta.view(*beta.shape, *extra)
    return out.reshape(-1, *features.shape[1:]).to(features.dtype)


class FeatureLevelPerturbation:
    """Draws ``num_perturbations`` epsilons ~ U[-tau, tau] and applies :func:`perturb_features` to a batch of
    unlabeled rows. ``generator`` (optional, CPU) makes the draws reproducible in tests."""

    def __init__(self, num_perturbations: int = 4, tau: float = 0.1):
        if num_perturbations < 2:
            raise ValueError(f'FLPM needs at least 2 perturbations to measure consistency, got {num_perturbations}')
        self.num_perturbations, self.tau = int(num_perturbations), float(tau)
        self.generator: Optional[torch.Generator] = None

    def draw_epsilons(self, device: torch.device) -> torch.Tensor:
        u = torch.rand(self.num_perturbations, generator=self.generator,
                       device='cpu' if self.generator is not None else device)
        return ((2.0 * u - 1.0) * self.tau).to(device)

    def __call__(self, features: torch.Tensor, epsilons: Optional[torch.Tensor] = None) -> torch.Tensor:
        if epsilons is None:
            epsilons = self.draw_epsilons(features.device)
        mean, std = instance_statistics(features)
        return perturb_features(features, epsilons, mean, std, batch_spread(mean), batch_spread(std))
