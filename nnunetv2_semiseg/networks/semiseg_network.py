"""Training-time wrapper around a stock nnU-Net network.

Why a wrapper: semi-supervised methods need the decoder's last feature map and small heads trained with the
student, but ``nnUNetv2_predict`` rebuilds the network with the trainer's ``build_network_architecture`` and loads
``checkpoint['network_weights']`` strictly, then calls ``network(x)``. The wrapper therefore

* keeps ``encoder`` / ``decoder`` under their stock names, so the stock part of the state dict has nnU-Net's keys
  (the plain export only has to drop ``heads.*``);
* returns plain logits from ``forward(x)``;
* exposes training-only outputs behind keyword arguments of the *same* call, so DDP and ``torch.compile``
  wrappers see every parameter use.
"""
from typing import Callable, Dict, Optional

import torch
from torch import nn


class ComponentHeads(nn.ModuleDict):
    """``network.heads`` when several components of one trainer have training heads: one entry per component
    (``heads.<heads_key>.*`` in the state dict). A single component's heads are ``network.heads`` itself, so a
    one-component trainer (e.g. SS-Net: ``heads.projector.*``) keeps its keys when other trainers combine it."""


def combine_heads(heads_by_key: Dict[str, Optional[nn.Module]]) -> Optional[nn.Module]:
    """None without heads, the module itself for one component, :class:`ComponentHeads` for several."""
    present = {k: m for k, m in heads_by_key.items() if m is not None}
    if not present:
        return None
    if len(present) == 1:
        return next(iter(present.values()))
    return ComponentHeads(present)


class SemiSegNetwork(nn.Module):
    def __init__(self, base_network: nn.Module, heads: Optional[nn.Module] = None):
        super().__init__()
        # Registered as direct children so the state dict keys are 'encoder.*' and 'decoder.*' as in nnU-Net.
        self.encoder = base_network.encoder
        self.decoder = base_network.decoder
        self.heads = heads

    def forward(self, x: torch.Tensor, return_features: bool = False, train_fn: Optional[Callable] = None):
        if train_fn is not None:
            # Lets a trainer run several passes (main, adversarial, heads) inside ONE call through DDP.
            return train_fn(self, x)
        if return_features:
            return self.forward_with_features(x)
        return self.decoder(self.encoder(x))

    def forward_with_features(self, x: torch.Tensor) -> dict:
        """One encoder/decoder pass returning logits and the full-resolution last decoder features.

        Re-implements the ten-line ``UNetDecoder.forward`` loop over the decoder's own submodules (it has no hook
        returning features), so parameters and outputs are identical to ``self.decoder(skips)``. The last stage's
        convolution blocks run one by one (``StackedConvBlocks.forward`` is ``self.convs(x)``), which also exposes
        ``'penultimate'``: the input of the last stage's last convolution block, i.e. the output of its second-last
        block (SFPC's "second-last conv layer"), or, for plans with one block per decoder stage, the stage's input
        (upsampled features concatenated with the skip); the input of :meth:`last_stage_head`.
        """
        skips = self.encoder(x)
        decoder = self.decoder
        num_stages = len(decoder.stages)
        lower_res = skips[-1]
        seg_outputs = []
        features = None
        for s in range(num_stages):
            h = decoder.transpconvs[s](lower_res)
            h = torch.cat((h, skips[-(s + 2)]), 1)
            if s == num_stages - 1 and hasattr(decoder.stages[s], 'convs'):
                # with a single block per stage convs[:-1] is empty: the feature is that block's input
                penultimate = decoder.stages[s].convs[:-1](h)
                h = decoder.stages[s].convs[-1](penultimate)
            else:
                h = decoder.stages[s](h)
                penultimate = None
            if decoder.deep_supervision:
                seg_outputs.append(decoder.seg_layers[s](h))
            elif s == num_stages - 1:
                seg_outputs.append(decoder.seg_layers[-1](h))
            lower_res = h
            features = h
        seg_outputs = seg_outputs[::-1]
        seg = seg_outputs if decoder.deep_supervision else seg_outputs[0]
        return {'seg': seg, 'features': features, 'skips': skips, 'penultimate': penultimate}

    def last_stage_head(self, penultimate: torch.Tensor) -> torch.Tensor:
        """Full-resolution logits from a penultimate feature: the last convolution block of the last decoder stage
        and its segmentation layer (what the perturbed FLPM branches re-run)."""
        decoder = self.decoder
        return decoder.seg_layers[-1](decoder.stages[-1].convs[-1](penultimate))

    def full_resolution_logits(self, x: torch.Tensor) -> torch.Tensor:
        out = self.decoder(self.encoder(x))
        return out[0] if isinstance(out, (list, tuple)) else out
