"""SFPC's two unsupervised components (methods.md §4; docs/flpm.md).

* :class:`FeaturePerturbedConsistency` - FLPM on the unlabeled rows + entropy-weighted consistency L_u,
  weight lambda_1(t) = 0.1 * exp(-5 (1 - t)^2) over the whole run.
* :class:`Reconstruction` - reconstruction decoder G_2 on the shared encoder's skips, MSE to the input on all rows,
  weight lambda_2 = 0.5.

Both read the step's one shared forward pass (``StepContext``): the FLPM consumes ``out['penultimate']`` (the
feature between the last decoder stage's two convolution blocks) and re-runs only the last block and the
full-resolution segmentation layer on the M perturbed copies; the reconstruction consumes ``out['skips']``.
"""
import warnings

import torch

from nnunetv2_semiseg.losses.flpm_consistency import feature_perturbed_consistency, reconstruction_loss
from nnunetv2_semiseg.networks.flpm import FeatureLevelPerturbation
from nnunetv2_semiseg.trainers.components import LossComponent, StepContext
from nnunetv2_semiseg.trainers.ramps import sigmoid_rampup


class FeaturePerturbedConsistency(LossComponent):
    """L_u (SFPC Eq. 4-5) over ``num_perturbations`` FLPM perturbations of the unlabeled rows."""
    name = 'fpc'

    PLACEMENTS = ('penultimate', 'features')

    def __init__(self, num_perturbations: int = 4, tau: float = 0.1, norm: int = 2, entropy_weighted: bool = True,
                 weight: float = 0.1, ramp_length: float = 1.0, placement: str = 'penultimate'):
        # 'penultimate': input of the last decoder block (SFPC's second-last conv layer); that block's
        # conv -> InstanceNorm removes the mean shift of Eq. 3 inside the volume. 'features': the last decoder
        # feature, input of the 1x1 segmentation layer, where no normalisation follows (docs/flpm.md).
        if placement not in self.PLACEMENTS:
            raise ValueError(f'placement must be one of {self.PLACEMENTS}, got {placement!r}')
        self.placement = placement
        self.perturbation = FeatureLevelPerturbation(num_perturbations, tau)
        self.norm, self.entropy_weighted = int(norm), bool(entropy_weighted)
        self.weight, self.ramp_length = float(weight), float(ramp_length)
        self._warned_single_sample = False

    def ramp(self, fraction: float) -> float:
        # SFPC's lambda_1(t) = w_max * exp(-5 (1 - t / t_max)^2): the sigmoid ramp over the whole schedule
        return sigmoid_rampup(fraction, self.ramp_length)

    def perturbed_probabilities(self, context: StepContext) -> torch.Tensor:
        """(M, B_u, C, *spatial) probabilities of the M perturbed copies of the unlabeled rows."""
        if self.placement == 'features':
            unlabeled = context.out['features'][context.unlabeled]
            logits = context.net.decoder.seg_layers[-1](self.perturbation(unlabeled))
            probabilities = context.to_probabilities(logits)
            return probabilities.view(self.perturbation.num_perturbations, unlabeled.shape[0],
                                      *probabilities.shape[1:])
        penultimate = context.out.get('penultimate')
        if penultimate is None:
            raise RuntimeError('FLPM perturbs the input of the last decoder stage\'s last convolution block, but this '
                               'network\'s decoder has no StackedConvBlocks stages (a custom architecture) or the '
                               'trainer\'s student_forward does not return out[\'penultimate\']. Use an nnU-Net '
                               'PlainConvUNet / ResidualEncoderUNet configuration.')
        unlabeled = penultimate[context.unlabeled]
        if unlabeled.shape[0] < 2 and not self._warned_single_sample and not torch.distributed.is_initialized():
            warnings.warn('FLPM: one unlabeled sample per step has no batch spread of its feature statistics, so the '
                          'perturbation is the identity and L_u is 0; set unlabeled_batch_size >= 2.')
            self._warned_single_sample = True
        logits = context.net.last_stage_head(self.perturbation(unlabeled))
        probabilities = context.to_probabilities(logits)
        return probabilities.view(self.perturbation.num_perturbations, unlabeled.shape[0], *probabilities.shape[1:])

    def loss(self, context: StepContext) -> torch.Tensor:
        return feature_perturbed_consistency(self.perturbed_probabilities(context), self.norm,
                                             self.entropy_weighted, context.has_regions)


class Reconstruction(LossComponent):
    """L_r: MSE between the reconstruction decoder's output on the encoder skips and the (normalised) input patch,
    on labeled and unlabeled rows. The decoder is the network's heads entry ``heads_key``."""
    name = 'rec'
    heads_key = 'reconstruction'

    def __init__(self, weight: float = 0.5):
        self.weight = float(weight)

    def loss(self, context: StepContext) -> torch.Tensor:
        decoder = context.heads_for(self.heads_key)
        return reconstruction_loss(decoder(context.out['skips']), context.x)
