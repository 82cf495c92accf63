r"""DAFormer's mixing and strong augmentation for the mean-teacher step, in plain PyTorch (no mmcv, no kornia).

Three parts, each a pure function:

* :func:`class_mix_masks`: ClassMix masks (DACS/DAFormer ``get_class_masks``): per source image, half of the
  label values present (rounded up) are chosen uniformly at random; the mask is 1 where a pixel's label is
  chosen. Computed on the labels' device without a host synchronisation (no ``torch.unique``, ``nonzero``,
  ``.item()`` or boolean indexing), so a CUDA step never waits on it.
* :func:`mix`: ``mask * source + (1 - mask) * target`` for images, label maps and per-pixel weights.
* :func:`strong_transform`: DAFormer's ``color_jitter`` + ``gaussian_blur`` on a normalised batch: the colour
  jitter of kornia 0.5.8 (the version DAFormer pins) and its blur rule, written here with torch operations.

Random decisions and parameters of :func:`strong_transform` come from a Python :class:`random.Random` (host
side, never a device read); the mask draw of :func:`class_mix_masks` from ``torch.rand`` on the labels' device.
Neither reproduces DAFormer's stream of numbers (it mixes Python's, numpy's and torch's global generators), only
its distribution.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

NUM_LABEL_VALUES = 256  # label maps are 8-bit: train ids 0..K-1 and the ignore id 255
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")  # kornia's indices 0..3 into ``order``
HSV_EPS = 1e-6  # kornia's rgb_to_hsv: s = (max - min) / (max + eps)
BLUR_SIGMA = (0.15, 1.15)  # DAFormer's gaussian_blur: sigma ~ U(0.15, 1.15)


# ---------------------------------------------------------------------------------------------------- ClassMix
def _as_label_map(labels: Tensor, name: str = "labels") -> Tensor:
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name}: expected a Tensor, got {type(labels).__name__}")
    if labels.dim() == 4 and labels.shape[1] == 1:  # mmseg's gt_semantic_seg (B, 1, H, W): a view
        labels = labels[:, 0]
    if labels.dim() != 3:
        raise ValueError(f"{name}: expected a label map (B, H, W) or (B, 1, H, W), got shape {tuple(labels.shape)}")
    if labels.dtype != torch.long:
        raise ValueError(f"{name}: expected dtype torch.int64, got {labels.dtype}")
    return labels


def class_mix_masks(labels: Tensor, *, generator: torch.Generator | None = None,
                    classes_from: Literal["image", "batch"] = "image", dtype: torch.dtype = torch.float32
                    ) -> Tensor:
    r"""ClassMix masks: for each source label map, half of its label values (rounded up) are chosen uniformly
    at random, and the mask is 1 where the pixel's label is chosen.

    With n label values present, ``ceil(n / 2)`` of them are chosen, every such subset equally likely (DAFormer
    draws ``np.random.choice(n, (n + n % 2) / 2, replace=False)`` over ``torch.unique`` of the labels). As in
    DAFormer and DACS, the values are those of the label map **including the ignore id 255** when it occurs:
    255 counts in n and may be chosen, pasting the source's unlabelled pixels (which stay 255 in the mixed
    labels). Value sets come from ``classes_from``:

    * ``"image"`` (default; DACS and ClassMix: ``torch.unique(labels[i])``): the values present in image ``i``.
    * ``"batch"`` (DAFormer's code as released: ``get_class_masks`` calls ``torch.unique(labels)`` on the whole
      batch inside its per-image loop): the values present anywhere in the batch, the same set for every
      image; a chosen value absent from image ``i`` adds nothing to its mask, so an image may get an empty
      (or full) mask.

    Computed without a host synchronisation: the values present form a ``(B, 256)`` indicator (a
    ``scatter_add_`` of ones), each present value gets a uniform score from ``torch.rand(generator=...)``
    (absent values score 2, above every draw), and the chosen values are those whose rank among the scores is
    below ``ceil(n / 2)``. Ranks of i.i.d. uniform scores are a uniform random permutation, so the chosen
    subset is uniform over all ``ceil(n / 2)``-subsets of the present values, and exactly ``ceil(n / 2)`` are
    chosen whatever ties occur. The same ``generator`` state gives the same masks.

    Shape:
        - labels: :math:`(B, H, W)` or :math:`(B, 1, H, W)`, int64, values in ``[0, 255]`` (train ids and 255).
          Values outside raise on CPU; on CUDA the scatter's device-side bounds check fails (no check that
          reads the values back is made there).
        - output: :math:`(B, 1, H, W)` of ``dtype``, 1 where the source is pasted.

    Args:
        labels: the source label maps.
        generator: the ``torch.Generator`` for the scores, on the labels' device (``None``: the global one).
        classes_from: ``"image"`` or ``"batch"``, see above.
        dtype: the masks' floating dtype.
    """
    labels = _as_label_map(labels)
    if classes_from not in ("image", "batch"):
        raise ValueError(f"classes_from: expected 'image' or 'batch', got {classes_from!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype: expected a floating dtype, got {dtype}")
    if labels.device.type == "cpu" and labels.numel() and (labels.min() < 0 or labels.max() >= NUM_LABEL_VALUES):
        raise ValueError(f"labels: expected values in [0, {NUM_LABEL_VALUES - 1}], got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    b = labels.shape[0]
    flat = labels.reshape(b, -1)
    counts = torch.zeros(b, NUM_LABEL_VALUES, dtype=torch.long, device=labels.device)
    counts.scatter_add_(1, flat, torch.ones_like(flat))
    if classes_from == "batch":
        counts = counts.sum(0, keepdim=True).expand(b, -1)
    present = counts > 0
    n = present.sum(1, keepdim=True)  # (B, 1)
    scores = torch.rand(b, NUM_LABEL_VALUES, generator=generator, device=labels.device)
    scores = torch.where(present, scores, torch.full_like(scores, 2.0))
    rank = scores.argsort(1).argsort(1)  # rank of each value's score in its row: a uniform permutation
    chosen = present & (rank < (n + 1) // 2)  # the ceil(n / 2) present values with the smallest scores
    return chosen.gather(1, flat).reshape(labels.shape).unsqueeze(1).to(dtype)


def mix(mask: Tensor, source: Tensor, target: Tensor) -> Tensor:
    r"""Paste ``source`` over ``target`` where ``mask`` is set: ``mask * source + (1 - mask) * target``.

    Images (floating, :math:`(B, C, H, W)`) take the formula in their own dtype (the mask is cast to it; a
    fractional mask blends). Label maps and other integer or bool tensors (:math:`(B, H, W)`) take
    ``torch.where(mask != 0, source, target)``, which for DAFormer's 0/1 masks is its integer formula exactly,
    and keep their dtype (int64 labels stay int64). Floating per-pixel maps :math:`(B, H, W)` (DAFormer mixes
    its ``gt_pixel_weight`` and ``pseudo_weight`` so) take the formula.

    Shape:
        - mask: :math:`(B, 1, H, W)` (from :func:`class_mix_masks`).
        - source, target: the same shape, :math:`(B, C, H, W)` or :math:`(B, H, W)`, same dtype and device.
        - output: that shape and dtype.

    Args:
        mask: the paste mask, 1 = source.
        source: what is pasted (the source image or its labels).
        target: what it is pasted on (the target image or its pseudo-labels).
    """
    for name, t in (("mask", mask), ("source", source), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a Tensor, got {type(t).__name__}")
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask: expected shape (B, 1, H, W), got {tuple(mask.shape)}")
    if source.shape != target.shape:
        raise ValueError(f"target: expected the shape of source {tuple(source.shape)}, got {tuple(target.shape)}")
    if source.dtype != target.dtype:
        raise ValueError(f"target: expected the dtype of source {source.dtype}, got {target.dtype}")
    if source.dim() == 4:
        m = mask
    elif source.dim() == 3:
        m = mask[:, 0]
    else:
        raise ValueError(f"source: expected shape (B, C, H, W) or (B, H, W), got {tuple(source.shape)}")
    if source.shape[0] != mask.shape[0] or source.shape[-2:] != mask.shape[-2:]:
        raise ValueError(f"mask: expected shape ({source.shape[0]}, 1, {source.shape[-2]}, {source.shape[-1]}) "
                         f"to match source {tuple(source.shape)}, got {tuple(mask.shape)}")
    if source.is_floating_point() or source.is_complex():
        m = m.to(source.dtype)
        return m * source + (1 - m) * target
    return torch.where(m != 0, source, target)


# ------------------------------------------------------------------------------------------ colour jitter ops
def _check_rgb(images: Tensor, name: str = "images") -> None:
    if not isinstance(images, Tensor):
        raise TypeError(f"{name}: expected a Tensor, got {type(images).__name__}")
    if images.dim() < 3 or images.shape[-3] != 3:
        raise ValueError(f"{name}: expected shape (..., 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name}: expected a floating dtype, got {images.dtype}")


def rgb_to_hsv(images: Tensor, eps: float = HSV_EPS) -> Tensor:
    r"""RGB in [0, 1] to HSV, kornia 0.5.8's formulas: ``v = max``, ``d = max - min``, ``s = d / (v + eps)``,
    ``h = 2π · ((x / d / 6) mod 1)`` with ``x = g - b``, ``2d + b - r`` or ``4d + r - g`` where the max
    is r, g or b (the first of them on ties); ``d = 0`` gives ``h = 0`` (and ``s = 0``): no NaN anywhere.

    Shape:
        - images: :math:`(..., 3, H, W)` floating, RGB.
        - output: :math:`(..., 3, H, W)`: h in :math:`[0, 2π)`, s and v in [0, 1] for inputs in [0, 1].
    """
    _check_rgb(images)
    r, g, b = images.unbind(-3)
    v, _ = images.max(-3)
    d = v - images.min(-3).values
    s = d / (v + eps)
    d1 = torch.where(d == 0, torch.ones_like(d), d)
    x = torch.where(r == v, g - b, torch.where(g == v, 2 * d1 + b - r, 4 * d1 + r - g))
    h = 2 * math.pi * torch.remainder(x / d1 / 6, 1.0)
    return torch.stack((h, s, v), -3)


def hsv_to_rgb(images: Tensor) -> Tensor:
    r"""HSV (h in radians, any real value; s, v in [0, 1]) to RGB, kornia 0.5.8's formulas: with
    ``u = 6h / 2π``, ``i = floor(u) mod 6``, ``f = (u mod 6) - i``, ``p = v(1 - s)``, ``q = v(1 - fs)``,
    ``t = v(1 - (1 - f)s)``, sector i gives (r, g, b) = (v,t,p), (q,v,p), (p,v,t), (p,q,v), (t,p,v), (v,p,q).

    Shape:
        - images: :math:`(..., 3, H, W)` floating, HSV.
        - output: :math:`(..., 3, H, W)`, RGB.
    """
    _check_rgb(images)
    h, s, v = images.unbind(-3)
    u = h / (2 * math.pi) * 6
    i = torch.remainder(torch.floor(u), 6.0)
    f = torch.remainder(u, 6.0) - i  # kornia's pairing: a u mod 6 rounded up to 6.0 gives f = 1, not sector 6
    i = i.long()
    p = v * (1 - s)
    q = v * (1 - f * s)
    t = v * (1 - (1 - f) * s)
    table = torch.stack((v, q, p, p, t, v,    # r for sectors 0..5
                         t, v, v, q, p, p,    # g
                         p, p, t, v, v, q), -3)  # b
    index = torch.stack((i, i + 6, i + 12), -3)
    return table.gather(-3, index)


def adjust_brightness(images: Tensor, shift: float) -> Tensor:
    r"""kornia 0.5.8's brightness: ``clamp(x + shift, 0, 1)`` (additive; ColorJitter passes ``factor - 1``).

    Shape:
        - images: :math:`(..., C, H, W)` floating in [0, 1]; output the same.
    """
    return (images + shift).clamp(0.0, 1.0)


def adjust_contrast(images: Tensor, factor: float) -> Tensor:
    r"""kornia 0.5.8's contrast: ``clamp(x · factor, 0, 1)`` (a scaling; not torchvision's blend with the
    mean grey).

    Shape:
        - images: :math:`(..., C, H, W)` floating in [0, 1]; output the same.
    """
    if factor < 0:
        raise ValueError(f"factor: expected a non-negative contrast factor, got {factor}")
    return (images * factor).clamp(0.0, 1.0)


def adjust_saturation(images: Tensor, factor: float) -> Tensor:
    r"""kornia 0.5.8's saturation: in HSV (:func:`rgb_to_hsv`), ``s ← clamp(s · factor, 0, 1)``, back to RGB
    (not torchvision's blend with the greyscale image).

    Shape:
        - images: :math:`(..., 3, H, W)` floating RGB in [0, 1]; output the same.
    """
    h, s, v = rgb_to_hsv(images).unbind(-3)
    return hsv_to_rgb(torch.stack((h, (s * factor).clamp(0.0, 1.0), v), -3))


def adjust_hue(images: Tensor, radians: float) -> Tensor:
    r"""kornia 0.5.8's hue: in HSV (:func:`rgb_to_hsv`), ``h ← fmod(h + radians, 2π)``, back to RGB
    (ColorJitter passes ``hue_factor · 2π``).

    Shape:
        - images: :math:`(..., 3, H, W)` floating RGB in [0, 1]; output the same.
    """
    h, s, v = rgb_to_hsv(images).unbind(-3)
    return hsv_to_rgb(torch.stack((torch.fmod(h + radians, 2 * math.pi), s, v), -3))


def color_jitter(images: Tensor, *, brightness: float, contrast: float, saturation: float, hue: float,
                 order: Sequence[int] = (0, 1, 2, 3)) -> Tensor:
    r"""One image's colour jitter with given parameters: kornia 0.5.8's ``ColorJitter.apply_transform``.

    The four ops run in ``order`` (indices into :data:`JITTER_OPS`: 0 :func:`adjust_brightness` with shift
    ``brightness - 1``, 1 :func:`adjust_contrast` with ``contrast``, 2 :func:`adjust_saturation` with
    ``saturation``, 3 :func:`adjust_hue` with ``hue · 2π`` radians).

    Shape:
        - images: :math:`(..., 3, H, W)` floating RGB in [0, 1]; output the same.

    Args:
        images: the image(s), all given the same parameters.
        brightness, contrast, saturation: factors, 1 = unchanged.
        hue: the hue shift in turns, 0 = unchanged.
        order: a permutation of 0..3.
    """
    if sorted(order) != [0, 1, 2, 3]:
        raise ValueError(f"order: expected a permutation of 0..3, got {list(order)}")
    ops = (lambda x: adjust_brightness(x, brightness - 1.0), lambda x: adjust_contrast(x, contrast),
           lambda x: adjust_saturation(x, saturation), lambda x: adjust_hue(x, hue * 2 * math.pi))
    for k in order:
        images = ops[k](images)
    return images


def sample_jitter_parameters(strength: float, rng: random.Random) -> dict:
    r"""One image's colour-jitter parameters, kornia 0.5.8's ``ColorJitter(s, s, s, s)`` ranges: brightness
    factor ~ U(max(0, 1 - s), min(2, 1 + s)), contrast and saturation ~ U(max(0, 1 - s), 1 + s), hue ~
    U(max(-0.5, -s), min(0.5, s)) turns, order a uniform permutation of the four ops. Returns the keyword
    arguments of :func:`color_jitter`."""
    if strength < 0:
        raise ValueError(f"strength: expected a non-negative colour-jitter strength, got {strength}")
    lo = max(0.0, 1.0 - strength)
    params = {"brightness": rng.uniform(lo, min(2.0, 1.0 + strength)),
              "contrast": rng.uniform(lo, 1.0 + strength),
              "saturation": rng.uniform(lo, 1.0 + strength),
              "hue": rng.uniform(max(-0.5, -strength), min(0.5, strength))}
    params["order"] = rng.sample(range(4), 4)
    return params


# ------------------------------------------------------------------------------------------------------- blur
def blur_kernel_size(n: int) -> int:
    r"""DAFormer's Gaussian kernel size for a side of ``n`` pixels: ``floor(ceil(0.1 n) - 0.5 + ceil(0.1 n) mod
    2)``, the largest odd integer not above ``ceil(0.1 n)`` (512 → 51, 720 → 71, 1024 → 103), computed with
    DAFormer's float expression."""
    k = math.ceil(0.1 * n)
    return int(math.floor(k - 0.5 + k % 2))


def gaussian_kernel1d(size: int, sigma: float, *, dtype: torch.dtype = torch.float32,
                      device: torch.device | str | None = None) -> Tensor:
    r"""kornia's ``gaussian(size, sigma)``: ``exp(-x² / 2σ²)`` at ``x = i - size // 2`` (+ 0.5 for an even
    size), normalised to sum 1. Built on ``device`` from Python scalars (no host-to-device copy).

    Shape:
        - output: :math:`(size,)`.
    """
    if size < 1:
        raise ValueError(f"size: expected a positive kernel size, got {size}")
    if not sigma > 0:
        raise ValueError(f"sigma: expected a positive sigma, got {sigma}")
    x = torch.arange(size, dtype=dtype, device=device) - size // 2 + (0.5 if size % 2 == 0 else 0.0)
    g = torch.exp(-x.pow(2) / (2 * sigma**2))
    return g / g.sum()


def gaussian_blur(images: Tensor, sigma: float | Sequence[float], *,
                  kernel_size: tuple[int, int] | None = None) -> Tensor:
    r"""Gaussian blur as kornia's ``GaussianBlur2d(kernel_size, (σ, σ))``: a separable kernel
    (:func:`gaussian_kernel1d` along each axis), ``reflect`` padding (no edge repeat), per channel.

    Shape:
        - images: :math:`(B, C, H, W)` floating.
        - output: the same.

    Args:
        images: the batch.
        sigma: one σ for the batch, or one per image.
        kernel_size: ``(ky, kx)``, odd; default DAFormer's rule :func:`blur_kernel_size` of H and W.
    """
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images: expected a floating Tensor (B, C, H, W), got "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    b, c, h, w = images.shape
    sigmas = [float(sigma)] * b if isinstance(sigma, (int, float)) else [float(s) for s in sigma]
    if len(sigmas) != b:
        raise ValueError(f"sigma: expected one value or {b} (one per image), got {len(sigmas)}")
    ky, kx = kernel_size if kernel_size is not None else (blur_kernel_size(h), blur_kernel_size(w))
    if ky % 2 == 0 or kx % 2 == 0 or ky < 1 or kx < 1:
        raise ValueError(f"kernel_size: expected positive odd sizes, got {(ky, kx)}")
    if ky // 2 >= h or kx // 2 >= w:
        raise ValueError(f"kernel_size: expected a half-size below the image size {(h, w)}, got {(ky, kx)}")
    x = images.reshape(1, b * c, h, w)
    kw = dict(dtype=images.dtype, device=images.device)
    if ky > 1:
        wy = torch.stack([gaussian_kernel1d(ky, s, **kw) for s in sigmas]).repeat_interleave(c, 0)
        x = F.conv2d(F.pad(x, (0, 0, ky // 2, ky // 2), mode="reflect"), wy.view(b * c, 1, ky, 1), groups=b * c)
    if kx > 1:
        wx = torch.stack([gaussian_kernel1d(kx, s, **kw) for s in sigmas]).repeat_interleave(c, 0)
        x = F.conv2d(F.pad(x, (kx // 2, kx // 2, 0, 0), mode="reflect"), wx.view(b * c, 1, 1, kx), groups=b * c)
    return x.reshape(b, c, h, w)


# ------------------------------------------------------------------------------------------ strong transform
def _channel_vector(values: Sequence[float] | Tensor, like: Tensor, name: str) -> Tensor:
    if isinstance(values, Tensor):
        if values.numel() != 3:
            raise ValueError(f"{name}: expected 3 values (R, G, B), got {values.numel()}")
        return values.to(device=like.device, dtype=like.dtype).reshape(1, 3, 1, 1)
    values = [float(v) for v in values]
    if len(values) != 3:
        raise ValueError(f"{name}: expected 3 values (R, G, B), got {len(values)}")
    # filled on the device from Python scalars: torch.tensor(list, device=cuda) would be a blocking copy
    return torch.cat([like.new_full((1,), v) for v in values]).reshape(1, 3, 1, 1)


def strong_transform(images: Tensor, *, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor,
                     color_jitter_strength: float = 0.2, color_jitter_p: float = 0.2, blur: bool = True,
                     rng: random.Random | None = None) -> Tensor:
    r"""DAFormer's strong augmentation of the mixed images (``strong_transform`` less the mix): colour jitter,
    then Gaussian blur, on a normalised batch.

    Decisions, as DAFormer's ``DACS.forward_train`` draws them (``strong_parameters``, once per step):

    * colour jitter runs on the whole batch when ``u > color_jitter_p`` with ``u ~ U(0, 1)``: with DAFormer's
      ``color_jitter_probability=0.2`` it runs with probability **0.8** (the name notwithstanding;
      ``color_jitter_p=1`` never jitters, ``0`` always does). It denormalises (``x · std + mean) / 255``,
      jitters each image with its own :func:`sample_jitter_parameters` (kornia draws factors and order per
      call, and DAFormer calls it per image), and renormalises ``(x · 255 - mean) / std``.
    * blur (with ``blur=True``) runs on the whole batch when ``u' > 0.5``, ``u' ~ U(0, 1)``; each image gets
      its own σ ~ U(0.15, 1.15) (DAFormer draws it per call, per image) and the kernel
      :func:`blur_kernel_size` of H and W, applied to the normalised image as DAFormer does (the same as
      blurring before renormalising, up to rounding: the kernel sums to 1 and padding is linear).

    Draw order from ``rng``: u, u' (only with ``blur``), then per image the jitter parameters (when jittering)
    and σ (when blurring). Pixels outside [0, 1] after denormalising are clamped only by the jitter ops (as in
    kornia); without jitter the values pass untouched.

    Shape:
        - images: :math:`(B, 3, H, W)` floating, normalised RGB.
        - output: the same shape, dtype and device. float16/bfloat16 are jittered in float32.

    Args:
        images: the (mixed) batch.
        mean, std: per-channel normalisation on the 0-255 scale (the pipeline's, e.g. ImageNet's
            (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)).
        color_jitter_strength: kornia's ``ColorJitter(s, s, s, s)``.
        color_jitter_p: DAFormer's ``color_jitter_probability`` (the *skip* threshold, see above).
        blur: whether blur may run (DAFormer's ``blur=True``).
        rng: the host-side generator for every decision and parameter (``None``: a generator seeded from
            Python's global ``random``, so ``random.seed`` makes runs repeat).
    """
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected a Tensor (B, 3, H, W), got "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    if not images.is_floating_point():
        raise ValueError(f"images: expected a floating dtype, got {images.dtype}")
    if not 0.0 <= color_jitter_p <= 1.0:
        raise ValueError(f"color_jitter_p: expected a value in [0, 1], got {color_jitter_p}")
    if color_jitter_strength < 0:
        raise ValueError(f"color_jitter_strength: expected a non-negative strength, got {color_jitter_strength}")
    if rng is None:
        rng = random.Random(random.getrandbits(64))
    jitter = rng.uniform(0.0, 1.0) > color_jitter_p
    blurring = blur and rng.uniform(0.0, 1.0) > 0.5
    out = images
    sigmas = []
    work_dtype = torch.float32 if images.dtype in (torch.float16, torch.bfloat16) else images.dtype
    if jitter:
        x = images.to(work_dtype)
        m, s = _channel_vector(mean, x, "mean"), _channel_vector(std, x, "std")
        x = (x * s + m) / 255.0
        jittered = []
        for i in range(images.shape[0]):
            jittered.append(color_jitter(x[i], **sample_jitter_parameters(color_jitter_strength, rng)))
            if blurring:
                sigmas.append(rng.uniform(*BLUR_SIGMA))
        out = ((torch.stack(jittered) * 255.0 - m) / s).to(images.dtype)
    elif blurring:
        sigmas = [rng.uniform(*BLUR_SIGMA) for _ in range(images.shape[0])]
    if blurring:
        out = gaussian_blur(out, sigmas)
    return out
