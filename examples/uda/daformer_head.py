r"""DAFormer's decoder (``DAFormerHead`` with the ``daformer_sepaspp`` context-aware fusion), in plain PyTorch.

Written from DAFormer's ``daformer_head.py``, ``aspp_head.py``, ``sep_aspp_head.py`` and the config
``configs/_base_/models/daformer_sepaspp_mitb5.py`` (lhoyer/DAFormer) and mmcv's ``ConvModule`` /
``DepthwiseSeparableConvModule``; nothing of them is reproduced. ``head(stages)`` with the encoder's four maps
(strides 4, 8, 16, 32) returns ``(logits, features)``: logits ``(B, K, H/4, W/4)`` and the fused features
``(B, 256, H/4, W/4)`` (the ASPP bottleneck output, before dropout: what a contrastive or prototype loss reads).

1. Embedding: each stage map through a linear layer over its channels (a 1x1 projection, no norm, no
   activation) to ``embed_dim`` (256), then bilinearly resized to stage 1's size (``align_corners=False``).
2. The four embeddings concatenated (1024 channels) and fused by a depthwise-separable ASPP without an
   image-pooling branch: dilation 1 is a 1x1 conv + BN + ReLU; dilations 6, 12, 18 are each a depthwise 3x3
   dilated conv + BN + ReLU followed by a pointwise 1x1 conv + BN + ReLU; the four branch outputs (256 each)
   concatenated and a 3x3 bottleneck conv to 256 + BN + ReLU. Convolutions followed by BN have no bias.
3. Channel dropout (``nn.Dropout2d``, p = 0.1, mmseg's ``BaseDecodeHead``) and a 1x1 classifier with bias.

Module names follow DAFormer's, so a ``decode_head.*`` state dict of a DAFormer checkpoint (prefix removed)
has the same keys and shapes: ``embed_layers.{i}.proj``, ``fuse_layer.aspp_modules.0.{conv,bn}``,
``fuse_layer.aspp_modules.{1,2,3}.{depthwise_conv,pointwise_conv}.{conv,bn}``, ``fuse_layer.bottleneck.{conv,bn}``,
``conv_seg``. Initialisation follows mmcv/mmseg: He normal (fan-out, ReLU) for the convolutions, unit BN,
``N(0, 0.01)`` for the classifier, PyTorch's default for the linear embeddings.

Differences from DAFormer, none of which changes a result: ReLUs are not in place; the embedding is a linear
layer on channels-last maps instead of on flattened tokens (the same computation); the forward also returns the
fused features. Plain ``nn.BatchNorm2d`` (DAFormer's config: ``BN``; convert with
``nn.SyncBatchNorm.convert_sync_batchnorm`` for multi-GPU training).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


class ConvBNReLU(nn.Module):
    """``conv (no bias) -> BatchNorm -> ReLU`` (mmcv's ``ConvModule`` with a BN norm and a ReLU)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, *, dilation: int = 1,
                 groups: int = 1) -> None:
        super().__init__()
        padding = dilation * (kernel // 2)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, padding=padding, dilation=dilation, groups=groups,
                              bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


class SeparableConvBNReLU(nn.Module):
    """Depthwise ``k x k`` (dilated) conv + BN + ReLU, then pointwise 1x1 conv + BN + ReLU (mmcv's
    ``DepthwiseSeparableConvModule``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, dilation: int) -> None:
        super().__init__()
        self.depthwise_conv = ConvBNReLU(in_channels, in_channels, kernel, dilation=dilation, groups=in_channels)
        self.pointwise_conv = ConvBNReLU(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


class SeparableASPP(nn.Module):
    """Depthwise-separable ASPP without image pooling, branches concatenated, 3x3 bottleneck (DAFormer's
    ``ASPPWrapper`` with ``sep=True, pool=False``)."""

    def __init__(self, in_channels: int, channels: int, dilations: Sequence[int] = (1, 6, 12, 18)) -> None:
        super().__init__()
        self.aspp_modules = nn.ModuleList(
            ConvBNReLU(in_channels, channels, 1) if d == 1 else SeparableConvBNReLU(in_channels, channels, 3, d)
            for d in dilations)
        self.bottleneck = ConvBNReLU(len(dilations) * channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.bottleneck(torch.cat([branch(x) for branch in self.aspp_modules], dim=1))


class LinearEmbed(nn.Module):
    """A linear layer over the channels of a map (SegFormer's ``MLP``): ``(B, C, h, w) -> (B, D, h, w)``."""

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_channels, dim)

    def forward(self, x: Tensor) -> Tensor:
        return rearrange(self.proj(rearrange(x, "b c h w -> b h w c")), "b h w c -> b c h w")


class DAFormerHead(nn.Module):
    """DAFormer's decoder: see the module doc. ``in_channels`` are the encoder's
    (:attr:`uda.mit.MixVisionTransformer.out_channels`)."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, *, embed_dim: int = 256, channels: int = 256,
                 dilations: Sequence[int] = (1, 6, 12, 18), dropout: float = 0.1) -> None:
        super().__init__()
        self.embed_layers = nn.ModuleList(LinearEmbed(c, embed_dim) for c in in_channels)
        self.fuse_layer = SeparableASPP(len(in_channels) * embed_dim, channels, dilations)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, 0.0, 0.01)
        nn.init.zeros_(self.conv_seg.bias)

    @property
    def num_classes(self) -> int:
        return self.conv_seg.out_channels

    def forward(self, stages: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        if len(stages) != len(self.embed_layers):
            raise ValueError(f"expected {len(self.embed_layers)} stage maps, got {len(stages)}")
        size = stages[0].shape[-2:]
        embedded = []
        for embed, x in zip(self.embed_layers, stages):
            y = embed(x)
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            embedded.append(y)
        features = self.fuse_layer(torch.cat(embedded, dim=1))
        return self.conv_seg(self.dropout(features)), features
