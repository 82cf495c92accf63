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

Weights come from :func:`load_init` (a local file; nothing is ever downloaded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from . import checkpoint

IMAGENET_MEAN_RGB = (123.675, 116.28, 103.53)  # torchvision weights: (x / 255 - mean) / std
IMAGENET_STD_RGB = (58.395, 57.12, 57.375)
CAFFE_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)  # DeepLab init weights: BGR, mean only


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
    """Base class holding the input normalisation: x (RGB, 0..255) -> (x[perm] - mean) / std.

    ``mean`` and ``std`` are buffers (they follow ``.to()``); the channel order ``bgr`` is a plain Python bool,
    so :meth:`normalize` branches on the host without reading a device tensor (a buffer would cost one
    device-to-host sync per forward). It travels in the state dict as extra state (``_extra_state``); a legacy
    ``bgr`` buffer entry of older checkpoints is read back as well.
    """

    def _init_normalization(self, mean: tuple[float, ...], std: tuple[float, ...], bgr: bool) -> None:
        self.register_buffer("pixel_mean", rearrange(torch.tensor(mean), "c -> 1 c 1 1"))
        self.register_buffer("pixel_std", rearrange(torch.tensor(std), "c -> 1 c 1 1"))
        self.bgr = bool(bgr)

    def set_normalization(self, mean: tuple[float, ...], std: tuple[float, ...], bgr: bool) -> None:
        self.pixel_mean.copy_(rearrange(torch.tensor(mean), "c -> 1 c 1 1"))
        self.pixel_std.copy_(rearrange(torch.tensor(std), "c -> 1 c 1 1"))
        self.bgr = bool(bgr)

    def get_extra_state(self) -> dict:
        return {"bgr": self.bgr}

    def set_extra_state(self, state: dict) -> None:
        self.bgr = bool(state["bgr"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        legacy = state_dict.pop(prefix + "bgr", None)  # checkpoints written when ``bgr`` was a buffer
        if legacy is not None and prefix + "_extra_state" not in state_dict:
            state_dict[prefix + "_extra_state"] = {"bgr": bool(legacy)}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
        stride_in_1x1: stride on the first 1×1 conv of a block (caffe/DeepLab init layout) instead of the 3×3.

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

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.classifier(self.backbone(self.normalize(images)))

    def param_groups(self, lr: float) -> list[dict]:
        """SGD groups: backbone at ``lr``, classifier at ``10 * lr``."""
        return [
            {"params": list(self.backbone.parameters()), "lr": lr, "base_lr": lr},
            {"params": list(self.classifier.parameters()), "lr": 10 * lr, "base_lr": 10 * lr},
        ]


def build_model(arch: str, num_classes: int, *, features: str = "aspp", proj_dim: int = 256,
                init: str | None = None) -> nn.Module:
    """Build ``arch`` ("deeplabv2" or "tiny") and load ``init`` weights when given."""
    if arch == "tiny":
        if init is not None:
            raise ValueError(f"expected no --init for arch 'tiny' (it trains from scratch), got {init!r}")
        return TinySegNet(num_classes)
    if arch != "deeplabv2":
        raise ValueError(f"expected arch 'deeplabv2' or 'tiny', got {arch!r}")
    if init is None:
        return DeepLabV2(num_classes, features=features, proj_dim=proj_dim)
    state, layout = read_init(init)
    model = DeepLabV2(num_classes, features=features, proj_dim=proj_dim, stride_in_1x1=layout == "deeplab")
    load_backbone(model, state, layout, source=init)
    return model


_HEAD_PREFIXES = {"torchvision": ("fc.",), "deeplab": ("layer5.", "fc.")}


def read_init(path: str | Path) -> tuple[dict[str, Tensor], str]:
    """Read an ImageNet ResNet-101 checkpoint and detect its layout ("torchvision" or "deeplab").

    torchvision layout: ``conv1.weight``, ``bn1.*``, ``layer{1..4}.*``, ``fc.*``. DeepLab init layout
    (the release's ``DeepLab_resnet_pretrained_init``): the same names under one prefix (``Scale.``),
    a ``layer5`` classifier that is skipped, BGR input with caffe mean and stride in the first 1×1 conv.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"expected --init to be a ResNet-101 checkpoint file, got {str(path)!r} (not a file)")
    state = checkpoint.load(path, "--init")  # weights_only=True; a refused or unreadable file is a named ValueError
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        raise ValueError(f"expected --init {str(path)!r} to hold a state dict, got {type(state).__name__}")
    if "conv1.weight" in state:
        return dict(state), "torchvision"
    prefixes = {k.split(".", 1)[0] for k in state if "." in k}
    if len(prefixes) == 1 and f"{next(iter(prefixes))}.conv1.weight" in state:
        prefix = next(iter(prefixes)) + "."
        return {k[len(prefix):]: v for k, v in state.items()}, "deeplab"
    sample = sorted(state)[:5]
    raise ValueError(
        f"expected --init {str(path)!r} in torchvision ResNet-101 layout (conv1.weight, layer1.0.conv1.weight, ...) "
        f"or DeepLab init layout (Scale.conv1.weight, ...), got keys like {sample}"
    )


def load_backbone(model: DeepLabV2, state: dict[str, Tensor], layout: str, *, source: str = "init") -> None:
    """Load backbone weights; raise ``ValueError`` naming missing, unexpected or mis-shaped keys."""
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    state = {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES[layout])}
    own = model.backbone.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mis_shaped = sorted(
        f"{k}: expected {tuple(own[k].shape)}, got {tuple(state[k].shape)}"
        for k in set(own) & set(state) if own[k].shape != state[k].shape
    )
    if missing or unexpected or mis_shaped:
        raise ValueError(
            f"expected {source!r} ({layout} layout) to match the ResNet-101 backbone; "
            f"missing keys ({len(missing)}): {missing[:10]}; unexpected keys ({len(unexpected)}): {unexpected[:10]}; "
            f"shape mismatches ({len(mis_shaped)}): {mis_shaped[:5]}"
        )
    model.backbone.load_state_dict(state)
    if layout == "deeplab":
        model.set_normalization(CAFFE_MEAN_BGR, (1.0, 1.0, 1.0), bgr=True)
    else:
        model.set_normalization(IMAGENET_MEAN_RGB, IMAGENET_STD_RGB, bgr=False)
