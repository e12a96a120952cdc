"""``nnUNetTrainerDualStream``: "Semi-Supervised Medical Image Segmentation via Dual Networks" (AIPMLab) on nnU-Net.

Two streams from one plan (A = the plans' PlainConvUNet, B = its ResidualEncoderUNet counterpart) see the same
augmented batch (labeled rows first, then unlabeled rows) and train together under one optimizer. Loss (paper
Eq. 1, its parts Eq. 2-11 as rebuilt in methods.md §5 and ``losses/dualstream.py``):

    L = L_sup(A) + L_sup(B)                                  nnU-Net's deep-supervised DC+CE, labeled rows
        + lambda(t) * (  L_pseudo(B <- A) + L_pseudo(A <- B)   entropy-filtered pseudo-label CE      (Eq. 3-4)
                       + L_unc(B <- A)    + L_unc(A <- B)      KL-weighted pseudo-label CE, T = 0.5   (Eq. 7-9)
                       + L_cos(A, B)                            1 - cosine of the probabilities       (Eq. 5-6)
                       + L_con(B | A)     + L_con(A | B) )      prototype contrast, uncertain voxels  (Eq. 10-11)
    lambda(t) = 0.1 * exp(-5 (1 - t)^2),  t = fraction of training done

"X <- Y": stream Y teaches X (Y's prediction is detached). The paper has one teacher; here each stream teaches the
other, because the released code has two equal networks and no EMA (see docs/dualstream.md).
``nnUNetTrainerDualStream_releasedCode`` is the released code's effective gradient-bearing objective instead.

Region-based datasets (sigmoid outputs) use the per-region-channel Bernoulli forms of every unsupervised term
(``losses/dualstream.py``) and nnU-Net's DC+BCE for the supervised and pseudo-label losses.

The deployed network (``build_network_architecture``) returns log of the two streams' averaged softmax (regions: the
logit of their averaged sigmoids), so stock
``nnUNetv2_predict -tr nnUNetTrainerDualStream`` predicts the ensemble. Usage:
``nnUNetv2_train DatasetXXX 3d_fullres 0 -tr nnUNetTrainerDualStream`` (after
``nnUNetv2_semiseg_preprocess_unlabeled``).
"""
from typing import Dict, List

import torch
from torch import nn

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnunetv2_semiseg.losses.dualstream import region_released_supervised_loss, released_supervised_loss
from nnunetv2_semiseg.networks.dualstream import DualStreamNetwork, STREAMS, stream_architectures
from nnunetv2_semiseg.trainers.components import LossComponent
from nnunetv2_semiseg.trainers.composed import nnUNetTrainerComposed
from nnunetv2_semiseg.trainers.dualstream_components import (A_TEACHES_B, BOTH_DIRECTIONS, CosineConsistency,
                                                             CrossReliableMistake, EntropyFilteredPseudoLabels,
                                                             PrototypeContrast, UncertaintyWeightedPseudoLabels,
                                                             labeled_target_and_valid)
from nnunetv2_semiseg.utilities.progress_logger import SupervisedCurve


class nnUNetTrainerDualStream(nnUNetTrainerComposed):
    # --- streams ---
    stream_b_blocks = 'one'            # residual blocks per stage of stream B: 'one' or nnU-Net's 'resenc_m'
    # --- which unsupervised terms ---
    use_pseudo_label = True
    use_uncertainty = True
    use_consistency = True
    use_contrast = True
    # --- weights: every unsupervised term gets unsupervised_weight * sigmoid_rampup(t, rampup_length) * its own ---
    unsupervised_weight = 0.1
    rampup_length = 1.0                # fraction of training: the ramp spans all of it (paper: t / t_max)
    pseudo_label_weight = 1.0
    uncertainty_weight = 1.0
    consistency_weight = 1.0
    contrast_weight = 1.0
    # --- term settings ---
    teaching_directions = BOTH_DIRECTIONS
    entropy_percentile = 80.0          # voxels above it are ignored (paper); also the contrast's reliability split
    temperature = 0.5
    tempered_kl = True                 # paper: the KL uses the sharpened teacher; released code: untempered
    separation_weight = 1.0            # prototype separation relative to the pull of uncertain voxels
    pseudo_label_rows = 'unlabeled'    # the paper's pseudo-supervision is on unlabeled data
    consistency_rows = 'all'           # as the released code: labeled + unlabeled rows
    # --- supervised ---
    supervised = 'nnunet'              # nnU-Net's DC+CE with deep supervision; 'released' = CE + fg Dice, full res

    loss_term_names = ('sup', 'pseudo', 'uncertainty', 'consistency', 'contrast')
    # 'sup' sums both streams' supervised losses; progress.png compares one stream's share with the validation loss.
    progress_supervised_curve = SupervisedCurve({'sup': 0.5}, 'loss_tr (supervised part: sup / 2, per stream)')
    allow_torch_compile = False        # a fresh closure goes through forward(train_fn=...) every step

    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels,
                                   num_output_channels, enable_deep_supervision: bool = True) -> nn.Module:
        architectures = stream_architectures(configuration_manager.network_arch_class_name,
                                             configuration_manager.network_arch_init_kwargs, cls.stream_b_blocks)
        stream_a = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                            num_output_channels, enable_deep_supervision)
        class_name, kwargs = architectures['B']
        stream_b = get_network_from_plans(class_name, kwargs, configuration_manager.network_arch_init_kwargs_req_import,
                                          num_input_channels, num_output_channels, allow_init=True,
                                          deep_supervision=enable_deep_supervision)
        return DualStreamNetwork(stream_a, stream_b)

    def set_deep_supervision_enabled(self, enabled: bool):
        # nnU-Net's version sets network.decoder.deep_supervision; there are two decoders here.
        self.unwrapped_network.set_deep_supervision(enabled)

    def initialize(self):
        super().initialize()
        # The deployed ensemble must match the output layout (logit of the mean sigmoid for regions); it is saved
        # with the weights, so nnUNetv2_predict gets it too.
        self.unwrapped_network.use_region_ensemble(self.label_manager.has_regions)

    # ------------------------------------------------------------------------------------------------------------
    def build_loss_components(self) -> List[LossComponent]:
        w, ramp = self.unsupervised_weight, self.rampup_length
        components: List[LossComponent] = []
        if self.use_pseudo_label:
            components.append(EntropyFilteredPseudoLabels(w * self.pseudo_label_weight, ramp, self.entropy_percentile,
                                                          self.teaching_directions, self.pseudo_label_rows))
        if self.use_uncertainty:
            components.append(UncertaintyWeightedPseudoLabels(w * self.uncertainty_weight, ramp, self.temperature,
                                                              self.tempered_kl, self.teaching_directions,
                                                              self.pseudo_label_rows))
        if self.use_consistency:
            components.append(CosineConsistency(w * self.consistency_weight, ramp, self.consistency_rows))
        if self.use_contrast:
            components.append(PrototypeContrast(w * self.contrast_weight, ramp,
                                                self.label_manager.num_segmentation_heads, self.entropy_percentile,
                                                self.separation_weight, self.teaching_directions,
                                                self.pseudo_label_rows))
        return components

    def student_forward(self, net: nn.Module, x: torch.Tensor) -> dict:
        return net.forward_streams(x)

    def stream_supervised_loss(self, seg_outputs, target) -> torch.Tensor:
        """One stream's supervised loss on its labeled rows (deep-supervision list or one tensor)."""
        if self.supervised == 'nnunet':
            return self.supervised_loss(seg_outputs, target)
        full, lower = (seg_outputs[0], seg_outputs[1:]) if isinstance(seg_outputs, (list, tuple)) \
            else (seg_outputs, [])
        # The released loss is full-resolution only; the lower outputs join with weight 0 so that every parameter
        # still gets a gradient (DDP without find_unused_parameters).
        untouched = sum((o.float().sum() * 0.0 for o in lower), full.new_zeros((), dtype=torch.float32))
        labels, valid = labeled_target_and_valid(self.full_resolution(target), self.label_manager.has_regions,
                                                 self.label_manager.ignore_label)
        released = region_released_supervised_loss if self.label_manager.has_regions else released_supervised_loss
        return released(full, labels, valid) + untouched

    def composed_loss(self, net: nn.Module, x: torch.Tensor, target, num_labeled: int) -> Dict[str, torch.Tensor]:
        context = self.make_context(net, x, target, num_labeled)
        supervised = [self.stream_supervised_loss(self.labeled_rows(context.out[s]['seg'], num_labeled), target)
                      for s in STREAMS]
        terms = {'sup': supervised[0] + supervised[1]}
        total = terms['sup']
        for component in self.loss_components:
            terms[component.name] = component.loss(context)
            total = total + component.weight_at(context.fraction) * terms[component.name]
        terms['loss'] = total
        return terms


# ---------------------------------------------------------------------------------------------------------------
# The released code's objective and the ablations (paper Table 3)
# ---------------------------------------------------------------------------------------------------------------
class nnUNetTrainerDualStream_releasedCode(nnUNetTrainerDualStream):
    """The released code's effective gradient-bearing objective (methods.md §5.2), all weights 1, no ramp:

        L = [CE_A + Dice_A + 0.5 mistake_A] + [CE_B + Dice_B + 0.5 mistake_B] + L_lurp(B <- A) + L_cos(A, B)

    CE + foreground Dice at full resolution; L_lurp with stream A ("V-Net") teaching B ("ResNet") on all rows and an
    untempered KL; L_cos on all rows. The pseudo-label CE and prototype contrast carry no gradient there: absent."""
    supervised = 'released'
    use_pseudo_label = False
    use_contrast = False
    unsupervised_weight = 1.0
    rampup_length = None
    teaching_directions = A_TEACHES_B
    tempered_kl = False
    pseudo_label_rows = 'all'
    mistake_weight = 0.5
    mistake_confidence = 0.6
    loss_term_names = ('sup', 'uncertainty', 'consistency', 'mistake')

    def build_loss_components(self) -> List[LossComponent]:
        return super().build_loss_components() + [CrossReliableMistake(self.mistake_weight, None,
                                                                       self.mistake_confidence,
                                                                       self.label_manager.ignore_label)]


class nnUNetTrainerDualStream_noConsistency(nnUNetTrainerDualStream):
    """Ablation: without the cosine consistency L_reg."""
    use_consistency = False
    loss_term_names = ('sup', 'pseudo', 'uncertainty', 'contrast')


class nnUNetTrainerDualStream_noUncertainty(nnUNetTrainerDualStream):
    """Ablation: without the KL-weighted pseudo-label loss."""
    use_uncertainty = False
    loss_term_names = ('sup', 'pseudo', 'consistency', 'contrast')


class nnUNetTrainerDualStream_noContrast(nnUNetTrainerDualStream):
    """Ablation: without the prototype contrast."""
    use_contrast = False
    loss_term_names = ('sup', 'pseudo', 'uncertainty', 'consistency')


class nnUNetTrainerDualStream_resEncM(nnUNetTrainerDualStream):
    """Stream B with nnU-Net's ResEnc-M encoder block counts (1, 3, 4, 6, 6, ...) instead of one block per stage."""
    stream_b_blocks = 'resenc_m'
