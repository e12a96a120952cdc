"""Losses of the dual-network method (AIPMLab, "Semi-Supervised Medical Image Segmentation via Dual Networks").

Every function is pure: tensors in, a scalar (or a mask) out, float32, no trainer state. First the softmax layout
(probabilities over the class axis 1; one class per voxel), then the region (sigmoid) layout at the end of the
file: the same terms with one Bernoulli variable per region channel. Sources are the paper ([S4],
``shared/papers/dual_networks_ssl.txt``; its equations were lost in extraction, so the formulas are rebuilt from its
prose) and the released code (AIP ``train_LA.py``, read through ``shared/docs/methods.md`` §5.2). Which detach
points and normalisations are the paper's intent and which are the code's is listed per function and in
``docs/dualstream.md``.
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

# Guard against log(0) in entropies of saturated softmax outputs (float32).
ENTROPY_EPSILON = 1e-10


def voxel_entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """H_v = -sum_c p_v,c log(p_v,c + 1e-10)  (paper Eq. 3, computed on probabilities as in LUSEG, not on logits
    as the released code's bug does). probabilities (B, C, *spatial) -> (B, *spatial)."""
    p = probabilities.float()
    return -(p * torch.log(p + ENTROPY_EPSILON)).sum(1)


def high_entropy_mask(entropy: torch.Tensor, percentile: float = 80.0) -> torch.Tensor:
    """True for the voxels above the ``percentile``-th percentile of entropy over ALL voxels of the tensor (paper:
    "the 80th percentile of the entropy values across all pixels").

    Exactly round(n * (100 - percentile) / 100) voxels are marked, the highest-entropy ones (ties broken by
    ``torch.topk``), so the filtered fraction does not depend on how many voxels share the threshold value.
    """
    flat = entropy.reshape(-1)
    num_ignored = int(round(flat.numel() * (100.0 - float(percentile)) / 100.0))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if num_ignored > 0:
        mask[torch.topk(flat, num_ignored, largest=True, sorted=False).indices] = True
    return mask.reshape(entropy.shape)


def entropy_filtered_pseudo_label_loss(student_logits: torch.Tensor, pseudo_label: torch.Tensor,
                                       ignore: torch.Tensor) -> torch.Tensor:
    """L_unsup = sum_v 1[v valid] CE(z_v, yhat_v) / sum_v 1[v valid]   (paper Eq. 4).

    The paper writes the mean over B*H*W*D voxels rescaled by B*H*W*D / #valid, which is the same number.
    ``student_logits`` (B, C, *spatial) are the learning stream's live logits; ``pseudo_label`` (B, *spatial) the
    teaching stream's argmax (no gradient); ``ignore`` (B, *spatial) the high-entropy voxels. Zero (with a graph to
    the logits) when every voxel is ignored.
    """
    ce = F.cross_entropy(student_logits.float(), pseudo_label.long(), reduction='none')
    valid = (~ignore).float()
    return (ce * valid).sum() / valid.sum().clamp_min(1.0)


def uncertainty_weighted_pseudo_label_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                                           temperature: float = 0.5, tempered_kl: bool = True) -> torch.Tensor:
    """L_u = mean_v( exp(-KL_v) * CE(z_v, yhat_v) ) + mean_v( KL_v )   (paper Eq. 7-9; URPC form, Luo et al. 2021).

        q = softmax(sg(z_teacher) / T),  yhat = argmax q,  KL_v = sum_c q_v,c (log q_v,c - log softmax(z_student)_v,c)

    The teaching side is detached: only the learning stream receives gradient (through CE and through both KL
    terms; exp(-KL) is not detached, as in URPC and the released code). ``tempered_kl=True`` (paper intent: "we
    sharpen the softmax probabilities by dividing the logits by a temperature") uses the sharpened q in the KL;
    ``False`` is the released code, whose KL uses the untempered softmax, so that T has no effect at all (argmax is
    invariant to it).
    """
    teacher = teacher_logits.detach().float()
    log_student = F.log_softmax(student_logits.float(), 1)
    pseudo_label = teacher.argmax(1)  # = argmax of softmax(teacher / T) for every T > 0
    log_q = F.log_softmax(teacher / temperature if tempered_kl else teacher, 1)
    kl = (log_q.exp() * (log_q - log_student)).sum(1)
    ce = F.nll_loss(log_student, pseudo_label, reduction='none')
    return torch.mean(torch.exp(-kl) * ce) + torch.mean(kl)


def cosine_consistency(probabilities_a: torch.Tensor, probabilities_b: torch.Tensor) -> torch.Tensor:
    """L_reg = mean_v (1 - <p_A,v, p_B,v> / (||p_A,v|| ||p_B,v||))   (paper Eq. 5-6; cosine over the class axis).

    No stop-gradient: both streams are pulled towards each other (paper and released code).
    """
    return torch.mean(1.0 - F.cosine_similarity(probabilities_a.float(), probabilities_b.float(), dim=1, eps=1e-8))


def class_prototypes(embeddings: torch.Tensor, labels: torch.Tensor, reliable: torch.Tensor,
                     num_classes: int) -> Dict[int, torch.Tensor]:
    """mu_c = (1 / |R_c|) sum_{v in R_c} e_v  (paper Eq. 10): mean embedding of the reliable voxels of class c.

    embeddings (B, D, *spatial), labels (B, *spatial) class map, reliable (B, *spatial). Classes without reliable
    voxels have no prototype (absent from the returned dict). The result carries the gradient of ``embeddings``.
    """
    d = embeddings.shape[1]
    flat = embeddings.float().movedim(1, -1).reshape(-1, d)
    labels, reliable = labels.reshape(-1), reliable.reshape(-1)
    prototypes = {}
    for c in range(num_classes):
        members = (labels == c) & reliable
        if bool(members.any()):
            prototypes[c] = flat[members].mean(0)
    return prototypes


def normalised_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """d(a, b) = ||a / ||a|| - b / ||b|| ||_2 per row (in [0, 2]); the released code's distance (``torch.cdist`` of
    L2-normalised vectors). a (n, D), b (D,) or (n, D) -> (n,)."""
    return torch.linalg.vector_norm(F.normalize(a.float(), dim=-1) - F.normalize(b.float(), dim=-1), dim=-1)


def prototype_contrast_loss(embeddings: torch.Tensor, labels: torch.Tensor, reliable: torch.Tensor,
                            num_classes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """L_con = (1/|K|) sum_{c in K} mean_{v in U_c} d(e_v, sg(mu_c))  +  (1/|P|) sum_{(i,j) in P} (2 - d(mu_i, mu_j))
    (paper Eq. 10-11, multi-class form).

    U_c = uncertain (not reliable) voxels of class c, K = classes with a prototype and uncertain voxels, P = pairs of
    prototypes. First part: uncertain voxels are pulled to their class prototype; the prototype is detached there so
    that the pull moves the uncertain voxels, not the reliable ones that define the prototype. Second part: the
    prototypes are pushed apart, the sign the paper intends (the released code adds +d, pulling them together);
    2 - d is -d shifted by its maximum so the term stays non-negative. Binary data gives the paper's three terms
    (fg pull, bg pull, fg/bg separation). Returns (pull, separation); each is an exact zero with a graph to
    ``embeddings`` when it has no voxels or pairs.
    """
    prototypes = class_prototypes(embeddings, labels, reliable, num_classes)
    d = embeddings.shape[1]
    flat = embeddings.float().movedim(1, -1).reshape(-1, d)
    flat_labels, uncertain = labels.reshape(-1), ~reliable.reshape(-1)
    zero = flat.sum() * 0.0
    pulls = []
    for c, mu in prototypes.items():
        members = (flat_labels == c) & uncertain
        if bool(members.any()):
            pulls.append(normalised_distance(flat[members], mu.detach()).mean())
    pull = torch.stack(pulls).mean() if pulls else zero
    classes = sorted(prototypes)
    pairs = [(i, j) for n, i in enumerate(classes) for j in classes[n + 1:]]
    if pairs:
        separation = torch.stack([2.0 - normalised_distance(prototypes[i], prototypes[j]) for i, j in pairs]).mean()
    else:
        separation = zero
    return pull + zero, separation + zero


# ------------------------------------------------------------------------------------------------------------------
# The released code's supervised pieces (MCF lineage), for the code-faithful variant
# ------------------------------------------------------------------------------------------------------------------
def squared_foreground_dice_loss(probabilities: torch.Tensor, target: torch.Tensor,
                                 smooth: float = 1e-5, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dice_fg = mean over foreground classes c >= 1 of 1 - (2 sum m p_c y_c + s) / (sum m p_c^2 + sum m y_c^2 + s).

    MCF ``dice_loss`` (squared denominator, s = 1e-5) on the foreground probability, summed over the whole batch;
    the released binary code calls it once on channel 1, which this is for two classes.
    probabilities (B, C, *spatial), target (B, *spatial) integer labels; m = ``valid`` (B, *spatial), the voxels
    that carry a label (nnU-Net's ignore label excluded), all voxels when None.
    """
    p = probabilities.float()
    m = torch.ones_like(p[:, 0]) if valid is None else valid.float()
    losses = []
    for c in range(1, p.shape[1]):
        y = (target == c).float() * m
        pc = p[:, c] * m
        intersect = (pc * y).sum()
        losses.append(1.0 - (2.0 * intersect + smooth) / ((pc ** 2).sum() + (y ** 2).sum() + smooth))
    return torch.stack(losses).mean()


def cross_reliable_mistake_loss(probabilities: torch.Tensor, target: torch.Tensor, probabilities_a: torch.Tensor,
                                probabilities_b: torch.Tensor, confidence: float = 0.6,
                                valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """mistake = sum_v m_v * sum_{c>=1} (p_v,c - y_v,c)^2 / (sum_v m_v + 1e-16)   (MCF "cross reliable" term).

        m_v = [A confidently predicts foreground at v] XOR [B confidently predicts foreground at v],
        "confidently foreground" = argmax != 0 and max probability >= ``confidence`` (0.6).

    ``probabilities`` are the stream the term trains (live); the mask comes from both streams without gradient.
    y is the one-hot target; for two classes the inner sum is (p_fg - y)^2 as in the released code (MCF's
    ``softmax_mse_loss`` there is a plain squared difference of probabilities). ``valid`` (B, *spatial): voxels that
    carry a label; an ignored voxel has no y, so it is never in the mask (None: all voxels).
    """
    with torch.no_grad():
        def confident_foreground(p: torch.Tensor) -> torch.Tensor:
            top, label = p.float().max(1)
            return (label != 0) & (top >= confidence)
        mask = confident_foreground(probabilities_a) ^ confident_foreground(probabilities_b)
        mask = (mask if valid is None else mask & valid).float()
    p = probabilities.float()
    labels = target.long() if valid is None else torch.where(valid, target.long(), 0)
    one_hot = F.one_hot(labels, p.shape[1]).movedim(-1, 1).float()
    squared = ((p[:, 1:] - one_hot[:, 1:]) ** 2).sum(1)
    return (mask * squared).sum() / (mask.sum() + 1e-16)


def released_supervised_loss(logits: torch.Tensor, target: torch.Tensor,
                             valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """CE(z, y) + Dice_fg(softmax(z), y): the released code's supervised loss per network, full resolution.

    With ``valid`` (B, *spatial; nnU-Net's ignore label excluded) the CE is the mean over the valid voxels and the
    Dice sums run over them only, as nnU-Net's own DC+CE treats the ignore label."""
    z = logits.float()
    if valid is None:
        return F.cross_entropy(z, target.long()) + squared_foreground_dice_loss(torch.softmax(z, 1), target)
    labels = torch.where(valid, target.long(), 0)
    ce = (F.cross_entropy(z, labels, reduction='none') * valid).sum() / valid.sum().clamp_min(1)
    return ce + squared_foreground_dice_loss(torch.softmax(z, 1), labels, valid=valid)


def ensemble_log_probabilities(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """log((softmax(z_A) + softmax(z_B)) / 2), computed stably as logsumexp of the two log-softmaxes - log 2.

    nnU-Net's predictor applies softmax and argmax to what the network returns; softmax of this is exactly the
    averaged probabilities, so stock prediction reproduces the released code's ensemble (mean of both softmaxes).
    """
    stacked = torch.stack((F.log_softmax(logits_a.float(), 1), F.log_softmax(logits_b.float(), 1)))
    return torch.logsumexp(stacked, 0) - torch.log(torch.tensor(2.0, device=logits_a.device))


# ------------------------------------------------------------------------------------------------------------------
# Region-based datasets (sigmoid outputs): every output channel is its own binary problem
# ------------------------------------------------------------------------------------------------------------------
# Overlapping regions (e.g. whole tumour, core, enhancing) do not partition the voxels into classes, so the softmax
# formulas above do not apply. Each region channel k is a Bernoulli variable with p_k = sigmoid(z_k); every term
# below is the binary (two-class) form of its softmax counterpart, applied per channel and averaged over channels.
# For one region this is exactly what the softmax formulas give on a two-class (background, foreground) output.

def bernoulli_entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """H_v,k = -(p_v,k log(p_v,k + 1e-10) + (1 - p_v,k) log(1 - p_v,k + 1e-10)) per region channel k.

    probabilities (B, K, *spatial) sigmoid outputs -> (B, K, *spatial) (the channel axis is kept)."""
    p = probabilities.float()
    return -(p * torch.log(p + ENTROPY_EPSILON) + (1.0 - p) * torch.log(1.0 - p + ENTROPY_EPSILON))


def channelwise_high_entropy_mask(entropy: torch.Tensor, percentile: float = 80.0) -> torch.Tensor:
    """:func:`high_entropy_mask` for each region channel separately: in channel k, the round(20 %) voxels of the
    batch with the highest entropy of that region are ignored. entropy (B, K, *spatial) -> bool (B, K, *spatial).

    Per channel because a voxel can be certain about one region (far outside the tumour core) and uncertain about
    another (on the whole-tumour border)."""
    return torch.stack([high_entropy_mask(entropy[:, k], percentile) for k in range(entropy.shape[1])], 1)


def region_pseudo_labels(teacher_probabilities: torch.Tensor) -> torch.Tensor:
    """yhat_v,k = [p_v,k >= 0.5] per region channel (bool, same shape): nnU-Net's per-region decision."""
    return teacher_probabilities >= 0.5


def region_dc_bce_loss(student_logits: torch.Tensor, pseudo_label: torch.Tensor, ignore: torch.Tensor,
                       batch_dice: bool = True, smooth: float = 1e-5) -> torch.Tensor:
    """Entropy-filtered pseudo-label loss for regions: nnU-Net's region loss (DC+BCE, ``DC_and_BCE_loss`` with its
    ignore mask) per channel, with channel k's own ignore mask, averaged over the K channels:

        L = (1/K) sum_k [ BCE_k + Dice_k ],
        BCE_k  = sum_{v valid in k} bce(z_v,k, yhat_v,k) / #valid_k,
        Dice_k = -(2 sum_v m p y + s) / (sum_v m y + sum_v m p + s),   m = 1[v valid in k], p = sigmoid(z_v,k),
                 y = yhat_v,k, s = 1e-5, sums over the batch (batch Dice, nnU-Net's region setting)

    (nnU-Net's soft Dice is negative: its optimum is -1). ``student_logits`` (B, K, *spatial) are the learning
    stream's live logits; ``pseudo_label`` (B, K, *spatial) the teaching stream's p >= 0.5; ``ignore`` (B, K,
    *spatial) its high-entropy voxels per channel. nnU-Net's loss takes one ignore channel for all regions, hence
    one call per region channel.
    """
    from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    loss = DC_and_BCE_loss({}, {'batch_dice': batch_dice, 'smooth': smooth, 'do_bg': True, 'ddp': False},
                           use_ignore_label=True, dice_class=MemoryEfficientSoftDiceLoss)
    logits = student_logits.float()
    per_channel = [loss(logits[:, k:k + 1], torch.stack((pseudo_label[:, k], ignore[:, k]), 1).bool())
                   for k in range(logits.shape[1])]
    return torch.stack(per_channel).mean()


def region_released_supervised_loss(logits: torch.Tensor, region_target: torch.Tensor,
                                    valid: Optional[torch.Tensor] = None, smooth: float = 1e-5) -> torch.Tensor:
    """The released CE + foreground Dice in its binary form per region channel, averaged over the K channels:

        L = (1/K) sum_k [ BCE_k + Dice_k ],
        BCE_k  = sum_v m bce(z_v,k, y_v,k) / sum_v m,
        Dice_k = 1 - (2 sum_v m p y + s) / (sum_v m p^2 + sum_v m y^2 + s),   p = sigmoid(z_v,k), s = 1e-5

    m = ``valid`` (B, *spatial), the voxels that carry a label (all when None). For one region this equals
    :func:`released_supervised_loss` on the two-class output (0, z): its softmax foreground is sigmoid(z).
    logits, region_target (B, K, *spatial)."""
    z, y = logits.float(), region_target.float()
    m = (torch.ones_like(z[:, :1]) if valid is None else valid[:, None].float()).expand_as(z)
    losses = []
    for k in range(z.shape[1]):
        mk, yk, pk = m[:, k], y[:, k] * m[:, k], torch.sigmoid(z[:, k]) * m[:, k]
        bce = (F.binary_cross_entropy_with_logits(z[:, k], y[:, k], reduction='none') * mk).sum() \
            / mk.sum().clamp_min(1)
        dice = 1.0 - (2.0 * (pk * yk).sum() + smooth) / ((pk ** 2).sum() + (yk ** 2).sum() + smooth)
        losses.append(bce + dice)
    return torch.stack(losses).mean()


def region_cross_reliable_mistake_loss(probabilities: torch.Tensor, region_target: torch.Tensor,
                                       probabilities_a: torch.Tensor, probabilities_b: torch.Tensor,
                                       confidence: float = 0.6, valid: Optional[torch.Tensor] = None
                                       ) -> torch.Tensor:
    """:func:`cross_reliable_mistake_loss` per region channel k (sigmoid probabilities):

        m_v,k = [p_A,v,k >= confidence] XOR [p_B,v,k >= confidence]   (no gradient; ignored voxels excluded),
        mistake = sum_{v,k} m_v,k (p_v,k - y_v,k)^2 / (sum_{v,k} m_v,k + 1e-16).

    With confidence > 0.5, "confidently foreground" of a two-class softmax is p_fg >= confidence, so one region
    gives the class formula's value."""
    with torch.no_grad():
        mask = (probabilities_a.float() >= confidence) ^ (probabilities_b.float() >= confidence)
        if valid is not None:
            mask = mask & valid[:, None]
        mask = mask.float()
    squared = (probabilities.float() - region_target.float()) ** 2
    return (mask * squared).sum() / (mask.sum() + 1e-16)


def region_uncertainty_weighted_pseudo_label_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                                                  temperature: float = 0.5, tempered_kl: bool = True
                                                  ) -> torch.Tensor:
    """:func:`uncertainty_weighted_pseudo_label_loss` with a Bernoulli per region channel:

        q = sigmoid(sg(z_teacher) / T),  yhat = [z_teacher >= 0] (= [sigmoid(z_teacher) >= 0.5]),  p = sigmoid(z),
        KL_v,k = q log(q / p) + (1 - q) log((1 - q) / (1 - p)),   BCE_v,k = bce(z_v,k, yhat_v,k),
        L_u = mean_{v,k}( exp(-KL_v,k) * BCE_v,k ) + mean_{v,k}( KL_v,k )

    Only the learning stream receives gradient; ``tempered_kl=False`` uses T = 1 in q (the released code's KL).
    """
    teacher = teacher_logits.detach().float()
    z = student_logits.float()
    pseudo_label = (teacher >= 0).float()
    t = teacher / temperature if tempered_kl else teacher
    log_q, log_not_q = F.logsigmoid(t), F.logsigmoid(-t)
    log_p, log_not_p = F.logsigmoid(z), F.logsigmoid(-z)
    kl = log_q.exp() * (log_q - log_p) + log_not_q.exp() * (log_not_q - log_not_p)
    bce = F.binary_cross_entropy_with_logits(z, pseudo_label, reduction='none')
    return torch.mean(torch.exp(-kl) * bce) + torch.mean(kl)


def region_cosine_consistency(probabilities_a: torch.Tensor, probabilities_b: torch.Tensor) -> torch.Tensor:
    """L_reg for regions = mean_{v,k} (1 - cos((a, 1 - a), (b, 1 - b))),  a = p_A,v,k, b = p_B,v,k:

        cos = (a b + (1 - a)(1 - b)) / (sqrt(a^2 + (1 - a)^2) sqrt(b^2 + (1 - b)^2))

    the cosine of each region's two-class distribution (a softmax cosine over the channels would compare
    unrelated regions). No stop-gradient: both streams move."""
    a, b = probabilities_a.float(), probabilities_b.float()
    pair_a, pair_b = torch.stack((a, 1.0 - a)), torch.stack((b, 1.0 - b))
    return torch.mean(1.0 - F.cosine_similarity(pair_a, pair_b, dim=0, eps=1e-8))


def region_prototype_contrast_loss(embeddings: torch.Tensor, pseudo_label: torch.Tensor, reliable: torch.Tensor
                                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`prototype_contrast_loss` per region channel k with two classes (outside, inside region k), averaged:

        pull = (1/K) sum_k pull_k,   separation = (1/K) sum_k (2 - d(mu_k,in, mu_k,out))

    where channel k's prototypes mu_k,in / mu_k,out are the mean embeddings of the voxels reliable for region k
    (low entropy in channel k) with yhat_k = 1 / 0, and pull_k pulls the voxels uncertain for region k to the
    (detached) prototype of their side. ``pseudo_label``, ``reliable`` (B, K, *spatial) bool."""
    pulls, separations = [], []
    for k in range(pseudo_label.shape[1]):
        pull, separation = prototype_contrast_loss(embeddings, pseudo_label[:, k].long(), reliable[:, k], 2)
        pulls.append(pull)
        separations.append(separation)
    return torch.stack(pulls).mean(), torch.stack(separations).mean()


def region_ensemble_logits(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """logit((sigmoid(z_A) + sigmoid(z_B)) / 2) per region channel, computed stably:

        log m - log(1 - m) = logsumexp(logsigmoid(z_A), logsigmoid(z_B)) - logsumexp(logsigmoid(-z_A), logsigmoid(-z_B))

    (the log 2 of both means cancels). nnU-Net's predictor applies sigmoid and thresholds at 0.5 for region
    datasets; sigmoid of this is exactly the mean of the two streams' region probabilities."""
    a, b = logits_a.float(), logits_b.float()
    inside = torch.logsumexp(torch.stack((F.logsigmoid(a), F.logsigmoid(b))), 0)
    outside = torch.logsumexp(torch.stack((F.logsigmoid(-a), F.logsigmoid(-b))), 0)
    return inside - outside
