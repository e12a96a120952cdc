"""SS-Net's two unsupervised components, each owning its hyperparameters, its state and its loss.

* :class:`DiceVATSmoothness`  - pixel-level smoothness L_lds (Dice-VAT, or KL-VAT for the ablation).
* :class:`PrototypeSeparation` - inter-class separation L_cs (prototype memory + weighted cosine distance).

Both are components (:class:`~nnunetv2_semiseg.trainers.components.LossComponent`): ``loss(context)`` reads the
step's shared forward pass, and the tensor-level methods underneath (``adversarial_loss``, ``class_masks``,
``refresh_memory``, ``group_loss``) take tensors and the head module as arguments. They know nothing about nnU-Net
trainers, so another trainer can combine them with other components (``nnUNetTrainerSSNetFLPM``). Their default
weights and ramps are the released LA code's (w(t) = sigmoid ramp over 40% of training; lambda_lds = w,
lambda_cs = 0.1 w). Formulas and sources are in ``losses/dice_vat.py`` and ``losses/prototypes.py``; the
deviations from the paper are listed in ``docs/ssnet.md``.
"""
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from nnunetv2_semiseg.losses.dice_vat import (PAPER_LA_EPSILON, PAPER_LA_PATCH_SIZE, PAPER_LA_XI, dice_discrepancy,
                                              kl_discrepancy, norm_for_sample_size, per_element_rms,
                                              virtual_adversarial_loss_and_fallbacks)
from nnunetv2_semiseg.losses.prototypes import (PrototypeMemory, class_separation_loss, gather_selected_across_ranks,
                                                gather_voxel_features, select_prototypes, subsample_indices,
                                                weighted_prototype_distance)
from nnunetv2_semiseg.trainers.components import LossComponent, StepContext
from nnunetv2_semiseg.trainers.ramps import sigmoid_rampup

# The paper's LA perturbation sizes as per-element RMS (see DiceVATSmoothness).
LA_EPSILON_RMS = per_element_rms(PAPER_LA_EPSILON, PAPER_LA_PATCH_SIZE)
LA_XI_RMS = per_element_rms(PAPER_LA_XI, PAPER_LA_PATCH_SIZE)


@contextmanager
def eval_mode(*modules: nn.Module):
    """Temporarily put modules in eval mode (restoring each submodule's previous flag afterwards)."""
    previous = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for m, flag in previous:
            m.training = flag


@contextmanager
def frozen_norm_statistics(module: nn.Module):
    """BatchNorm layers keep using batch statistics in train mode but stop updating their running statistics
    (the released VAT code does the same around its extra passes). A no-op for nnU-Net's InstanceNorm."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    try:
        for m in norms:
            m.track_running_stats = False
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


def has_active_dropout(network: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 and m.training for m in network.modules())


def zero_touch(module: Optional[nn.Module], reference: torch.Tensor) -> torch.Tensor:
    """0 * sum of all parameters: a zero loss term that gives every parameter a (zero) gradient, so DDP without
    ``find_unused_parameters`` accepts steps in which a class selector had nothing to score."""
    if module is None:
        return reference.new_zeros((), dtype=torch.float32)
    return sum((p.sum() * 0.0 for p in module.parameters()), reference.new_zeros((), dtype=torch.float32))


class DiceVATSmoothness(LossComponent):
    """L_lds = D(p(x + r_adv), sg(p(x))), r_adv = epsilon * g / ||g|| per sample (SS-Net Eq. 2-3), on all rows.

    ``epsilon_rms`` / ``xi_rms`` are per-element RMS values; the per-sample L2 norms are derived from the actual
    input size (``norm = rms * sqrt(C * prod(patch))``), so the perturbation strength per voxel is the paper's
    whatever nnU-Net's patch size is. ``discrepancy`` is 'dice' (SS-Net) or 'kl' (classic VAT). ``regions`` picks
    the KL form; None = take it from the step's output layout. Weight and ramp: ``weight * sigmoid_rampup(t,
    ramp_length)`` (released LA code: 1 and 0.4).

    Besides its loss the component logs ``lds_nonfinite``: the number of samples of the step whose VAT probe
    gradient was non-finite even after the float32 retry, and which therefore used the random direction.
    """
    name = 'lds'
    nonfinite_term = 'lds_nonfinite'

    def __init__(self, epsilon_rms: float = LA_EPSILON_RMS, xi_rms: float = LA_XI_RMS, discrepancy: str = 'dice',
                 regions: Optional[bool] = None, weight: float = 1.0, ramp_length: float = 0.4):
        if discrepancy not in ('dice', 'kl'):
            raise ValueError(f"discrepancy must be 'dice' or 'kl', got {discrepancy!r}")
        self.epsilon_rms, self.xi_rms, self.regions = float(epsilon_rms), float(xi_rms), regions
        self.discrepancy_name = discrepancy
        self.weight, self.ramp_length = float(weight), float(ramp_length)

    def ramp(self, fraction: float) -> float:
        return sigmoid_rampup(fraction, self.ramp_length)

    def discrepancy(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.discrepancy_name == 'dice':
            return dice_discrepancy(pred, target)
        return kl_discrepancy(pred, target, regions=bool(self.regions))

    def norms(self, x: torch.Tensor) -> Tuple[float, float]:
        n = x[0].numel()
        return norm_for_sample_size(self.epsilon_rms, n), norm_for_sample_size(self.xi_rms, n)

    def adversarial_loss(self, predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                         target_probabilities: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(L_lds, number of samples whose probe gradient was non-finite) for a ``predict`` callable."""
        epsilon, xi = self.norms(x)
        value, _, non_finite = virtual_adversarial_loss_and_fallbacks(predict, x, target_probabilities, epsilon,
                                                                      xi, self.discrepancy)
        return value, non_finite

    def loss(self, context: StepContext) -> torch.Tensor:
        """L_lds on all rows. The VAT target is the main pass's detached prediction when the network is
        deterministic (nnU-Net's default nets have no dropout), otherwise one extra no-grad pass as in the
        released code. BatchNorm running statistics stay frozen in the extra passes."""
        if self.regions is None:
            self.regions = context.has_regions
        net, x = context.net, context.x

        def predict(inp: torch.Tensor) -> torch.Tensor:
            out = net(inp)
            return context.to_probabilities(out[0] if isinstance(out, (list, tuple)) else out)

        if has_active_dropout(net):
            with torch.no_grad(), frozen_norm_statistics(net):
                target_probabilities = predict(x)
        else:
            target_probabilities = context.to_probabilities(context.logits.detach())
        with frozen_norm_statistics(net):
            value, non_finite = self.adversarial_loss(predict, x, target_probabilities)
        context.log(self.nonfinite_term, non_finite)
        return value


class PrototypeSeparation(LossComponent):
    """Prototype memory refresh and L_cs for one network output layout (SS-Net Alg. 2):

        L_cs = L_cs(labeled rows grouped by ground truth) + L_cs(unlabeled rows grouped by argmax prediction)

    after refreshing the memory from the correctly predicted labeled voxels. Weight and ramp: ``weight *
    sigmoid_rampup(t, ramp_length)`` (released LA code: 0.1 and 0.4). The heads (:class:`SSNetHeads`) are the
    network's ``heads`` entry ``heads_key``; the memory is saved under ``checkpoint['semiseg'][state_key]``.

    Classes are network output channels. Softmax outputs: class c >= 1 (background has no prototypes; voxels
    carrying the ignore label belong to no class). Region (sigmoid) outputs: every region is a class and a voxel
    may belong to several. The memory holds ``num_prototypes`` vectors per class; the loss is normalised by the
    number of output channels (background included for softmax, as in the released code).
    """
    name = 'cs'
    state_key = 'ssnet_prototype_memory'
    heads_key = 'separation'

    def __init__(self, num_classes: int, regions: bool = False, has_ignore_label: bool = False,
                 num_prototypes: int = 32, embedding_dim: int = 32, keep: str = 'highest',
                 max_voxels_per_class: Optional[int] = 16384, weight: float = 0.1, ramp_length: float = 0.4):
        self.weight, self.ramp_length = float(weight), float(ramp_length)
        self.num_classes, self.regions, self.has_ignore_label = num_classes, regions, has_ignore_label
        self.num_prototypes, self.max_voxels_per_class = num_prototypes, max_voxels_per_class
        self.memory = PrototypeMemory(num_classes, num_prototypes, embedding_dim, keep)
        self.generator: Optional[torch.Generator] = None  # tests may fix the voxel subsampling

    def ramp(self, fraction: float) -> float:
        return sigmoid_rampup(fraction, self.ramp_length)

    def to(self, device: torch.device) -> 'PrototypeSeparation':
        self.memory.to(device)
        return self

    def loss(self, context: StepContext) -> torch.Tensor:
        """L_cs(labeled, ground truth) + L_cs(unlabeled, argmax prediction), after refreshing the memory from the
        labeled rows (SS-Net Alg. 2). The features are the main pass's last decoder features, with gradient."""
        heads = context.heads_for(self.heads_key)
        features, n = context.out['features'], context.num_labeled
        with torch.no_grad():
            hard = context.to_hard_labels(context.logits.detach())
            if not self.regions:
                hard = hard.unsqueeze(1)
        gt_masks, gt_rest = self.class_masks(context.full_resolution_target, is_target=True)
        predicted_labeled, _ = self.class_masks(hard[:n], is_target=False)
        self.refresh_memory(heads, features[:n], gt_masks, predicted_labeled)
        loss_labeled = self.group_loss(heads, features[:n], gt_masks, gt_rest)
        pseudo_masks, pseudo_rest = self.class_masks(hard[n:], is_target=False)
        loss_unlabeled = self.group_loss(heads, features[n:], pseudo_masks, pseudo_rest)
        return loss_labeled + loss_unlabeled

    @property
    def class_indices(self) -> List[int]:
        return list(range(self.num_classes)) if self.regions else list(range(1, self.num_classes))

    def class_masks(self, labels: torch.Tensor, is_target: bool) -> Tuple[Dict[int, torch.Tensor], torch.Tensor]:
        """Per-class boolean masks (B, *spatial) and the mask of valid voxels belonging to no class.

        ``labels``: softmax layout (B, 1, *spatial) integer map (targets may contain the ignore
        label, which is >= num_classes); region layout (B, R, *spatial) binary maps, plus a trailing ignore channel
        for targets of datasets with an ignore label (nnU-Net's region target layout).
        """
        if not self.regions:
            lab = labels[:, 0].long()
            masks = {c: lab == c for c in self.class_indices}
            rest = lab == 0
            return masks, rest
        region_maps = labels
        valid = torch.ones_like(labels[:, 0], dtype=torch.bool)
        if is_target and self.has_ignore_label:
            valid = labels[:, -1] < 0.5
            region_maps = labels[:, :-1]
        active = region_maps > 0.5
        masks = {c: active[:, c] & valid for c in self.class_indices}
        rest = valid & ~active.any(1)
        return masks, rest

    @torch.no_grad()
    def refresh_memory(self, heads: nn.Module, features: torch.Tensor, target_masks: Dict[int, torch.Tensor],
                       prediction_masks: Dict[int, torch.Tensor]) -> None:
        """Replace each class's memory by the top-K (or lowest-K) candidates: labeled voxels predicted correctly as
        that (non-background) class, projected by Phi in eval mode without gradient and scored by sigmoid(A_f^c).
        Classes without candidates keep their memory. Under DDP the selection is over all ranks' candidates."""
        features = features.detach()
        with eval_mode(heads):
            for c in self.class_indices:
                idx = (target_masks[c] & prediction_masks[c]).reshape(-1).nonzero(as_tuple=False).squeeze(1)
                if idx.numel() > 0:
                    # float32 on every rank (autocast would give float16): all_gather needs equal dtypes
                    candidates = heads.project(gather_voxel_features(features, idx).float()).float()
                    scores = heads.feature_score(c, candidates).float()
                    candidates, scores = select_prototypes(candidates, scores, self.num_prototypes, self.memory.keep)
                else:
                    candidates = features.new_zeros((0, self.memory.dim), dtype=torch.float32)
                    scores = features.new_zeros((0,), dtype=torch.float32)
                candidates, scores = gather_selected_across_ranks(candidates, scores, self.num_prototypes)
                self.memory.update(c, candidates, scores)

    def group_loss(self, heads: nn.Module, features: torch.Tensor, masks: Dict[int, torch.Tensor],
                   rest: torch.Tensor) -> torch.Tensor:
        """L_cs for one group of rows (SS-Net Alg. 2 steps 5-7): Psi(Phi(.)) of the (subsampled) voxels of each
        class against that class's constant memory, weighted by the two selectors.

        One head pass covers every class and the background voxels (each bounded by ``max_voxels_per_class``), so
        the BatchNorm statistics of Phi/Psi are taken over a mix of all classes, as in the released code which
        projects every voxel together.
        """
        groups: List[Tuple[int, torch.Tensor]] = []
        for c in self.class_indices:
            groups.append((c, subsample_indices(masks[c], self.max_voxels_per_class, self.generator)))
        rest_idx = subsample_indices(rest, self.max_voxels_per_class, self.generator)
        all_idx = torch.cat([g[1] for g in groups] + [rest_idx])
        terms: List[torch.Tensor] = []
        touch = zero_touch(heads, features)
        if all_idx.numel() < 2:
            return touch + class_separation_loss(terms, self.num_classes, features)
        embeddings = heads.project_and_predict(gather_voxel_features(features, all_idx).float())
        start = 0
        for c, idx in groups:
            emb_c = embeddings[start:start + idx.numel()]
            start += idx.numel()
            prototypes = self.memory.get(c).detach()
            if emb_c.shape[0] <= 1 or prototypes.shape[0] <= 1:
                continue
            w_f = heads.feature_score(c, emb_c.detach())
            w_z = heads.memory_score(c, prototypes)
            terms.append(weighted_prototype_distance(emb_c, prototypes, w_f, w_z))
        return touch + class_separation_loss(terms, self.num_classes, features)

    def state_dict(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.memory.state_dict().items()}

    def load_state_dict(self, state: Optional[dict], student: Optional[nn.Module] = None) -> None:
        if state is not None:  # None: a checkpoint without memory (plain nnU-Net): keep the empty one
            self.memory.load_state_dict(state)
