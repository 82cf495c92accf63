r"""DAFormer's network as a network of the reference pipeline: SegFormer's MiT encoder and DAFormer's decoder.

:class:`DAFormerNet` has the interface of :class:`uda.model.DeepLabV2` and ``TinySegNet``: ``model(images)`` with
images ``(B, 3, H, W)`` RGB in ``[0, 255]`` (uint8 or float) returns ``(logits, features)``, logits
``(B, K, h, w)`` and features ``(B, 256, h, w)`` at output stride 4 (``h = ceil(H / 4)``, up to the MiT's padded
patch embedding); ``feature_dim`` is D = 256 (the decoder's fused map, what a contrastive or prototype loss reads)
and ``param_groups(lr)`` gives the optimizer groups. Input normalisation is SegFormer's and DAFormer's: RGB,
ImageNet mean (123.675, 116.28, 103.53) and std (58.395, 57.12, 57.375), as buffers of the model.

Modules are named as in a DAFormer checkpoint: ``backbone`` (:class:`uda.mit.MixVisionTransformer`, SegFormer's
``mit_b*.pth`` names) and ``decode_head`` (:class:`uda.daformer_head.DAFormerHead`). The network description
(:meth:`DAFormerNet.network_config`, saved as the state dict's ``_extra_state``) names the encoder (``arch``:
``"mit-b0"`` ... ``"mit-b5"``), the decoder (``"daformer-sepaspp"``), the features and D, the input
normalisation, K and the class names, so a checkpoint rebuilds its network (:meth:`DAFormerNet.for_state`,
``uda.weights.build_model_for``) and weights written for another network are refused naming both.
"""

from __future__ import annotations

from torch import Tensor

from .daformer_head import DAFormerHead
from .mit import MIT_VARIANTS, build_mit
from .mit_weights import detect_mit_layout
from .model import _Normalized
from .network import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB
from .schedule import WEIGHT_DECAY, adamw_param_groups

DECODER = "daformer-sepaspp"
MIT_ARCHS = tuple(MIT_VARIANTS)  # "mit-b0" ... "mit-b5": the --arch names


class DAFormerNet(_Normalized):
    r"""MiT-B0...B5 encoder + DAFormer's separable-ASPP decoder (see the module doc).

    Args:
        arch: the encoder, ``"mit-b0"`` ... ``"mit-b5"`` (DAFormer: ``"mit-b5"``).
        num_classes: K.
        drop_path: stochastic depth of the encoder's last block (DAFormer: 0.1; training only).
        dim: D, the decoder's embedding and fused channels (DAFormer: 256).

    Shape:
        images ``(B, 3, H, W)`` RGB in [0, 255] -> logits ``(B, K, h, w)``, features ``(B, D, h, w)``, h = ceil(H / 4).
    """

    def __init__(self, arch: str = "mit-b5", num_classes: int = 19, *, drop_path: float = 0.1,
                 dim: int = 256) -> None:
        super().__init__()
        if arch not in MIT_VARIANTS:
            raise ValueError(f"expected arch {', '.join(MIT_ARCHS)}, got {arch!r}")
        self._init_normalization(IMAGENET_MEAN_RGB, IMAGENET_STD_RGB, bgr=False)
        self.arch = arch
        self.num_classes = num_classes
        self.feature_source = "fused"
        self.backbone = build_mit(arch, drop_path=drop_path)
        self.decode_head = DAFormerHead(self.backbone.out_channels, num_classes, embed_dim=dim, channels=dim)
        self.feature_dim = dim

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
        return cls(arch, int(seg.shape[0]), dim=int(seg.shape[1]))

    def network_config(self) -> dict:
        config = super().network_config()
        config.update(arch=self.arch, decoder=DECODER, features=self.feature_source, feature_dim=int(self.feature_dim))
        return config

    def forward(self, images: Tensor, *, encoder: bool = False) -> tuple[Tensor, ...]:
        """``(logits, features)``; ``encoder=True`` adds the encoder's last stage map (stride 32: the feature
        distance's, through the module's own ``forward`` so that DistributedDataParallel sees the call)."""
        stages = self.backbone(self.normalize(images))
        logits, features = self.decode_head(stages)
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
