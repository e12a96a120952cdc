"""``nnUNetTrainerBCPFLPM``: BCP's bidirectional copy-paste plus SFPC's feature-perturbed consistency, a
combination neither paper trained.

BCP perturbs a step only at the input (the copy-paste mixing); SFPC's FLPM perturbs the features inside the decoder
and asks the predictions of the perturbed copies to agree. The composition keeps BCP unchanged and adds SFPC's
L_u on the rows the student already runs on (docs/bcp.md, "Composition with feature-perturbed consistency"):

    pre-training   (t < pretrain_fraction):   L = L_mix                                     (BCP, unchanged)
    self-training  (t >= pretrain_fraction):  L = L_in + L_out + lambda_1(t) * L_u(x_in, x_out)
    lambda_1(t) = 0.1 * exp(-5 (1 - t)^2),    t = fraction of the whole run done (SFPC's weight and ramp)

L_u is :class:`~nnunetv2_semiseg.trainers.flpm_components.FeaturePerturbedConsistency` (M = 4 perturbations of
the penultimate decoder feature, entropy-weighted consistency) on ALL 2B mixed rows of the self-training step
(inward and outward), read from the same student forward pass as L_in and L_out. No reconstruction decoder (SFPC's
L_r is a second idea; this trainer adds one). Usage: ``nnUNetv2_train DatasetXXX 3d_fullres 0 -tr
nnUNetTrainerBCPFLPM`` (after ``nnUNetv2_semiseg_preprocess_unlabeled``), stock ``nnUNetv2_predict -tr
nnUNetTrainerBCPFLPM``.
"""
from typing import Dict, List, Tuple

import torch
from torch import nn

from nnunetv2_semiseg.trainers.bcp import nnUNetTrainerBCP
from nnunetv2_semiseg.trainers.bcp_components import MixedPatches
from nnunetv2_semiseg.trainers.components import StepContext
from nnunetv2_semiseg.trainers.flpm_components import FeaturePerturbedConsistency
from nnunetv2_semiseg.trainers.semi_supervised import describe_ramp


class nnUNetTrainerBCPFLPM(nnUNetTrainerBCP):
    # --- SFPC's L_u, its paper defaults (nnUNetTrainerFLPM's) ---
    num_perturbations = 4                 # M
    perturbation_tau = 0.1                # eps ~ U[-tau, tau]
    consistency_norm = 2
    entropy_weighted = True
    consistency_weight = 0.1              # omega_max of lambda_1(t)
    consistency_ramp_length = 1.0         # lambda_1 ramps over the whole run, not from the phase switch
    perturbation_placement = 'penultimate'

    loss_term_names = ('pretrain', 'inward', 'outward', 'fpc')
    # The self-training call passes a closure through the network (train_fn): torch.compile would re-trace it.
    allow_torch_compile = False

    def initialize(self):
        super().initialize()
        self.feature_consistency = FeaturePerturbedConsistency(
            self.num_perturbations, self.perturbation_tau, self.consistency_norm, self.entropy_weighted,
            weight=self.consistency_weight, ramp_length=self.consistency_ramp_length,
            placement=self.perturbation_placement)

    def current_term_weights(self) -> Dict[str, float]:
        weights = super().current_term_weights()
        fraction = self.epoch_last_step() / max(1, self.total_iterations())
        weights['fpc'] = 0.0 if weights['pretrain'] else self.feature_consistency.weight_at(fraction)
        return weights

    def term_weight_lines(self) -> List[str]:
        return super().term_weight_lines() + [
            f'Loss term fpc: SFPC\'s feature-perturbed consistency on all mixed rows of the self-training steps, '
            f'weight {self.consistency_weight:g}, {describe_ramp(self.feature_consistency, self.total_iterations())}'
            f'; off in pre-training.']

    def mixed_patch_terms(self, patches: MixedPatches, self_training: bool) -> Tuple[Dict[str, torch.Tensor],
                                                                                       torch.Tensor]:
        if not self_training:
            # Pre-training mixes labeled patches only: SFPC's L_u is a term on unlabeled data, so it is off here
            # (its ramp would give it weight <= 0.002 before the default switch anyway).
            return super().mixed_patch_terms(patches, self_training)
        # One call through the (possibly DDP-wrapped) network: the FLPM re-runs the last decoder block on the
        # perturbed features inside the same call as the student pass it reads.
        out = self.network(patches.x, train_fn=lambda net, x: self._self_training_terms(net, x, patches))
        return out['terms'], out['loss']

    def _self_training_terms(self, net: nn.Module, x: torch.Tensor, patches: MixedPatches) -> dict:
        out = net.forward_with_features(x)
        terms = self.copy_paste.direction_losses(out['seg'], patches)
        bcp_loss = sum(terms.values())
        # num_labeled = 0: every mixed row is an "unlabeled" row of the FLPM (its batch spread and L_u cover all
        # 2B rows); no component here reads targets from the context.
        context = StepContext(net=net, x=x, num_labeled=0, target=None, out=out, fraction=self.training_fraction(),
                              to_probabilities=self.rows_to_probabilities, to_hard_labels=self.rows_to_hard_labels,
                              has_regions=self.label_manager.has_regions, step=self.global_iteration)
        terms['fpc'] = self.feature_consistency.loss(context)
        weight = self.feature_consistency.weight_at(context.fraction)
        return {'terms': terms, 'loss': bcp_loss + weight * terms['fpc']}
