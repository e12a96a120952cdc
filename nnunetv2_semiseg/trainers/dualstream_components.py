"""The unsupervised terms of the dual-network method as :class:`LossComponent`\\ s over two streams.

Every component reads ``context.out['A']`` and ``context.out['B']`` (each ``SemiSegNetwork.forward_with_features``
of one stream: ``'seg'`` logits, deep-supervision list or tensor, and ``'features'``, the last decoder stage) and
returns one scalar. ``directions`` lists (teaching stream, learning stream) pairs: the paper's default here is
both ``('A', 'B')`` and ``('B', 'A')``, summed; the released code's L_lurp uses ``('A', 'B')`` only (V-Net teaches
ResNet). The formulas and their sources are in :mod:`nnunetv2_semiseg.losses.dualstream`.

Region-based datasets (``context.has_regions``: sigmoid outputs, one channel per possibly overlapping region) use the
per-channel Bernoulli forms of the same terms: the entropy filter, pseudo-labels (p >= 0.5) and reliability split are
per region channel, the pseudo-label loss is nnU-Net's region DC+BCE, the KL and cosine compare each region's two
probabilities (p, 1 - p), and the contrast has an inside and an outside prototype per region.
"""
from typing import Optional, Sequence, Tuple

import torch

from nnunetv2_semiseg.losses.dualstream import (bernoulli_entropy, channelwise_high_entropy_mask,
                                                cosine_consistency, cross_reliable_mistake_loss,
                                                entropy_filtered_pseudo_label_loss, high_entropy_mask,
                                                prototype_contrast_loss, region_cosine_consistency,
                                                region_cross_reliable_mistake_loss, region_dc_bce_loss,
                                                region_prototype_contrast_loss, region_pseudo_labels,
                                                region_uncertainty_weighted_pseudo_label_loss,
                                                uncertainty_weighted_pseudo_label_loss, voxel_entropy)
from nnunetv2_semiseg.trainers.components import LossComponent, StepContext
from nnunetv2_semiseg.trainers.ramps import sigmoid_rampup

Direction = Tuple[str, str]
BOTH_DIRECTIONS: Tuple[Direction, ...] = (('A', 'B'), ('B', 'A'))
A_TEACHES_B: Tuple[Direction, ...] = (('A', 'B'),)
ROW_CHOICES = ('all', 'unlabeled', 'labeled')


def stream_logits(context: StepContext, stream: str) -> torch.Tensor:
    """Full-resolution logits of all rows of one stream."""
    seg = context.out[stream]['seg']
    return seg[0] if isinstance(seg, (list, tuple)) else seg


def stream_probabilities(context: StepContext, stream: str) -> torch.Tensor:
    """float32 softmax of one stream's full-resolution logits (all rows), computed once per step; carries gradient."""
    key = f'probabilities_{stream}'
    if key not in context.cache:
        context.cache[key] = context.to_probabilities(stream_logits(context, stream))
    return context.cache[key]


def labeled_target_and_valid(full_target: torch.Tensor, regions: bool, ignore_label: Optional[int]
                             ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The labeled rows' full-resolution target as the released-code terms read it, and the voxels that carry a
    label (None without an ignore label):

    - classes: the label map (B, *spatial); valid = label != ignore label;
    - regions: the region channels (B, K, *spatial); nnU-Net's loader appends the ignore label as one more last
      channel (1 = ignored), which is split off: valid = that channel == 0.
    """
    if regions:
        if ignore_label is None:
            return full_target, None
        return full_target[:, :-1], full_target[:, -1] == 0
    labels = full_target[:, 0]
    return labels, (None if ignore_label is None else labels != ignore_label)


def rows(context: StepContext, which: str) -> slice:
    if which not in ROW_CHOICES:
        raise ValueError(f'rows must be one of {ROW_CHOICES}, got {which!r}')
    return {'all': slice(None), 'unlabeled': context.unlabeled, 'labeled': context.labeled}[which]


def teacher_reliability(context: StepContext, teacher: str, percentile: float, which: str):
    """(pseudo-label, high-entropy mask) of the teaching stream on the given rows, without gradient; cached so the
    pseudo-label and contrast terms of one step filter the same voxels. Softmax: argmax map and voxel mask
    (B, *spatial). Regions: p >= 0.5 and the per-channel mask, both (B, K, *spatial)."""
    key = ('reliability', teacher, percentile, which)
    if key not in context.cache:
        with torch.no_grad():
            p = stream_probabilities(context, teacher)[rows(context, which)].detach()
            if context.has_regions:
                context.cache[key] = (region_pseudo_labels(p),
                                      channelwise_high_entropy_mask(bernoulli_entropy(p), percentile))
            else:
                context.cache[key] = (p.argmax(1), high_entropy_mask(voxel_entropy(p), percentile))
    return context.cache[key]


class RampedComponent(LossComponent):
    """``weight * sigmoid_rampup(t, ramp_length)``: lambda(t) = 0.1 exp(-5 (1 - t)^2) over the whole training for
    weight 0.1, ramp_length 1 (paper Eq. 1's ramp, methods.md §5.6). ``ramp_length=None``: constant weight."""
    # Every dual-stream term reads out['A'] and out['B'] (DualStreamNetwork.forward_streams), not one network's out.
    output_layout = 'two streams'

    def __init__(self, weight: float, ramp_length: Optional[float]):
        self.weight, self.ramp_length = float(weight), ramp_length

    def ramp(self, fraction: float) -> float:
        return 1.0 if self.ramp_length is None else sigmoid_rampup(fraction, self.ramp_length)


class EntropyFilteredPseudoLabels(RampedComponent):
    """Paper Eq. 3-4: the teaching stream's argmax as pseudo-label, its highest-entropy voxels (above the
    ``percentile``-th percentile over the batch's rows) ignored, CE on the learning stream's live logits over the
    valid voxels. Regions: per channel, nnU-Net's DC+BCE to p >= 0.5 over each channel's valid voxels. Inert in the
    released code (detached inputs, and the filter disabled by a NaN)."""
    name = 'pseudo'

    def __init__(self, weight: float, ramp_length: Optional[float], percentile: float = 80.0,
                 directions: Sequence[Direction] = BOTH_DIRECTIONS, which_rows: str = 'unlabeled'):
        super().__init__(weight, ramp_length)
        self.percentile, self.directions, self.which_rows = float(percentile), tuple(directions), which_rows

    def loss(self, context: StepContext) -> torch.Tensor:
        total = 0.0
        for teacher, student in self.directions:
            pseudo_label, ignore = teacher_reliability(context, teacher, self.percentile, self.which_rows)
            logits = stream_logits(context, student)[rows(context, self.which_rows)]
            term = region_dc_bce_loss if context.has_regions else entropy_filtered_pseudo_label_loss
            total = total + term(logits, pseudo_label, ignore)
        return total


class UncertaintyWeightedPseudoLabels(RampedComponent):
    """Paper Eq. 7-9 / released L_lurp: mean(exp(-KL) CE(learner, argmax teacher)) + mean(KL), teacher detached.
    Regions: a Bernoulli KL and BCE to [p >= 0.5] per channel."""
    name = 'uncertainty'

    def __init__(self, weight: float, ramp_length: Optional[float], temperature: float = 0.5,
                 tempered_kl: bool = True, directions: Sequence[Direction] = BOTH_DIRECTIONS,
                 which_rows: str = 'unlabeled'):
        super().__init__(weight, ramp_length)
        self.temperature, self.tempered_kl = float(temperature), tempered_kl
        self.directions, self.which_rows = tuple(directions), which_rows

    def loss(self, context: StepContext) -> torch.Tensor:
        selected = rows(context, self.which_rows)
        term = region_uncertainty_weighted_pseudo_label_loss if context.has_regions \
            else uncertainty_weighted_pseudo_label_loss
        total = 0.0
        for teacher, student in self.directions:
            total = total + term(
                stream_logits(context, student)[selected], stream_logits(context, teacher)[selected],
                self.temperature, self.tempered_kl)
        return total


class CosineConsistency(RampedComponent):
    """Paper Eq. 5-6: mean over voxels of 1 - cos(p_A, p_B) over classes; both streams receive gradient. Regions:
    the cosine of each region's (p, 1 - p), averaged over voxels and regions."""
    name = 'consistency'

    def __init__(self, weight: float, ramp_length: Optional[float], which_rows: str = 'all'):
        super().__init__(weight, ramp_length)
        self.which_rows = which_rows

    def loss(self, context: StepContext) -> torch.Tensor:
        selected = rows(context, self.which_rows)
        term = region_cosine_consistency if context.has_regions else cosine_consistency
        return term(stream_probabilities(context, 'A')[selected],
                                  stream_probabilities(context, 'B')[selected])


class PrototypeContrast(RampedComponent):
    """Paper Eq. 10-11 on the learning stream's last decoder features (the released code's x9 embedding):
    prototypes = mean embedding of the teaching stream's reliable (low-entropy) voxels per pseudo-class; uncertain
    voxels pulled to their class prototype; prototypes pushed apart (``separation_weight`` times). Regions: an
    inside and an outside prototype per region channel from that channel's reliable voxels, averaged over regions.
    Inert in the
    released code (computed under no_grad, and with the prototype distance added instead of subtracted)."""
    name = 'contrast'

    def __init__(self, weight: float, ramp_length: Optional[float], num_classes: int, percentile: float = 80.0,
                 separation_weight: float = 1.0, directions: Sequence[Direction] = BOTH_DIRECTIONS,
                 which_rows: str = 'unlabeled'):
        super().__init__(weight, ramp_length)
        self.num_classes, self.percentile, self.separation_weight = num_classes, float(percentile), separation_weight
        self.directions, self.which_rows = tuple(directions), which_rows

    def loss(self, context: StepContext) -> torch.Tensor:
        total = 0.0
        for teacher, student in self.directions:
            labels, uncertain = teacher_reliability(context, teacher, self.percentile, self.which_rows)
            embeddings = context.out[student]['features'][rows(context, self.which_rows)]
            if context.has_regions:
                pull, separation = region_prototype_contrast_loss(embeddings, labels, ~uncertain)
            else:
                pull, separation = prototype_contrast_loss(embeddings, labels, ~uncertain, self.num_classes)
            total = total + pull + self.separation_weight * separation
        return total


class CrossReliableMistake(RampedComponent):
    """Released code's supervised extra (MCF): per stream, squared error to the ground truth on the labeled voxels
    where exactly one stream is confidently foreground; summed over the two streams (0.5 weight in the code).
    Regions: per region channel (p >= confidence); ignored voxels (nnU-Net's ignore label) are never in the mask."""
    name = 'mistake'

    def __init__(self, weight: float = 0.5, ramp_length: Optional[float] = None, confidence: float = 0.6,
                 ignore_label: Optional[int] = None):
        super().__init__(weight, ramp_length)
        self.confidence = float(confidence)
        self.ignore_label = ignore_label

    def loss(self, context: StepContext) -> torch.Tensor:
        labeled = context.labeled
        p_a, p_b = stream_probabilities(context, 'A')[labeled], stream_probabilities(context, 'B')[labeled]
        target, valid = labeled_target_and_valid(context.full_resolution_target, context.has_regions,
                                                 self.ignore_label)
        term = region_cross_reliable_mistake_loss if context.has_regions else cross_reliable_mistake_loss
        return sum(term(p, target, p_a, p_b, self.confidence, valid) for p in (p_a, p_b))
