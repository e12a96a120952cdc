"""``nnUNetTrainerSSNet``: SS-Net (Wu et al., MICCAI 2022) as an nnU-Net v2 trainer.

Loss (paper Eq. 5 with the released code's weights, methods.md §2.2):

    L = L_sup(labeled rows)                                      nnU-Net's deep-supervised DC+CE
        + w(t) * ( lds_weight * L_lds(all rows)                  Dice-VAT smoothness, full-resolution output
                 + cs_weight * (L_cs(labeled rows, ground truth) + L_cs(unlabeled rows, argmax prediction)) )
    w(t) = unsupervised_weight * sigmoid_rampup(t, rampup_length),   t = fraction of training done

with lds_weight = 1, cs_weight = 0.1, unsupervised_weight = 1 and rampup_length = 0.4 (LA: full weight at iteration
6000 of 15000). The projector/predictor/selectors live in ``network.heads`` (see ``networks/ssnet_heads.py``); the
prototype memory lives on the trainer and is saved under ``checkpoint['semiseg']``. Defaults and every deviation
from the paper are documented in ``docs/ssnet.md``.

Usage: ``nnUNetv2_train DatasetXXX 3d_fullres 0 -tr nnUNetTrainerSSNet`` (needs
``nnUNetv2_semiseg_preprocess_unlabeled`` first), then stock ``nnUNetv2_predict -tr nnUNetTrainerSSNet``.
"""
from typing import Dict, Optional

import torch
from torch import nn

from nnunetv2_semiseg.losses.dice_vat import PAPER_LA_EPSILON, PAPER_LA_PATCH_SIZE, PAPER_LA_XI, per_element_rms
from nnunetv2_semiseg.networks.ssnet_heads import SSNetHeads
from nnunetv2_semiseg.trainers.ramps import sigmoid_rampup
from nnunetv2_semiseg.trainers.semi_supervised import nnUNetTrainerSemiSupervised
from nnunetv2_semiseg.trainers.ssnet_components import DiceVATSmoothness, PrototypeSeparation, frozen_norm_statistics


def has_active_dropout(network: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 and m.training for m in network.modules())


class nnUNetTrainerSSNet(nnUNetTrainerSemiSupervised):
    # --- pixel-level smoothness (L_lds) ---
    use_lds = True
    lds_discrepancy = 'dice'                    # 'dice' (SS-Net) or 'kl' (classic VAT, ablation)
    # Perturbation sizes as per-element RMS, matching the paper's LA setting (epsilon = xi = 10 as an L2 norm over
    # a 112x112x80 z-scored crop -> 0.00998); the per-sample L2 norm is rms * sqrt(C * prod(patch)).
    lds_epsilon_rms = per_element_rms(PAPER_LA_EPSILON, PAPER_LA_PATCH_SIZE)
    lds_xi_rms = per_element_rms(PAPER_LA_XI, PAPER_LA_PATCH_SIZE)
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

    loss_term_names = ('sup', 'lds', 'cs')
    # The training call passes a fresh closure through the network and runs autograd.grad, top-k and
    # data-dependent indexing inside it: torch.compile would trace it anew every step.
    allow_torch_compile = False

    @classmethod
    def build_training_heads(cls, base_network: nn.Module, num_output_channels: int) -> Optional[nn.Module]:
        if not cls.use_cs:
            return None
        return SSNetHeads(base_network.encoder.output_channels[0], num_output_channels,
                          embedding_dim=cls.prototype_dim, hidden_dim=cls.prototype_dim)

    def initialize(self):
        super().initialize()
        self.build_components()

    def build_components(self) -> None:
        """The two SS-Net components for this dataset's output layout (softmax classes or sigmoid regions)."""
        regions = self.label_manager.has_regions
        self.smoothness = DiceVATSmoothness(self.lds_epsilon_rms, self.lds_xi_rms, self.lds_discrepancy, regions)
        self.separation = None
        if self.use_cs:
            self.separation = PrototypeSeparation(
                self.label_manager.num_segmentation_heads, regions=regions,
                has_ignore_label=self.label_manager.has_ignore_label, num_prototypes=self.num_prototypes,
                embedding_dim=self.prototype_dim, keep=self.prototype_keep,
                max_voxels_per_class=self.cs_max_voxels_per_class)
            self.separation.memory.to(self.device)

    def unsupervised_weight_now(self) -> float:
        return self.unsupervised_weight * sigmoid_rampup(self.training_fraction(), self.rampup_length)

    # ------------------------------------------------------------------------------------------------------------
    def compute_loss_terms(self, data, target, unlabeled) -> Dict[str, torch.Tensor]:
        num_labeled = data.shape[0]
        x = torch.cat((data, unlabeled['data']))
        # One call through the (DDP) network runs every pass that needs parameter gradients.
        return self.network(x, train_fn=lambda net, inp: self._ssnet_loss(net, inp, target, num_labeled))

    def _ssnet_loss(self, net: nn.Module, x: torch.Tensor, target, num_labeled: int) -> Dict[str, torch.Tensor]:
        out = net.forward_with_features(x)
        logits = self.full_resolution(out['seg'])
        terms = {'sup': self.supervised_loss(self.labeled_rows(out['seg'], num_labeled), target)}
        unsupervised = logits.new_zeros((), dtype=torch.float32)
        if self.use_lds:
            terms['lds'] = self.smoothness_loss(net, x, logits)
            unsupervised = unsupervised + self.lds_weight * terms['lds']
        if self.use_cs:
            terms['cs'] = self.separation_loss(net, out['features'], logits, target, num_labeled)
            unsupervised = unsupervised + self.cs_weight * terms['cs']
        terms['loss'] = terms['sup'] + self.unsupervised_weight_now() * unsupervised
        return terms

    def smoothness_loss(self, net: nn.Module, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """L_lds on all rows. The VAT target is the main pass's detached prediction when the network is
        deterministic (nnU-Net's default nets have no dropout), otherwise one extra no-grad pass as in the
        released code."""
        if has_active_dropout(net):
            with torch.no_grad(), frozen_norm_statistics(net):
                target_probabilities = self.rows_to_probabilities(self.full_resolution(net(x)))
        else:
            target_probabilities = self.rows_to_probabilities(logits.detach())

        def predict(inp: torch.Tensor) -> torch.Tensor:
            return self.rows_to_probabilities(self.full_resolution(net(inp)))

        with frozen_norm_statistics(net):
            return self.smoothness.loss(predict, x, target_probabilities)

    def separation_loss(self, net: nn.Module, features: torch.Tensor, logits: torch.Tensor, target,
                        num_labeled: int) -> torch.Tensor:
        """L_cs(labeled, ground truth) + L_cs(unlabeled, argmax prediction), after refreshing the memory from the
        labeled rows (SS-Net Alg. 2)."""
        with torch.no_grad():
            hard = self.rows_to_hard_labels(logits.detach())
            if not self.label_manager.has_regions:
                hard = hard.unsqueeze(1)
        gt = self.full_resolution(target)
        sep = self.separation
        gt_masks, gt_rest = sep.class_masks(gt, is_target=True)
        pred_masks_labeled, _ = sep.class_masks(hard[:num_labeled], is_target=False)
        sep.refresh_memory(net.heads, features[:num_labeled], gt_masks, pred_masks_labeled)
        loss_labeled = sep.loss(net.heads, features[:num_labeled], gt_masks, gt_rest)
        pseudo_masks, pseudo_rest = sep.class_masks(hard[num_labeled:], is_target=False)
        loss_unlabeled = sep.loss(net.heads, features[num_labeled:], pseudo_masks, pseudo_rest)
        return loss_labeled + loss_unlabeled

    # ------------------------------------------------------------------------------------------------------------
    def semiseg_state(self) -> dict:
        state = super().semiseg_state()
        if self.separation is not None:
            state['ssnet_prototype_memory'] = self.separation.state_dict()
        return state

    def load_semiseg_state(self, state) -> None:
        super().load_semiseg_state(state)
        if self.separation is not None and state is not None and 'ssnet_prototype_memory' in state:
            self.separation.load_state_dict(state['ssnet_prototype_memory'])


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
    loss_term_names = ('sup', 'lds')


class nnUNetTrainerSSNet_KL(nnUNetTrainerSSNet_noCS):
    """Ablation table 3, row "L_lds with KL": classic VAT (KL divergence as D) on top of the supervised loss, without
    L_cs, to be compared with nnUNetTrainerSSNet_noCS (Dice as D). Full SS-Net with KL-VAT is a subclass of
    nnUNetTrainerSSNet with ``lds_discrepancy = 'kl'``."""
    lds_discrepancy = 'kl'
