r"""DAFormer's network as a network of the reference pipeline: SegFormer's MiT encoder and DAFormer's decoder.

:class:`DAFormerNet` has the interface of :class:`uda.model.DeepLabV2` and ``TinySegNet``: ``model(images)`` with
images ``(B, 3, H, W)`` RGB in ``[0, 255]`` (uint8 or float) returns ``(logits, features)``, logits
``(B, K, h, w)`` and features ``(B, 256, h, w)`` at output stride 4 (``h = ceil(H / 4)``, up to the MiT's padded
patch embedding); ``feature_dim`` is D = 256 (the decoder's fused map, what a contrastive or prototype loss reads)
and ``param_groups(lr)`` gives the optimizer groups. ``features="projection"`` (``train_daformer.py
--contrast-features projection``, issue 33) returns SePiCo's projection of the encoder's stages instead
(:class:`ProjectionHead`, D = ``proj_dim``); the logits are the same network's. Input normalisation is SegFormer's and DAFormer's: RGB,
ImageNet mean (123.675, 116.28, 103.53) and std (58.395, 57.12, 57.375), as buffers of the model.

Modules are named as in a DAFormer checkpoint: ``backbone`` (:class:`uda.mit.MixVisionTransformer`, SegFormer's
``mit_b*.pth`` names) and ``decode_head`` (:class:`uda.daformer_head.DAFormerHead`). The network description
(:meth:`DAFormerNet.network_config`, saved as the state dict's ``_extra_state``) names the encoder (``arch``:
``"mit-b0"`` ... ``"mit-b5"``), the decoder (``"daformer-sepaspp"``), the features and D, the input
normalisation, K and the class names, so a checkpoint rebuilds its network (:meth:`DAFormerNet.for_state`,
``uda.weights.build_model_for``) and weights written for another network are refused naming both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .daformer_head import ConvBNReLU, DAFormerHead
from .mit import MIT_VARIANTS, build_mit
from .mit_weights import detect_mit_layout
from .model import _Normalized
from .network import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB
from .schedule import WEIGHT_DECAY, adamw_param_groups

DECODER = "daformer-sepaspp"
MIT_ARCHS = tuple(MIT_VARIANTS)  # "mit-b0" ... "mit-b5": the --arch names
FEATURES = ("fused", "projection")  # what the contrast reads: the decoder's fused map, or SePiCo's projection
PROJECTION_HIDDEN = 256  # SePiCo's projection head: 1x1 conv to 256 + BN + ReLU, then 1x1 conv to D


class ProjectionHead(nn.Module):
    r"""SePiCo's contrast projection (BIT-DA/SePiCo ``ProjHead``, rebuilt from its description, issue 33): the
    encoder's four stage maps bilinearly resized to stage 1's size (stride 4) and concatenated
    (:math:`C = \sum_i C_i`: 512 for MiT-B0, 1024 for B1...B5), then ``1x1 conv -> BN -> ReLU`` to 256 and a
    ``1x1 conv`` (with bias) to ``dim``. SePiCo L2-normalises the output; protocl's losses take cosines, so the
    norm is left to them.

    Shape:
        stages ``[(B, C_i, H/2^(i+2), W/2^(i+2))]`` -> ``(B, dim, H/4, W/4)``.
    """

    def __init__(self, in_channels: int, dim: int, hidden: int = PROJECTION_HIDDEN) -> None:
        super().__init__()
        self.hidden = ConvBNReLU(in_channels, hidden, 1)
        self.out = nn.Conv2d(hidden, dim, 1)

    def forward(self, stages: list[Tensor]) -> Tensor:
        size = stages[0].shape[-2:]
        maps = [stages[0]] + [F.interpolate(s, size=size, mode="bilinear", align_corners=False) for s in stages[1:]]
        return self.out(self.hidden(torch.cat(maps, dim=1)))


class DAFormerNet(_Normalized):
    r"""MiT-B0...B5 encoder + DAFormer's separable-ASPP decoder (see the module doc).

    Args:
        arch: the encoder, ``"mit-b0"`` ... ``"mit-b5"`` (DAFormer: ``"mit-b5"``).
        num_classes: K.
        drop_path: stochastic depth of the encoder's last block (DAFormer: 0.1; training only).
        dim: the decoder's embedding and fused channels (DAFormer: 256).
        features: the features ``forward`` returns: ``"fused"`` (the decoder's fused map, D = ``dim``) or
            ``"projection"`` (a :class:`ProjectionHead` on the encoder's stages, D = ``proj_dim``; SePiCo's
            contrast features, issue 33). The logits are the same network's either way.
        proj_dim: D of the projection (SePiCo: 512).

    Shape:
        images ``(B, 3, H, W)`` RGB in [0, 255] -> logits ``(B, K, h, w)``, features ``(B, D, h, w)``, h = ceil(H / 4).
    """

    def __init__(self, arch: str = "mit-b5", num_classes: int = 19, *, drop_path: float = 0.1,
                 dim: int = 256, features: str = "fused", proj_dim: int = 512) -> None:
        super().__init__()
        if arch not in MIT_VARIANTS:
            raise ValueError(f"expected arch {', '.join(MIT_ARCHS)}, got {arch!r}")
        if features not in FEATURES:
            raise ValueError(f"expected features {' or '.join(map(repr, FEATURES))}, got {features!r}")
        self._init_normalization(IMAGENET_MEAN_RGB, IMAGENET_STD_RGB, bgr=False)
        self.arch = arch
        self.num_classes = num_classes
        self.feature_source = features
        self.backbone = build_mit(arch, drop_path=drop_path)
        self.decode_head = DAFormerHead(self.backbone.out_channels, num_classes, embed_dim=dim, channels=dim)
        # named *_head: DAFormer's optimizer groups give it the decoder's 10x lr, as SePiCo's head has
        self.projection_head = (ProjectionHead(sum(self.backbone.out_channels), proj_dim)
                                if features == "projection" else None)
        self.feature_dim = proj_dim if features == "projection" else dim

    @classmethod
    def for_state(cls, state: dict[str, Tensor], network: dict | None = None) -> DAFormerNet:
        """The network a state dict of this class needs (keys without a prefix): the encoder from the description's
        ``arch``, else from the ``backbone.*`` shapes (:func:`uda.mit_weights.detect_mit_layout`); K and D from the
        classifier ``decode_head.conv_seg``. ``ValueError`` naming what the state holds otherwise."""
        seg = state.get("decode_head.conv_seg.weight")
        if seg is None or seg.ndim != 4:
            raise ValueError(f"expected a DAFormer decoder (decode_head.conv_seg.weight), got keys like "
                             f"{sorted(state)[:5]}")
        arch = (network or {}).get("arch")
        if arch not in MIT_VARIANTS:
            backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
            try:
                arch = detect_mit_layout(backbone)[1]
            except ValueError as error:
                raise ValueError(f"expected the backbone of a DAFormer network to be a MiT-B0...B5: {error}") from None
        proj = state.get("projection_head.out.weight")
        if proj is None:
            return cls(arch, int(seg.shape[0]), dim=int(seg.shape[1]))
        return cls(arch, int(seg.shape[0]), dim=int(seg.shape[1]), features="projection", proj_dim=int(proj.shape[0]))

    def network_config(self) -> dict:
        config = super().network_config()
        config.update(arch=self.arch, decoder=DECODER, features=self.feature_source, feature_dim=int(self.feature_dim))
        return config

    def forward(self, images: Tensor, *, encoder: bool = False) -> tuple[Tensor, ...]:
        """``(logits, features)`` (features: the fused map or the projection, see ``features``); ``encoder=True``
        adds the encoder's last stage map (stride 32: the feature distance's, through the module's own ``forward``
        so that DistributedDataParallel sees the call)."""
        stages = self.backbone(self.normalize(images))
        logits, features = self.decode_head(stages)
        if self.projection_head is not None:
            features = self.projection_head(stages)
        return (logits, features, stages[-1]) if encoder else (logits, features)

    def param_groups(self, lr: float, *, weight_decay: float | None = None) -> list[dict]:
        """DAFormer's parameter groups (:func:`uda.schedule.adamw_param_groups`): the decoder (``decode_head.*``) at
        ``10 * lr``, the encoder at ``lr``, no weight decay on the encoder's norms; each group has ``base_lr``.

        ``weight_decay=None`` (what ``uda.run.make_optimizer`` asks for): the decayed groups carry no
        ``weight_decay`` of their own, so the optimizer's applies (SGD's 5e-4 in ``train_gta2cs.py``), and no
        ``betas``; a float (DAFormer: 0.01, :data:`uda.schedule.WEIGHT_DECAY`): AdamW's groups as they are."""
        groups = adamw_param_groups(self, lr=lr, weight_decay=WEIGHT_DECAY if weight_decay is None else weight_decay)
        if weight_decay is None:
            for group in groups:
                del group["betas"]
                if group["weight_decay"] > 0:
                    del group["weight_decay"]
        return groups
