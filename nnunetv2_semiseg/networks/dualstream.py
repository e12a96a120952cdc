"""Two segmentation streams built from one nnU-Net plan, deployed as their ensemble.

* Stream A = the plans' ``PlainConvUNet`` (the paper's "V-Net").
* Stream B = its residual-encoder counterpart, ``ResidualEncoderUNet`` with the same stages, features, kernels and
  strides (the paper's "ResNet"). Default: one residual block (two convolutions, like the plain stage) per stage;
  ``'resenc_m'`` takes nnU-Net's ResEnc-M encoder block counts (1, 3, 4, 6, 6, ...).

``DualStreamNetwork.forward(x)`` returns log((softmax(z_A) + softmax(z_B)) / 2), so stock ``nnUNetv2_predict``
(softmax + argmax) predicts the averaged probabilities of both streams, as the released code's test does. For
region-based datasets (sigmoid outputs) it returns logit((sigmoid(z_A) + sigmoid(z_B)) / 2) instead; which of the
two is stored in the state dict (``region_ensemble``), so the predictor, which builds the network without the
dataset's labels, gets the right one when it loads the weights strictly. Training
code reaches each stream through ``forward(x, train_fn=...)`` (one call through DDP) and ``stream_a`` /
``stream_b``, each a :class:`SemiSegNetwork` with ``forward_with_features``.

The state dict keys are ``stream_a.<nnU-Net keys>`` and ``stream_b.<nnU-Net keys>``: :func:`stream_state_dict`
strips one prefix, and :func:`stream_plans` gives plans whose configuration builds that stream with stock nnU-Net,
so either stream can be exported as a plain nnU-Net model.
"""
import copy
import os
import re
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from nnunetv2_semiseg.losses.dualstream import ensemble_log_probabilities, region_ensemble_logits
from nnunetv2_semiseg.networks.semiseg_network import SemiSegNetwork

PLAIN_UNET = 'dynamic_network_architectures.architectures.unet.PlainConvUNet'
RESIDUAL_UNET = 'dynamic_network_architectures.architectures.unet.ResidualEncoderUNet'
# nnU-Net's ResEnc presets (nnUNetPlannerResEncM/L/XL): encoder blocks per stage, truncated to the plan's stages.
RESENC_M_BLOCKS = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)
STREAM_B_BLOCK_CHOICES = ('one', 'resenc_m')
STREAMS = ('A', 'B')


class UnsupportedArchitectureError(ValueError):
    pass


def stream_b_blocks(n_stages: int, blocks: str) -> List[int]:
    if blocks not in STREAM_B_BLOCK_CHOICES:
        raise ValueError(f'stream_b_blocks must be one of {STREAM_B_BLOCK_CHOICES}, got {blocks!r}')
    if blocks == 'one':
        return [1] * n_stages
    if n_stages > len(RESENC_M_BLOCKS):
        raise ValueError(f'ResEnc-M block counts are defined for up to {len(RESENC_M_BLOCKS)} stages, the plan has '
                         f'{n_stages}')
    return list(RESENC_M_BLOCKS[:n_stages])


def residual_counterpart_kwargs(plain_kwargs: dict, blocks_per_stage: Sequence[int]) -> dict:
    """``ResidualEncoderUNet`` kwargs with the plain U-Net's stages, features, kernels, strides, norm, nonlinearity
    and decoder; ``n_conv_per_stage`` becomes ``n_blocks_per_stage``."""
    kwargs = {k: v for k, v in plain_kwargs.items() if k != 'n_conv_per_stage'}
    kwargs['n_blocks_per_stage'] = list(blocks_per_stage)
    return kwargs


def stream_architectures(network_class_name: str, arch_kwargs: dict, blocks: str = 'one') -> Dict[str, tuple]:
    """{'A': (class name, kwargs), 'B': (class name, kwargs)} for a plan whose network is a PlainConvUNet."""
    if network_class_name.split('.')[-1] != 'PlainConvUNet':
        raise UnsupportedArchitectureError(
            f'nnUNetTrainerDualStream builds stream A from the plans\' PlainConvUNet and stream B as its residual '
            f'counterpart, but the plans name {network_class_name}. Train with the default nnUNetPlans (plain U-Net) '
            f'plans, e.g. `-p nnUNetPlans`.')
    blocks_per_stage = stream_b_blocks(int(arch_kwargs['n_stages']), blocks)
    return {'A': (PLAIN_UNET, dict(arch_kwargs)), 'B': (RESIDUAL_UNET, residual_counterpart_kwargs(arch_kwargs,
                                                                                                    blocks_per_stage))}


REGION_ENSEMBLE_KEY = 'region_ensemble'


class DualStreamNetwork(nn.Module):
    """Streams A and B; ``forward(x)`` is the deployed ensemble: log of the averaged softmax, or for region datasets
    the logit of the averaged sigmoids (:meth:`use_region_ensemble`)."""

    def __init__(self, stream_a: nn.Module, stream_b: nn.Module):
        super().__init__()
        self.stream_a = SemiSegNetwork(stream_a)
        self.stream_b = SemiSegNetwork(stream_b)
        self.heads = None  # no training-only heads: the contrast works on the decoders' own last features
        # The output layout is part of the weights: nnU-Net's predictor builds the network from the plans alone
        # (build_network_architecture never sees dataset.json), then loads network_weights strictly, which sets it.
        # A Python mirror keeps forward() free of a device sync.
        self.register_buffer(REGION_ENSEMBLE_KEY, torch.zeros((), dtype=torch.uint8))
        self._regions = False

    def use_region_ensemble(self, enabled: bool) -> None:
        """Ensemble sigmoid region outputs (True) or softmax class outputs (False, the default)."""
        self.region_ensemble.fill_(int(bool(enabled)))
        self._regions = bool(enabled)

    @property
    def regions(self) -> bool:
        return self._regions

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + REGION_ENSEMBLE_KEY
        if key not in state_dict:
            # weights saved before the layout was stored: those models were softmax-only
            state_dict[key] = torch.zeros((), dtype=torch.uint8)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._regions = bool(int(state_dict[key]))

    @property
    def streams(self) -> Dict[str, SemiSegNetwork]:
        return {'A': self.stream_a, 'B': self.stream_b}

    def set_deep_supervision(self, enabled: bool) -> None:
        self.stream_a.decoder.deep_supervision = enabled
        self.stream_b.decoder.deep_supervision = enabled

    def forward(self, x: torch.Tensor, train_fn: Optional[Callable] = None):
        if train_fn is not None:
            # Both streams' training passes inside ONE call, so DDP sees every parameter use.
            return train_fn(self, x)
        out_a, out_b = self.stream_a(x), self.stream_b(x)
        ensemble = region_ensemble_logits if self._regions else ensemble_log_probabilities
        if isinstance(out_a, (list, tuple)):
            return [ensemble(a, b) for a, b in zip(out_a, out_b)]
        return ensemble(out_a, out_b)

    def forward_streams(self, x: torch.Tensor) -> Dict[str, dict]:
        """{'A': forward_with_features of stream A, 'B': the same for stream B} (logits, last decoder features)."""
        return {'A': self.stream_a.forward_with_features(x), 'B': self.stream_b.forward_with_features(x)}


# ------------------------------------------------------------------------------------------------------------------
# Export of one stream as a plain nnU-Net model
# ------------------------------------------------------------------------------------------------------------------
STREAM_PREFIX = {'A': 'stream_a.', 'B': 'stream_b.'}


def is_dual_stream_state_dict(weights: dict) -> bool:
    return any(k.startswith(STREAM_PREFIX['A']) for k in weights) and \
        any(k.startswith(STREAM_PREFIX['B']) for k in weights)


def stream_state_dict(weights: dict, stream: str) -> dict:
    """The weights of one stream under stock nnU-Net keys (``stream_a.encoder.x`` -> ``encoder.x``)."""
    if stream not in STREAMS:
        raise ValueError(f'stream must be one of {STREAMS}, got {stream!r}')
    if not is_dual_stream_state_dict(weights):
        raise ValueError('These weights are not a DualStreamNetwork state dict (no stream_a.* / stream_b.* keys); '
                         'only nnUNetTrainerDualStream models have streams to choose from.')
    prefix = STREAM_PREFIX[stream]
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def residual_blocks_in_state_dict(weights: dict) -> List[int]:
    """Blocks per encoder stage of stream B, counted from its keys (``encoder.stages.<s>.blocks.<b>.``)."""
    counts: Dict[int, int] = {}
    for key in stream_state_dict(weights, 'B'):
        match = re.match(r'encoder\.stages\.(\d+)\.blocks\.(\d+)\.', key)
        if match:
            s, b = int(match.group(1)), int(match.group(2))
            counts[s] = max(counts.get(s, 0), b + 1)
    return [counts[s] for s in sorted(counts)]


def stream_plans(plans: dict, configuration: str, stream: str, weights: dict) -> dict:
    """A copy of ``plans`` whose ``configuration`` builds ``stream`` with stock nnU-Net.

    Stream A is the plans' own network (unchanged plans). Stream B gets a ResidualEncoderUNet architecture with the
    plan's stages and the block counts found in ``weights``. The configuration is resolved through nnU-Net's
    ``inherits_from`` so the architecture written is the one the configuration actually uses.
    """
    if stream not in STREAMS:
        raise ValueError(f'stream must be one of {STREAMS}, got {stream!r}')
    plans = copy.deepcopy(plans)
    if stream == 'A':
        return plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    architecture = PlansManager(plans).get_configuration(configuration).configuration['architecture']
    stream_architectures(architecture['network_class_name'], architecture['arch_kwargs'])  # same check as training
    kwargs = residual_counterpart_kwargs(architecture['arch_kwargs'], residual_blocks_in_state_dict(weights))
    plans['configurations'][configuration]['architecture'] = {
        'network_class_name': RESIDUAL_UNET, 'arch_kwargs': kwargs,
        '_kw_requires_import': list(architecture['_kw_requires_import'])}
    return plans


def select_stream_for_export(plain: dict, model_copy: str, stream: Optional[str]) -> Optional[str]:
    """For ``nnUNetv2_semiseg_export_plain``: keep one stream of a dual-stream checkpoint.

    ``plain`` is the export's checkpoint dict (its ``network_weights`` are replaced by the stream's, under stock
    keys); ``model_copy`` the export's folder holding copies of ``plans.json`` / ``dataset.json``, whose plans are
    rewritten for stream B (a ResidualEncoderUNet). ``stream`` None means A. Returns the stream exported, or None
    for a model without streams; asking for a stream of such a model is an error.
    """
    import json
    weights = plain['network_weights']
    if not is_dual_stream_state_dict(weights):
        if stream is not None:
            raise ValueError(f'--stream {stream} was given, but this model has a single network (it was trained with '
                             f'{plain.get("exported_from_trainer")}, not nnUNetTrainerDualStream): drop --stream.')
        return None
    stream = stream or 'A'
    plans_file = os.path.join(model_copy, 'plans.json')
    with open(plans_file) as f:
        plans = json.load(f)
    plans = stream_plans(plans, plain['init_args']['configuration'], stream, weights)
    with open(plans_file, 'w') as f:
        json.dump(plans, f, indent=4)
    plain['network_weights'] = stream_state_dict(weights, stream)
    plain['exported_stream'] = stream
    return stream
