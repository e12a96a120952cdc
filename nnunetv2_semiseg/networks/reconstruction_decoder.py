"""SFPC's auxiliary reconstruction decoder G_2 (methods.md §4.1, §4.6): a second U-Net decoder on the shared
encoder's skips that outputs as many channels as the input (a linear 1x1 convolution at full resolution).

It is nnU-Net's own ``UNetDecoder`` built from the student's encoder with the segmentation decoder's number of
convolutions per stage, minus two things that would break training or the state dict: the low-resolution output
layers (deep supervision is off, so they would never get a gradient and DDP without ``find_unused_parameters``
would fail) and the back-reference to the encoder (it would duplicate every encoder weight under the decoder's
keys). It lives in ``network.heads`` (trained with the student, never called at inference, dropped by the plain
export).
"""
from typing import List, Optional

import torch
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from torch import nn


def input_channels_of(encoder: nn.Module) -> int:
    """Number of input channels of an nnU-Net encoder (its first convolution's ``in_channels``)."""
    for module in encoder.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return module.in_channels
    raise ValueError(f'{type(encoder).__name__} has no convolution: cannot tell its number of input channels')


class ReconstructionDecoder(nn.Module):
    """``convs_per_stage``: None = as many convolution blocks per stage as the segmentation decoder (SFPC's "same
    U-Net shape"); an int makes a lighter decoder (e.g. 1: about a third less work for the decoder)."""

    def __init__(self, base_network: nn.Module, convs_per_stage: Optional[int] = None):
        super().__init__()
        encoder, segmentation_decoder = base_network.encoder, base_network.decoder
        if convs_per_stage is None:
            convs_per_stage: List[int] = [len(stage.convs) for stage in segmentation_decoder.stages]
        decoder = UNetDecoder(encoder, input_channels_of(encoder), convs_per_stage, deep_supervision=False)
        del decoder.encoder                                    # shared encoder: keep its weights in one place
        decoder.seg_layers = nn.ModuleList([decoder.seg_layers[-1]])   # only the full-resolution output is used
        self.decoder = decoder

    def forward(self, skips: List[torch.Tensor]) -> torch.Tensor:
        """The reconstruction of the input patch from the encoder skips, (B, C_in, *patch)."""
        return self.decoder(skips)
