r"""SegFormer's Mix Transformer encoder (MiT-B0 ... MiT-B5) with DAFormer's settings, in plain PyTorch.

Written from SegFormer's ``mix_transformer.py`` (NVlabs/SegFormer, as copied into lhoyer/DAFormer) and the
SegFormer paper; nothing of it is reproduced. ``build_mit(name)(images)`` with images ``(B, 3, H, W)`` returns
the four stage maps ``[(B, C1, H/4, W/4), (B, C2, H/8, W/8), (B, C3, H/16, W/16), (B, C4, H/32, W/32)]`` (sizes
rounded up: each patch embedding is a padded strided convolution, ``out = floor((n + 2p - k) / s) + 1``).

Each stage is an overlapping patch embedding (7x7/4 for stage 1, 3x3/2 after, padding ``k // 2``, LayerNorm),
transformer blocks ``x + drop_path(attn(norm1(x)))``, ``x + drop_path(mlp(norm2(x)))`` and a LayerNorm. The
attention is SegFormer's efficient self-attention: keys and values come from the tokens reduced by a ``sr x sr``
stride-``sr`` convolution and a LayerNorm (stages with ``sr = 1`` have neither). The MLP is the Mix-FFN:
``fc1 -> 3x3 depthwise conv -> GELU -> fc2``. Settings (DAFormer's ``mit_b*``): heads (1, 2, 5, 8), sr ratios
(8, 4, 2, 1), MLP ratio 4, ``qkv_bias=True``, LayerNorm eps 1e-6 in the blocks and the stage norms and PyTorch's
default 1e-5 in the patch-embedding and spatial-reduction norms, stochastic depth rising linearly from 0 to
``drop_path`` (0.1) over all blocks, no dropout.

Parameter names are those of SegFormer's released ImageNet files ``mit_b*.pth`` (``patch_embed1.proj.weight``,
``block1.0.attn.kv.weight``, ``norm4.bias``, ...), which also hold the classifier ``head.*`` this encoder does not
have; :mod:`uda.mit_weights` loads those files and Hugging Face's ``nvidia/mit-b*``.

Differences from the reference code, none of which changes a result: attention through
:func:`torch.nn.functional.scaled_dot_product_attention` (same scale ``d ** -0.5``), and no dropout modules (the
reference builds them with probability 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

BLOCK_EPS = 1e-6  # block norms (norm1, norm2) and stage norms (norm1..norm4 of the encoder)
EMBED_EPS = 1e-5  # patch-embedding norms and spatial-reduction norms (the reference's nn.LayerNorm default)


@dataclass(frozen=True)
class MiTSpec:
    """One Mix Transformer: its name, embed dims and blocks per stage (the rest is shared by B0-B5)."""

    name: str
    dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    heads: tuple[int, int, int, int] = (1, 2, 5, 8)
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    mlp_ratio: int = 4

    @property
    def text(self) -> str:
        """E.g. ``MiT-B5 (depths (3,6,40,3), dims (64,128,320,512))``."""
        return f"{self.name} ({structure_text(self.depths, self.dims)})"


def structure_text(depths, dims) -> str:
    """``depths (3,6,40,3), dims (64,128,320,512)``: what a weights file shows of a MiT."""
    return f"depths ({','.join(map(str, depths))}), dims ({','.join(map(str, dims))})"


_WIDE = (64, 128, 320, 512)
MIT_VARIANTS: dict[str, MiTSpec] = {
    "mit-b0": MiTSpec("MiT-B0", (32, 64, 160, 256), (2, 2, 2, 2)),
    "mit-b1": MiTSpec("MiT-B1", _WIDE, (2, 2, 2, 2)),
    "mit-b2": MiTSpec("MiT-B2", _WIDE, (3, 4, 6, 3)),
    "mit-b3": MiTSpec("MiT-B3", _WIDE, (3, 4, 18, 3)),
    "mit-b4": MiTSpec("MiT-B4", _WIDE, (3, 8, 27, 3)),
    "mit-b5": MiTSpec("MiT-B5", _WIDE, (3, 6, 40, 3)),
}


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with probability ``p`` and scale the kept
    ones by ``1 / (1 - p)``; the identity in eval mode or when ``p == 0``."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p:.4f}"


class OverlapPatchEmbed(nn.Module):
    """A padded strided convolution to ``dim`` channels, flattened to tokens ``(B, h*w, dim)`` and normed."""

    def __init__(self, in_channels: int, dim: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel, stride=stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(dim, eps=EMBED_EPS)

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(rearrange(x, "b c h w -> b (h w) c")), h, w


class EfficientSelfAttention(nn.Module):
    """Multi-head attention whose keys and values come from the tokens reduced ``sr`` times per side."""

    def __init__(self, dim: int, heads: int, sr_ratio: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"expected dim divisible by heads, got dim {dim}, heads {heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=True)
        self.kv = nn.Linear(dim, 2 * dim, bias=True)  # rows: all keys (heads x head dim), then all values
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=EMBED_EPS)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        q = rearrange(self.q(x), "b n (k d) -> b k n d", k=self.heads)
        context = x
        if self.sr_ratio > 1:
            grid = self.sr(rearrange(x, "b (h w) c -> b c h w", h=h, w=w))
            context = self.norm(rearrange(grid, "b c h w -> b (h w) c"))
        k, v = rearrange(self.kv(context), "b n (two k d) -> two b k n d", two=2, k=self.heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out, "b k n d -> b n (k d)"))


class DWConv(nn.Module):
    """3x3 depthwise convolution on tokens laid out as an ``h x w`` grid (the Mix-FFN's position cue)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        grid = self.dwconv(rearrange(x, "b (h w) c -> b c h w", h=h, w=w))
        return rearrange(grid, "b c h w -> b (h w) c")


class MixFFN(nn.Module):
    """``fc1 -> depthwise 3x3 -> GELU -> fc2``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        return self.fc2(F.gelu(self.dwconv(self.fc1(x), h, w)))


class Block(nn.Module):
    """Pre-norm transformer block: efficient self-attention and Mix-FFN, each a residual with stochastic depth."""

    def __init__(self, dim: int, heads: int, sr_ratio: int, mlp_ratio: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_EPS)
        self.attn = EfficientSelfAttention(dim, heads, sr_ratio)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_EPS)
        self.mlp = MixFFN(dim, dim * mlp_ratio)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


class MixVisionTransformer(nn.Module):
    """The MiT encoder of ``spec``: ``forward(images) -> [stage1, stage2, stage3, stage4]`` (see the module doc).

    Modules are named as in SegFormer's release: ``patch_embed{s}``, ``block{s}`` (a ``ModuleList``) and
    ``norm{s}`` for stage ``s`` in 1..4. Weights start as SegFormer's from-scratch init (truncated normal 0.02 for
    linear layers, He normal on fan-out for convolutions, zero biases, unit LayerNorms).
    """

    def __init__(self, spec: MiTSpec, drop_path: float = 0.1) -> None:
        super().__init__()
        self.spec = spec
        total = sum(spec.depths)  # stochastic depth: one rate per block, 0 ... drop_path
        rates = [drop_path * i / max(total - 1, 1) for i in range(total)]
        in_channels, first = 3, 0
        for s, (dim, depth, heads, sr) in enumerate(zip(spec.dims, spec.depths, spec.heads, spec.sr_ratios), 1):
            kernel, stride = (7, 4) if s == 1 else (3, 2)
            setattr(self, f"patch_embed{s}", OverlapPatchEmbed(in_channels, dim, kernel, stride))
            setattr(self, f"block{s}", nn.ModuleList(
                Block(dim, heads, sr, spec.mlp_ratio, rates[first + i]) for i in range(depth)))
            setattr(self, f"norm{s}", nn.LayerNorm(dim, eps=BLOCK_EPS))
            in_channels, first = dim, first + depth
        self.apply(_init_weights)

    @property
    def out_channels(self) -> tuple[int, int, int, int]:
        """Channels of the four stage maps (the decoder's ``in_channels``)."""
        return self.spec.dims

    def stages(self) -> list[tuple[OverlapPatchEmbed, nn.ModuleList, nn.LayerNorm]]:
        """``(patch_embed, blocks, norm)`` of each stage, in order."""
        return [(getattr(self, f"patch_embed{s}"), getattr(self, f"block{s}"), getattr(self, f"norm{s}"))
                for s in range(1, 5)]

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for embed, blocks, norm in self.stages():
            tokens, h, w = embed(x)
            for block in blocks:
                tokens = block(tokens, h, w)
            x = rearrange(norm(tokens), "b (h w) c -> b c h w", h=h, w=w)
            outs.append(x)
        return outs


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, (2.0 / fan_out) ** 0.5)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_mit(name: str, drop_path: float = 0.1) -> MixVisionTransformer:
    """The encoder ``name`` (a key of :data:`MIT_VARIANTS`: ``"mit-b0"`` ... ``"mit-b5"``), randomly initialised;
    ``drop_path`` is the stochastic-depth rate of the last block (DAFormer: 0.1)."""
    if name not in MIT_VARIANTS:
        raise ValueError(f"expected a MiT variant ({', '.join(MIT_VARIANTS)}), got {name!r}")
    return MixVisionTransformer(MIT_VARIANTS[name], drop_path=drop_path)
