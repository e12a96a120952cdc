"""``nnUNetTrainerFLPM``: SFPC (feature-level perturbation + entropy-weighted feature-perturbed consistency +
reconstruction decoder; BIBM 2023, ``shared/papers/sfpc_feature_perturbed_consistency.md``) as an nnU-Net v2 trainer.

Loss (SFPC Eq. 6):

    L = L_sup(labeled rows)                         nnU-Net's deep-supervised DC+CE (the paper: "e.g. CE")
        + lambda_1(t) * L_u(unlabeled rows)         FLPM consistency over M = 4 perturbations, entropy weighted
        + lambda_2 * L_r(all rows)                  reconstruction decoder, MSE to the input patch
    lambda_1(t) = 0.1 * exp(-5 (1 - t)^2),  lambda_2 = 0.5,   t = fraction of training done

L_u is :class:`~nnunetv2_semiseg.trainers.flpm_components.FeaturePerturbedConsistency`, L_r
:class:`~nnunetv2_semiseg.trainers.flpm_components.Reconstruction`; the reconstruction decoder is ``network.heads``
(stock ``nnUNetv2_predict`` rebuilds and loads it strictly but never calls it; the plain export drops it). Defaults,
sources and choices: ``docs/flpm.md``.

Usage: ``nnUNetv2_train DatasetXXX 3d_fullres 0 -tr nnUNetTrainerFLPM`` (after
``nnUNetv2_semiseg_preprocess_unlabeled``), then stock ``nnUNetv2_predict -tr nnUNetTrainerFLPM``.
"""
from typing import Dict, List

from torch import nn

from nnunetv2_semiseg.networks.reconstruction_decoder import ReconstructionDecoder
from nnunetv2_semiseg.trainers.components import LossComponent
from nnunetv2_semiseg.trainers.composed import nnUNetTrainerComposed
from nnunetv2_semiseg.trainers.flpm_components import FeaturePerturbedConsistency, Reconstruction


class nnUNetTrainerFLPM(nnUNetTrainerComposed):
    # --- FLPM + feature-perturbed consistency (L_u) ---
    num_perturbations = 4                 # M
    perturbation_tau = 0.1                # eps ~ U[-tau, tau]
    consistency_norm = 2                  # L_p norm of p_m - p_bar (the paper allows 1 or 2)
    entropy_weighted = True               # w_m = exp(-H(p_m)); False = the ablation's plain consistency
    consistency_weight = 0.1              # omega_max of lambda_1(t)
    consistency_ramp_length = 1.0         # lambda_1 ramps over the whole run (t / t_max)
    perturbation_placement = 'penultimate'  # 'features': the last decoder feature, no norm follows (_noNormAfter)
    # --- reconstruction (L_r) ---
    use_reconstruction = True
    reconstruction_weight = 0.5           # lambda_2
    # One conv block per reconstruction stage (the segmentation decoder has two): SFPC gives G_2 no shape beyond "two
    # slightly different decoders" / "reconstruction head", and the decoder's shape would cost 1.96x the
    # twice-the-batch supervised step in FLOPs, above the 1.75x bound (docs/flpm.md "Cost"). None = the segmentation
    # decoder's shape (_fullRec).
    reconstruction_convs_per_stage = 1

    loss_term_names = ('sup', 'fpc', 'rec')
    # The training call passes a closure through the network (train_fn): torch.compile would re-trace every step.
    allow_torch_compile = False

    @classmethod
    def build_component_heads(cls, base_network: nn.Module, num_output_channels: int) -> Dict[str, nn.Module]:
        if not cls.use_reconstruction:
            return {}
        return {Reconstruction.heads_key: ReconstructionDecoder(base_network, cls.reconstruction_convs_per_stage)}

    def build_loss_components(self) -> List[LossComponent]:
        components: List[LossComponent] = [FeaturePerturbedConsistency(
            self.num_perturbations, self.perturbation_tau, self.consistency_norm, self.entropy_weighted,
            weight=self.consistency_weight, ramp_length=self.consistency_ramp_length,
            placement=self.perturbation_placement)]
        if self.use_reconstruction:
            components.append(Reconstruction(self.reconstruction_weight))
        return components


# ---------------------------------------------------------------------------------------------------------------
# Variants (SFPC table II ablation; one change each)
# ---------------------------------------------------------------------------------------------------------------
class nnUNetTrainerFLPM_noRec(nnUNetTrainerFLPM):
    """Table II "+FLPM +FPC" (no reconstruction decoder, no heads)."""
    use_reconstruction = False
    loss_term_names = ('sup', 'fpc')


class nnUNetTrainerFLPM_noFPC(nnUNetTrainerFLPM):
    """Table II "+Rec +FLPM": consistency over the M perturbations without the entropy weights (w_m = 1)."""
    entropy_weighted = False


class nnUNetTrainerFLPM_L1(nnUNetTrainerFLPM):
    """L1 instead of L2 norm of p_m - p_bar in the consistency."""
    consistency_norm = 1


class nnUNetTrainerFLPM_fullRec(nnUNetTrainerFLPM):
    """A reconstruction decoder of the segmentation decoder's shape (as many conv blocks per stage) instead of the
    default's one block per stage: 1.96x instead of 1.73x the twice-the-batch step in FLOPs (docs/flpm.md "Cost")."""
    reconstruction_convs_per_stage = None


class nnUNetTrainerFLPM_noNormAfter(nnUNetTrainerFLPM):
    """The perturbation on the last decoder feature (the input of the 1x1 segmentation layer) instead of the input
    of the last decoder block: no InstanceNorm follows, so both the mean and the std shift of SFPC Eq. 3 reach the
    logits (docs/flpm.md "Where the perturbation acts")."""
    perturbation_placement = 'features'
