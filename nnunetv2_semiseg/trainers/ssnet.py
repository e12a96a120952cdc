"""``nnUNetTrainerSSNet``: SS-Net (Wu et al., MICCAI 2022) as an nnU-Net v2 trainer.

Loss (paper Eq. 5 with the released code's weights, methods.md §2.2):

    L = L_sup(labeled rows)                                      nnU-Net's deep-supervised DC+CE
        + w(t) * ( lds_weight * L_lds(all rows)                  Dice-VAT smoothness, full-resolution output
                 + cs_weight * (L_cs(labeled rows, ground truth) + L_cs(unlabeled rows, argmax prediction)) )
    w(t) = unsupervised_weight * sigmoid_rampup(t, rampup_length),   t = fraction of training done

with lds_weight = 1, cs_weight = 0.1, unsupervised_weight = 1 and rampup_length = 0.4 (LA: full weight at iteration
6000 of 15000). The two terms are the components ``DiceVATSmoothness`` (weight unsupervised_weight * lds_weight) and
``PrototypeSeparation`` (weight unsupervised_weight * cs_weight), both with the sigmoid ramp, composed by
``nnUNetTrainerComposed`` over one shared forward pass. The projector/predictor/selectors live in
``network.heads`` (see ``networks/ssnet_heads.py``); the prototype memory belongs to ``PrototypeSeparation`` and is
saved under ``checkpoint['semiseg']['ssnet_prototype_memory']``. Defaults and every deviation
from the paper are documented in ``docs/ssnet.md``.

Usage: ``nnUNetv2_train DatasetXXX 3d_fullres 0 -tr nnUNetTrainerSSNet`` (needs
``nnUNetv2_semiseg_preprocess_unlabeled`` first), then stock ``nnUNetv2_predict -tr nnUNetTrainerSSNet``.
"""
from typing import Dict, List

from torch import nn

from nnunetv2_semiseg.networks.ssnet_heads import SSNetHeads
from nnunetv2_semiseg.trainers.components import LossComponent
from nnunetv2_semiseg.trainers.composed import nnUNetTrainerComposed
from nnunetv2_semiseg.trainers.ramps import sigmoid_rampup
from nnunetv2_semiseg.trainers.ssnet_components import (LA_EPSILON_RMS, LA_XI_RMS, DiceVATSmoothness,
                                                        PrototypeSeparation)
from nnunetv2_semiseg.trainers.ssnet_components import has_active_dropout  # noqa: F401  (moved there; old import)


class nnUNetTrainerSSNet(nnUNetTrainerComposed):
    # --- pixel-level smoothness (L_lds) ---
    use_lds = True
    lds_discrepancy = 'dice'                    # 'dice' (SS-Net) or 'kl' (classic VAT, ablation)
    # Perturbation sizes as per-element RMS, matching the paper's LA setting (epsilon = xi = 10 as an L2 norm over
    # a 112x112x80 z-scored crop -> 0.00998); the per-sample L2 norm is rms * sqrt(C * prod(patch)).
    lds_epsilon_rms = LA_EPSILON_RMS
    lds_xi_rms = LA_XI_RMS
    lds_weight = 1.0
    # --- inter-class separation (L_cs) ---
    use_cs = True
    num_prototypes = 32
    prototype_dim = 32
    prototype_keep = 'highest'                  # the paper; 'lowest' = the released code
    cs_max_voxels_per_class = 16384             # per class and row group (labeled / unlabeled); None = all voxels
    cs_weight = 0.1
    # --- schedule ---
    unsupervised_weight = 1.0
    rampup_length = 0.4                         # fraction of training (LA: 6000 / 15000 iterations)

    # lds_nonfinite: samples per step whose VAT probe gradient stayed non-finite (random direction used instead)
    loss_term_names = ('sup', 'lds', 'cs', 'lds_nonfinite')
    # The training call passes a fresh closure through the network and runs autograd.grad, top-k and
    # data-dependent indexing inside it: torch.compile would trace it anew every step.
    allow_torch_compile = False

    @classmethod
    def build_component_heads(cls, base_network: nn.Module, num_output_channels: int) -> Dict[str, nn.Module]:
        if not cls.use_cs:
            return {}
        return {PrototypeSeparation.heads_key: SSNetHeads(base_network.encoder.output_channels[0],
                                                          num_output_channels, embedding_dim=cls.prototype_dim,
                                                          hidden_dim=cls.prototype_dim)}

    def build_loss_components(self) -> List[LossComponent]:
        self.build_components()
        return self.loss_components

    def build_components(self) -> None:
        """The SS-Net components for this dataset's output layout (softmax classes or sigmoid regions):
        L = L_sup + w(t) * (lds_weight * L_lds + cs_weight * L_cs), w(t) = unsupervised_weight * ramp(t)."""
        regions = self.label_manager.has_regions
        self.smoothness = self.separation = None
        if self.use_lds:
            self.smoothness = DiceVATSmoothness(
                self.lds_epsilon_rms, self.lds_xi_rms, self.lds_discrepancy, regions,
                weight=self.unsupervised_weight * self.lds_weight, ramp_length=self.rampup_length)
        if self.use_cs:
            self.separation = PrototypeSeparation(
                self.label_manager.num_segmentation_heads, regions=regions,
                has_ignore_label=self.label_manager.has_ignore_label, num_prototypes=self.num_prototypes,
                embedding_dim=self.prototype_dim, keep=self.prototype_keep,
                max_voxels_per_class=self.cs_max_voxels_per_class,
                weight=self.unsupervised_weight * self.cs_weight, ramp_length=self.rampup_length)
        self.loss_components = [c for c in (self.smoothness, self.separation) if c is not None]

    def unsupervised_weight_now(self) -> float:
        return self.unsupervised_weight * sigmoid_rampup(self.training_fraction(), self.rampup_length)


# ---------------------------------------------------------------------------------------------------------------
# Variants (one change each; SS-Net's ablation table 3 and the released code's prototype selection)
# ---------------------------------------------------------------------------------------------------------------
class nnUNetTrainerSSNet_lowestScorePrototypes(nnUNetTrainerSSNet):
    """Keep the 32 lowest-scoring candidates, as the released code's ascending sort does."""
    prototype_keep = 'lowest'


class nnUNetTrainerSSNet_noLDS(nnUNetTrainerSSNet):
    """Ablation: supervised + inter-class separation only."""
    use_lds = False
    loss_term_names = ('sup', 'cs')


class nnUNetTrainerSSNet_noCS(nnUNetTrainerSSNet):
    """Ablation: supervised + Dice-VAT smoothness only (no heads are built)."""
    use_cs = False
    loss_term_names = ('sup', 'lds', 'lds_nonfinite')


class nnUNetTrainerSSNet_KL(nnUNetTrainerSSNet_noCS):
    """Ablation table 3, row "L_lds with KL": classic VAT (KL divergence as D) on top of the supervised loss, without
    L_cs, to be compared with nnUNetTrainerSSNet_noCS (Dice as D). Full SS-Net with KL-VAT is a subclass of
    nnUNetTrainerSSNet with ``lds_discrepancy = 'kl'``."""
    lds_discrepancy = 'kl'


class nnUNetTrainerSSNet_ACDC(nnUNetTrainerSSNet):
    """The released 2D (ACDC) script's schedule: consistency c = 0.1 ramped over the whole run (R = 200 "epochs" of
    150 iterations = all 30000 iterations). epsilon/xi keep the LA per-element RMS (see docs/ssnet.md: the ACDC
    values are given for [0, 1]-scaled slices, nnU-Net z-scores them)."""
    unsupervised_weight = 0.1
    rampup_length = 1.0
