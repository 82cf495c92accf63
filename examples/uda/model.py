r"""Segmentation networks of the reference pipeline.

Both networks share one interface: ``model(images)`` with images ``(B, 3, H, W)`` float RGB in ``[0, 255]``
returns ``(logits, features)``, logits ``(B, K, h, w)`` and contrast features ``(B, D, h, w)`` on the same
h×w grid (output stride 8 for DeepLab-V2, 4 for the tiny CNN). Input normalisation (mean subtraction) lives
in the model as buffers, so it always matches the weights that were loaded.

* :class:`DeepLabV2` — ResNet-101 with dilated layer3/layer4 (output stride 8), frozen BatchNorm and the
  ASPP-v2 classifier (four 3×3 convolutions, dilation 6/12/18/24, outputs summed). Contrast features are the
  four branch outputs concatenated (``D = 4K``), as in the authors' release; ``features="layer4"`` uses the
  layer4 output through a 1×1 projection instead.
* :class:`TinySegNet` — a small CNN with the same interface and the same ASPP-style head, for the embedded
  demo and the tests.

What changes the computation without changing a parameter's shape (stride placement, channel order, mean/std,
the contrast-feature choice, K) is the model's :meth:`network_config`, saved with the weights as the state dict's
``_extra_state``: a plain ``load_state_dict`` of weights written for another network raises
:class:`NetworkMismatchError` naming both networks (style rule 21). Initial weights (ImageNet ResNet-101 files
and the field's DeepLab-V2 checkpoints, detected from their structure) are read by :mod:`uda.weights`; nothing
is ever downloaded.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .network import (
    IMAGENET_MEAN_RGB,
    IMAGENET_STD_RGB,
    LAYOUTS,
    NETWORK_VERSION,
    layout_of,
    legacy_network,
    mismatch_error,
    network_differences,
)

class FrozenBatchNorm2d(nn.Module):
    r"""BatchNorm2d with fixed statistics and affine parameters (buffers, never trained).

    The state-dict keys (``weight``, ``bias``, ``running_mean``, ``running_var``) match ``nn.BatchNorm2d``;
    a ``num_batches_tracked`` entry is accepted and dropped.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * rearrange(scale, "c -> 1 c 1 1") + rearrange(shift, "c -> 1 c 1 1")

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class Bottleneck(nn.Module):
    """ResNet bottleneck; ``stride_in_1x1`` puts the stride on conv1 (caffe/DeepLab) instead of conv2."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, dilation: int, stride_in_1x1: bool) -> None:
        super().__init__()
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=s1, bias=False)
        self.bn1 = FrozenBatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=s3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = FrozenBatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = FrozenBatchNorm2d(planes * 4)
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), FrozenBatchNorm2d(planes * 4)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet101Dilated(nn.Module):
    """ResNet-101 trunk with dilated layer3 (2) and layer4 (4): output stride 8, 2048 channels."""

    def __init__(self, *, stride_in_1x1: bool = False, blocks: tuple[int, ...] = (3, 4, 23, 3)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        inplanes = 64
        layers = []
        for planes, n, stride, dilation in zip((64, 128, 256, 512), blocks, (1, 2, 1, 1), (1, 1, 2, 4)):
            mods = []
            for i in range(n):
                mods.append(Bottleneck(inplanes, planes, stride if i == 0 else 1, dilation, stride_in_1x1))
                inplanes = planes * 4
            layers.append(nn.Sequential(*mods))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers

    @property
    def stride_in_1x1(self) -> bool:
        return self.layer2[0].conv1.stride != (1, 1)

    def set_stride_in_1x1(self, stride_in_1x1: bool) -> None:
        """Move each stage's stride (only layer2 has one) to conv1 (1x1, caffe) or conv2 (3x3, torchvision), in
        place: no parameter changes shape, so the parameters, the optimizer and a DDP wrapper stay valid."""
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            block = layer[0]
            stride = block.downsample[0].stride if block.downsample is not None else (1, 1)
            block.conv1.stride, block.conv2.stride = (stride, (1, 1)) if stride_in_1x1 else ((1, 1), stride)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class ASPPV2(nn.Module):
    r"""DeepLab-V2 classifier: parallel dilated 3×3 convolutions whose outputs are summed.

    Returns ``(logits, features)``: logits ``(B, K, h, w)`` = sum of the branches, features
    ``(B, len(dilations)·K, h, w)`` = the branch outputs concatenated (the release's contrast features).
    """

    def __init__(self, in_channels: int, num_classes: int, dilations: tuple[int, ...] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d, bias=True) for d in dilations
        )
        for conv in self.branches:
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        outs = [conv(x) for conv in self.branches]
        return torch.stack(outs).sum(0), torch.cat(outs, dim=1)


class _Normalized(nn.Module):
    """Base class holding the input normalisation, x (RGB, 0..255) -> (x[perm] - mean) / std, and the network
    description that travels with the weights.

    ``mean`` and ``std`` are buffers (they follow ``.to()``); the channel order ``bgr`` and a host copy of mean
    and std are plain Python values, so :meth:`normalize` and :meth:`network_config` never read a device tensor
    (a buffer read would cost one device-to-host sync). :meth:`network_config` travels in the state dict as extra
    state (``_extra_state = {"network": ...}``); loading a state dict compares it with this model's and raises
    :class:`NetworkMismatchError` naming both when they differ. Older checkpoints (a ``bgr`` extra state or
    buffer, no description) are read with the description they imply: the pipeline put the stride on the 1x1 conv
    exactly when it used BGR input (the DeepLab init layout).
    """

    class_names: tuple[str, ...] | None = None

    def _init_normalization(self, mean: tuple[float, ...], std: tuple[float, ...], bgr: bool) -> None:
        self.register_buffer("pixel_mean", rearrange(torch.tensor(mean), "c -> 1 c 1 1"))
        self.register_buffer("pixel_std", rearrange(torch.tensor(std), "c -> 1 c 1 1"))
        self._mean, self._std, self.bgr = tuple(map(float, mean)), tuple(map(float, std)), bool(bgr)

    def set_normalization(self, mean: tuple[float, ...], std: tuple[float, ...], bgr: bool) -> None:
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"expected 3 mean and 3 std values, got mean {tuple(mean)}, std {tuple(std)}")
        # in the buffers' own dtype: a float64 model keeps the constants' float64 values
        self.pixel_mean.copy_(rearrange(torch.tensor(mean, dtype=self.pixel_mean.dtype), "c -> 1 c 1 1"))
        self.pixel_std.copy_(rearrange(torch.tensor(std, dtype=self.pixel_std.dtype), "c -> 1 c 1 1"))
        self._mean, self._std, self.bgr = tuple(map(float, mean)), tuple(map(float, std)), bool(bgr)

    def network_config(self) -> dict:
        """What this network computes beyond its parameter shapes (plain values: saved with every checkpoint)."""
        config = {"version": NETWORK_VERSION, "channels": "bgr" if self.bgr else "rgb", "mean": list(self._mean),
                  "std": list(self._std), "num_classes": int(self.num_classes)}
        if self.class_names is not None:
            config["classes"] = list(self.class_names)
        return config

    def apply_network(self, network: dict) -> None:
        """Take the stride placement and input convention of a saved description, in place; the rest (arch,
        features, K, classes) must already agree: :class:`NetworkMismatchError` naming both otherwise."""
        own = self.network_config()
        differing = [k for k in network_differences(network, own) if k not in ("stride", "channels", "mean", "std")]
        if differing:
            raise mismatch_error("the weights", network, own, differing)
        self._apply_layout_fields(network)

    def _apply_layout_fields(self, network: dict) -> None:
        if "channels" in network:
            self.set_normalization(network.get("mean", self._mean), network.get("std", self._std),
                                   bgr=network["channels"] == "bgr")

    def get_extra_state(self) -> dict:
        return {"network": self.network_config()}

    def set_extra_state(self, state: dict) -> None:
        network = state.get("network") if isinstance(state, dict) else None
        if network is None:  # an older checkpoint: {"bgr": bool}
            self.bgr = bool(state["bgr"])
            return
        self._mean, self._std = tuple(map(float, network["mean"])), tuple(map(float, network["std"]))
        self.bgr = network["channels"] == "bgr"

    def _saved_network(self, state_dict: dict, prefix: str) -> dict | None:
        """The description of the network ``state_dict`` was written for, or None when it says nothing."""
        extra = state_dict.get(prefix + "_extra_state")
        if isinstance(extra, dict) and isinstance(extra.get("network"), dict):
            return extra["network"]
        return legacy_network(state_dict, prefix, arch=self.network_config().get("arch"))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = self._saved_network(state_dict, prefix)
        if saved is not None:
            own = self.network_config()
            differing = network_differences(saved, own)
            if differing:
                raise mismatch_error("the state dict", saved, own, differing, hint=(
                    "Build the network the weights need (uda.weights.build_model_for / apply_network) or load "
                    "them through uda.weights"))
        legacy = state_dict.pop(prefix + "bgr", None)  # checkpoints written when ``bgr`` was a buffer
        if legacy is not None and prefix + "_extra_state" not in state_dict:
            state_dict[prefix + "_extra_state"] = {"bgr": bool(legacy)}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if saved is not None and "mean" in saved:
            self._mean, self._std = tuple(map(float, saved["mean"])), tuple(map(float, saved["std"]))

    def normalize(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        images = images.float()
        if self.bgr:
            images = images.flip(1)
        return (images - self.pixel_mean) / self.pixel_std


class DeepLabV2(_Normalized):
    r"""DeepLab-V2 ResNet-101 (output stride 8) with the ASPP-v2 classifier and frozen BatchNorm.

    Args:
        num_classes: K.
        features: ``"aspp"`` (contrast features = the four ASPP branch outputs, D = 4K) or ``"layer4"``
            (layer4 output through a 1×1 projection to ``proj_dim`` channels).
        proj_dim: D for ``features="layer4"``.
        stride_in_1x1: stride on the first 1×1 conv of a block (caffe/DeepLab init layout) instead of the 3×3
            (:meth:`set_layout` switches it, and the input normalisation, in place).
        blocks: bottlenecks per stage ((3, 4, 23, 3) = ResNet-101; fewer in tests).

    Shape:
        images ``(B, 3, H, W)`` RGB in [0, 255] -> logits ``(B, K, h, w)``, features ``(B, D, h, w)`` with
        h = ceil(H / 8) (up to the ceil-mode max-pool).
    """

    def __init__(
        self,
        num_classes: int = 19,
        *,
        features: Literal["aspp", "layer4"] = "aspp",
        proj_dim: int = 256,
        stride_in_1x1: bool = False,
        blocks: tuple[int, ...] = (3, 4, 23, 3),
    ) -> None:
        super().__init__()
        if features not in ("aspp", "layer4"):
            raise ValueError(f"expected features 'aspp' or 'layer4', got {features!r}")
        self._init_normalization(IMAGENET_MEAN_RGB, IMAGENET_STD_RGB, bgr=False)
        self.num_classes = num_classes
        self.feature_source = features
        self.backbone = ResNet101Dilated(stride_in_1x1=stride_in_1x1, blocks=blocks)
        self.classifier = ASPPV2(2048, num_classes)
        self.projection = nn.Conv2d(2048, proj_dim, 1) if features == "layer4" else None
        self.feature_dim = 4 * num_classes if features == "aspp" else proj_dim
        self.blocks = tuple(int(b) for b in blocks)

    def network_config(self) -> dict:
        config = super().network_config()
        config.update(arch="deeplabv2", blocks=list(self.blocks),
                      stride="1x1" if self.backbone.stride_in_1x1 else "3x3", features=self.feature_source,
                      proj_dim=int(self.projection.out_channels) if self.projection is not None else None)
        config["layout"] = layout_of(config)
        return config

    @property
    def layout(self) -> str | None:
        """"torchvision" or "deeplab" when stride placement and input convention are one of those, else None."""
        return layout_of(self.network_config())

    def set_layout(self, layout: str) -> None:
        """Switch stride placement and input normalisation to a named layout (:data:`LAYOUTS`), in place."""
        if layout not in LAYOUTS:
            raise ValueError(f"expected layout 'torchvision' or 'deeplab', got {layout!r}")
        spec = LAYOUTS[layout]
        self.backbone.set_stride_in_1x1(spec["stride"] == "1x1")
        self.set_normalization(spec["mean"], spec["std"], bgr=spec["channels"] == "bgr")

    def _apply_layout_fields(self, network: dict) -> None:
        super()._apply_layout_fields(network)
        if "stride" in network:
            self.backbone.set_stride_in_1x1(network["stride"] == "1x1")

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = self.backbone(self.normalize(images))
        logits, branch_features = self.classifier(x)
        features = branch_features if self.projection is None else self.projection(x)
        return logits, features

    def param_groups(self, lr: float) -> list[dict]:
        """SGD groups: backbone at ``lr``, classifier (and projection) at ``10 * lr``."""
        head = list(self.classifier.parameters())
        if self.projection is not None:
            head += list(self.projection.parameters())
        return [
            {"params": list(self.backbone.parameters()), "lr": lr, "base_lr": lr},
            {"params": head, "lr": 10 * lr, "base_lr": 10 * lr},
        ]


class TinySegNet(_Normalized):
    r"""A small CNN with DeepLab-V2's interface (output stride 4, ASPP-style head, D = 4K).

    Used by the embedded demo and the tests; GroupNorm instead of BatchNorm so train and eval agree.
    """

    def __init__(self, num_classes: int = 19, *, width: int = 32) -> None:
        super().__init__()
        self._init_normalization(IMAGENET_MEAN_RGB, IMAGENET_STD_RGB, bgr=False)
        self.num_classes = num_classes
        self.feature_source = "aspp"

        def block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
                nn.GroupNorm(8, cout),
                nn.ReLU(inplace=True),
            )

        w = width
        self.backbone = nn.Sequential(
            block(3, w, stride=2), block(w, w), block(w, 2 * w, stride=2), block(2 * w, 2 * w),
            block(2 * w, 2 * w, dilation=2), block(2 * w, 2 * w, dilation=4),
        )
        self.classifier = ASPPV2(2 * w, num_classes, dilations=(1, 2, 4, 8))
        self.projection = None
        self.feature_dim = 4 * num_classes
        self.width = width

    def network_config(self) -> dict:
        config = super().network_config()
        config.update(arch="tiny", width=int(self.width), features="aspp")
        return config

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.classifier(self.backbone(self.normalize(images)))

    def param_groups(self, lr: float) -> list[dict]:
        """SGD groups: backbone at ``lr``, classifier at ``10 * lr``."""
        return [
            {"params": list(self.backbone.parameters()), "lr": lr, "base_lr": lr},
            {"params": list(self.classifier.parameters()), "lr": 10 * lr, "base_lr": 10 * lr},
        ]
