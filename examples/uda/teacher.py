r"""DAFormer's mean teacher and the recipe's target-side losses, as pure functions on device tensors.

Written from DAFormer's ``mmseg/models/uda/dacs.py`` and ``mmseg/utils/utils.py`` (lhoyer/DAFormer, the
``gta2cs_uda_warm_fdthings_rcs_croppl_a999_daformer_mitb5`` config) and MIC's ``masking_transforms.py``
(lhoyer/MIC); nothing of them is reproduced. Nothing here reads a device value on the host (no ``.item()``,
``nonzero``, boolean-mask indexing or data-dependent Python branch), so a training step that uses these runs
without a host synchronisation.

- :func:`ema_alpha` / :func:`ema_update_`: the teacher's parameters follow the student's,
  ``theta_T <- a_i theta_T + (1 - a_i) theta_S`` with ``a_i = min(1 - 1 / (i + 1), alpha)``.
- :func:`teacher_mode_`: the mode DAFormer runs the teacher in (training mode, dropout and stochastic depth off).
- :func:`pseudo_labels`: the teacher's arg-max labels and DAFormer's pseudo-label weight (the batch's share of
  confident pixels, one number per batch), zero on the ignored top and bottom rows.
- :func:`feature_distance_loss`: DAFormer's thing-class ImageNet feature distance on the last encoder stage.
- :func:`block_mask`: MIC's random block mask (1 = keep the pixel).

Where these differ from DAFormer/MIC (each function's doc says more): the pseudo-label weight stays a device
tensor (DAFormer reads it with ``.item()``); an empty feature-distance selection gives a zero connected to the
graph (DAFormer: the mean of an empty tensor, NaN); labels are downscaled to the feature grid with adaptive
bins, which equals DAFormer's rule whenever the label size is an integer multiple of the feature size and also
covers the other sizes; a block mask grid has at least one cell per side.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd

# The recipe's values (DAFormer's gta2cs ..._fdthings_rcs_croppl_a999_... config, MIC's masking config).
ALPHA = 0.999
PSEUDO_THRESHOLD = 0.968
IGNORE_TOP = 15
IGNORE_BOTTOM = 120
FDIST_LAMBDA = 0.005  # applied by the caller: loss = FDIST_LAMBDA * feature_distance_loss(...)
FDIST_SCALE_MIN_RATIO = 0.75
CITYSCAPES_THINGS = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)  # light, sign, person, rider, car ... bicycle
MASK_BLOCK = 32
MASK_RATIO = 0.7


# ---------------------------------------------------------------------------------------------- the teacher
def ema_alpha(iteration: int, alpha: float = ALPHA) -> float:
    r"""The teacher's momentum at ``iteration``: :math:`a_i = \min(1 - 1/(i + 1), \alpha)`.

    ``iteration`` counts from 0 like DAFormer's ``local_iter``: the update at the start of iteration ``i`` (before
    its forward) follows the student after its ``i`` previous optimiser steps. ``a_0 = 0`` (the teacher becomes a
    copy: DAFormer's ``_init_ema_weights`` at iteration 0), ``a_1 = 0.5``, ... up to ``alpha`` from
    ``i = 1 / (1 - alpha) - 1`` on (999 for 0.999).

    Args:
        iteration: the step index, ``>= 0``.
        alpha: the momentum's ceiling, in ``[0, 1]`` (the recipe: 0.999).
    """
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise ValueError(f"iteration: expected an int >= 0, got {iteration!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: expected a float in [0, 1], got {alpha!r}")
    return min(1.0 - 1.0 / (iteration + 1), alpha)


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, iteration: int, alpha: float = ALPHA) -> None:
    r"""Moves the teacher's parameters towards the student's, in place:
    :math:`\theta_T \leftarrow a_i \theta_T + (1 - a_i) \theta_S`, :math:`a_i` = :func:`ema_alpha`.

    As DAFormer's ``_init_ema_weights`` / ``_update_ema``: parameters only, paired by position (the two modules
    must have the same architecture; names and shapes are checked). At ``iteration == 0`` the teacher's
    parameters become copies of the student's. **Buffers are not touched**: BatchNorm running statistics of the
    teacher are those its own forward passes leave (DAFormer runs the teacher in training mode, see
    :func:`teacher_mode_`), ``num_batches_tracked`` likewise. A parameter that is not floating point (none in
    the recipe's model) is copied from the student (DAFormer would blend and truncate it).

    One fused ``torch._foreach_lerp_`` over all floating-point parameters
    (``theta_T + (1 - a)(theta_S - theta_T)``: DAFormer's blend up to rounding). Call it under no autograd
    recording of its own (it is decorated with ``torch.no_grad``); the teacher's parameters need no gradient
    (``teacher.requires_grad_(False)``, DAFormer's ``detach_``).

    Args:
        teacher: the EMA model, updated in place.
        student: the trained model, read only; same parameter names and shapes as ``teacher``, same devices.
        iteration: the step index from 0 (see :func:`ema_alpha`).
        alpha: the momentum's ceiling (the recipe: 0.999; DAFormer's base config: 0.99).
    """
    a = ema_alpha(iteration, alpha)
    t_params = list(teacher.named_parameters())
    s_params = list(student.named_parameters())
    if len(t_params) != len(s_params):
        raise ValueError(f"teacher: expected the student's {len(s_params)} parameters, got {len(t_params)}")
    blend_t: list[Tensor] = []
    blend_s: list[Tensor] = []
    copy_t: list[Tensor] = []
    copy_s: list[Tensor] = []
    for (t_name, t), (s_name, s) in zip(t_params, s_params):
        if t_name != s_name or t.shape != s.shape:
            raise ValueError(f"teacher: expected parameter {s_name!r} of shape {tuple(s.shape)}, "
                             f"got {t_name!r} of shape {tuple(t.shape)}")
        if t.is_floating_point() and s.is_floating_point() and a > 0.0:
            blend_t.append(t)
            blend_s.append(s)
        else:
            copy_t.append(t)
            copy_s.append(s)
    if blend_t:
        torch._foreach_lerp_(blend_t, blend_s, 1.0 - a)
    if copy_t:
        torch._foreach_copy_(copy_t, copy_s)


def teacher_mode_(teacher: nn.Module) -> nn.Module:
    r"""Puts the teacher in DAFormer's mode for pseudo-labelling and returns it: training mode (BatchNorm
    normalises with the target batch's statistics and updates its running statistics, as in DAFormer, whose EMA
    model stays in training mode), with every dropout (``nn.Dropout*``) and stochastic-depth module (any class
    named ``DropPath``, e.g. :class:`uda.mit.DropPath` or timm's) switched to evaluation.

    Call it before each teacher forward: a later ``model.train()`` switches dropout back on (DAFormer does the
    same every step).
    """
    teacher.train()
    for module in teacher.modules():
        if isinstance(module, _DropoutNd) or type(module).__name__ == "DropPath":
            module.training = False
    return teacher


# ---------------------------------------------------------------------------------------------- pseudo-labels
def pseudo_labels(teacher_logits: Tensor, *, threshold: float = PSEUDO_THRESHOLD, ignore_top: int = IGNORE_TOP,
                  ignore_bottom: int = IGNORE_BOTTOM) -> tuple[Tensor, Tensor]:
    r"""The teacher's pseudo-labels and DAFormer's pixel weights for the target cross-entropy.

    .. math::
        p = \mathrm{softmax}_k(z), \quad \hat y_{b,i,j} = \arg\max_k p_{b,k,i,j}, \quad
        q = \frac{1}{BHW} \sum_{b,i,j} [\max_k p_{b,k,i,j} \ge \tau], \quad
        w_{b,i,j} = q \, [t \le i < H - s]

    ``q`` is **one number for the whole batch** (DAFormer's ``ps_large_p.sum() / ps_size``), kept on the device;
    it counts every pixel, the ignored rows included. The rows ``[0, t)`` and ``[H - s, H)`` get weight 0
    (DAFormer's ``pseudo_weight_ignore_top/bottom``: rectification artefacts of Cityscapes at the top, the ego
    car's bonnet at the bottom). DAFormer takes them at the resolution of the teacher's logits **upsampled to
    the image** (``encode_decode`` resizes bilinearly to the input size: 512 x 512 crops in the recipe): pass
    logits at image resolution for the recipe's ``t = 15, s = 120``.

    The logits are detached and the softmax is taken in at least float32 (half-precision logits would make the
    0.968 threshold coarse); ties in the arg max go to the lowest class index.

    Shape:
        - teacher_logits: ``(B, K, H, W)`` floating point.
        - Returns ``labels`` ``(B, H, W)`` int64 and ``weight`` ``(B, H, W)`` (float32, or float64 for float64
          logits).

    Args:
        teacher_logits: the teacher's class scores at image resolution.
        threshold: ``tau``, the confidence a pixel needs to count as confident (``>=``, DAFormer's ``ge``);
            the recipe: 0.968.
        ignore_top: ``t``, rows at the top with weight 0 (the recipe: 15; 0: none).
        ignore_bottom: ``s``, rows at the bottom with weight 0 (the recipe: 120; 0: none).
    """
    if not isinstance(teacher_logits, Tensor) or teacher_logits.ndim != 4 or not teacher_logits.is_floating_point():
        got = (f"{teacher_logits.dtype} of shape {tuple(teacher_logits.shape)}"
               if isinstance(teacher_logits, Tensor) else type(teacher_logits).__name__)
        raise ValueError(f"teacher_logits: expected a floating-point Tensor[B, K, H, W], got {got}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold: expected a probability in [0, 1], got {threshold!r}")
    for name, rows in (("ignore_top", ignore_top), ("ignore_bottom", ignore_bottom)):
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
            raise ValueError(f"{name}: expected an int >= 0, got {rows!r}")
    batch, _, height, width = teacher_logits.shape
    dtype = torch.promote_types(teacher_logits.dtype, torch.float32)
    probs = torch.softmax(teacher_logits.detach(), dim=1, dtype=dtype)
    confidence, labels = probs.max(dim=1)
    share = (confidence >= threshold).sum().to(dtype) / confidence.numel()  # 0-dim, on the device
    kept = kept_rows(height, ignore_top, ignore_bottom, teacher_logits.device).to(dtype)
    weight = share * kept[None, :, None].expand(batch, height, width)
    return labels, weight


def kept_rows(height: int, ignore_top: int, ignore_bottom: int, device: torch.device) -> Tensor:
    """``(height,)`` bool: the rows outside DAFormer's ignored top ``ignore_top`` and bottom ``ignore_bottom``
    (:func:`pseudo_labels`' weight rows; ``train_daformer.static_labels``' labelled rows)."""
    rows = torch.arange(height, device=device)
    return (rows >= ignore_top) & (rows < height - ignore_bottom)


# ---------------------------------------------------------------------------------------------- feature distance
def downscale_labels(labels: Tensor, size: tuple[int, int], *, num_classes: int, min_ratio: float,
                     ignore_index: int = 255) -> Tensor:
    r"""Labels ``(B, H, W)`` to a coarser grid ``size = (h, w)`` by DAFormer's ratio rule
    (``downscale_label_ratio``): a cell takes the class most of its pixels have (``ignore_index`` counting as a
    class of its own, ties to the lowest index, ignore last) if that class covers at least ``min_ratio`` of
    the cell's pixels, else ``ignore_index``.

    A cell's pixels are PyTorch's adaptive-pooling bin: rows ``[floor(y H / h), ceil((y + 1) H / h))`` and the
    same for columns. For ``H = f h`` and ``W = f w`` these are DAFormer's ``f x f`` blocks; DAFormer takes
    ``f = W // w`` for both axes and drops the remainder (or fails on a grid mismatch) otherwise, where the bins
    here overlap by at most a pixel and cover the whole label map. Labels outside ``[0, num_classes)`` other
    than ``ignore_index`` count for no class (DAFormer's ``one_hot`` would raise; raising here would need a host
    read).

    Shape:
        - labels: ``(B, H, W)`` integer, ``H >= h``, ``W >= w``.
        - Returns ``(B, h, w)`` int64.
    """
    if labels.ndim != 3 or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels: expected an integer Tensor[B, H, W], got {labels.dtype} of shape "
                         f"{tuple(labels.shape)}")
    h, w = size
    if not (1 <= h <= labels.shape[1] and 1 <= w <= labels.shape[2]):
        raise ValueError(f"size: expected a grid no finer than the labels' {tuple(labels.shape[1:])}, got {size}")
    classes = torch.arange(num_classes + 1, device=labels.device)
    labels = torch.where(labels == ignore_index, num_classes, labels.long())  # ignore: class num_classes
    fractions = F.adaptive_avg_pool2d((labels[:, None] == classes[None, :, None, None]).float(), (h, w))
    ratio, majority = fractions.max(dim=1)
    keep = (ratio >= min_ratio) & (majority < num_classes)
    return torch.where(keep, majority, ignore_index)


def feature_distance_loss(student_features: Tensor, imnet_features: Tensor, labels: Tensor | None,
                          thing_classes: Sequence[int] = CITYSCAPES_THINGS, *,
                          scale_min_ratio: float = FDIST_SCALE_MIN_RATIO, num_classes: int,
                          ignore_index: int = 255) -> Tensor:
    r"""DAFormer's ImageNet feature distance: the mean L2 distance between the student's and the frozen ImageNet
    encoder's features over the feature cells whose downscaled source label is a thing class.

    .. math::
        d_{b,y,x} = \lVert f^S_{b,:,y,x} - f^I_{b,:,y,x} \rVert_2, \quad
        m_{b,y,x} = [\tilde y_{b,y,x} \in \mathcal{T}], \quad
        L = \frac{\sum m \, d}{\max(1, \sum m)}

    with ``tilde y`` the labels downscaled to the feature grid by :func:`downscale_labels` (``min_ratio =
    scale_min_ratio``). The sums run over the whole batch (DAFormer: ``dist[mask].mean()``). DAFormer applies it
    to the **last encoder stage** (``feat[-1]``: stride 32, the MiT's fourth map, not the decoder's features),
    with the encoder's ImageNet weights in eval mode, on the **source** images and their ground truth.
    ``labels=None`` averages over every cell (DAFormer's ``imnet_feature_dist_classes=None``; ``thing_classes``
    is then not used). The recipe's weight ``lambda = 0.005`` (:data:`FDIST_LAMBDA`) is **not** applied here:
    the caller multiplies.

    An empty selection (no thing class in the batch, or every cell ignored) gives 0, connected to the graph
    with zero gradients (DAFormer: NaN from the mean of an empty selection); no host read decides it. The
    gradient of ``d`` at equal features (the first iterations, student initialised from the ImageNet weights)
    is 0, not NaN. ``imnet_features`` are detached.

    Shape:
        - student_features, imnet_features: ``(B, C, h, w)``, same shape.
        - labels: ``(B, H, W)`` integer with ``H >= h``, ``W >= w``, or None.
        - Returns a 0-dim tensor of the features' dtype.

    Args:
        student_features: the student encoder's last-stage map (with gradient).
        imnet_features: the ImageNet encoder's last-stage map for the same images.
        labels: the source ground truth at image resolution, or None (no class mask).
        thing_classes: the classes whose cells count (the recipe: Cityscapes' things, :data:`CITYSCAPES_THINGS`).
        scale_min_ratio: the share of a cell's pixels its class needs (the recipe: 0.75).
        num_classes: the number of classes (19 for Cityscapes).
        ignore_index: the labels' ignore value.
    """
    if student_features.ndim != 4 or not student_features.is_floating_point():
        raise ValueError(f"student_features: expected a floating-point Tensor[B, C, h, w], got "
                         f"{student_features.dtype} of shape {tuple(student_features.shape)}")
    if imnet_features.shape != student_features.shape:
        raise ValueError(f"imnet_features: expected shape {tuple(student_features.shape)} (the student's), got "
                         f"{tuple(imnet_features.shape)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes: expected an int >= 1, got {num_classes!r}")
    things = sorted({int(c) for c in thing_classes})
    if any(not 0 <= c < num_classes for c in things):
        raise ValueError(f"thing_classes: expected classes in [0, {num_classes}), got {list(thing_classes)}")
    if not 0.0 <= scale_min_ratio <= 1.0:
        raise ValueError(f"scale_min_ratio: expected a float in [0, 1], got {scale_min_ratio!r}")
    if 0 <= ignore_index < num_classes:
        raise ValueError(f"ignore_index: expected a value outside [0, {num_classes}), got {ignore_index!r}")
    distance = torch.linalg.vector_norm(student_features - imnet_features.detach(), dim=1)  # (B, h, w)
    if labels is None:
        return distance.mean()
    if labels.ndim != 3 or labels.shape[0] != student_features.shape[0]:
        raise ValueError(f"labels: expected Tensor[B, H, W] with B = {student_features.shape[0]}, got shape "
                         f"{tuple(labels.shape)}")
    coarse = downscale_labels(labels, tuple(distance.shape[-2:]), num_classes=num_classes,
                              min_ratio=scale_min_ratio, ignore_index=ignore_index)
    selected = torch.zeros_like(coarse, dtype=torch.bool)
    for c in things:  # comparisons with Python scalars: no host-to-device copy, no lookup table
        selected |= coarse == c
    mask = selected.to(distance.dtype)
    return (distance * mask).sum() / mask.sum().clamp_min(1.0)


# ---------------------------------------------------------------------------------------------- MIC masking
def block_mask(batch: int, height: int, width: int, *, block: int = MASK_BLOCK, ratio: float = MASK_RATIO,
               generator: torch.Generator | None = None, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
    r"""MIC's random block mask (``BlockMaskGenerator``): 1 keeps a pixel, 0 masks it out
    (``masked = images * mask``).

    A grid of ``round(H / block) x round(W / block)`` cells (Python's ``round``, as MIC; at least one cell per
    side here, MIC fails on an empty grid), each kept iff ``u > ratio`` with ``u ~ U[0, 1)`` (so masked with
    probability ``ratio``), upsampled to ``(H, W)`` by nearest neighbour (mmseg's ``resize`` default). For ``H``
    and ``W`` multiples of ``block`` the cells are ``block x block`` squares; the expected kept share is
    ``1 - ratio``.

    Shape:
        - Returns ``(B, 1, H, W)`` of ``dtype``, values in {0, 1}.

    Args:
        batch, height, width: ``B``, ``H``, ``W``, each ``>= 1``.
        block: the cell size in pixels (MIC: 64 on HRDA's 1024 crops; 32 suits 512 crops).
        ratio: the probability that a cell is masked, in ``[0, 1]`` (MIC: 0.7).
        generator: the random generator (on ``device``), for reproducible masks.
        device: where the mask is made (default: the current default device).
        dtype: the mask's floating-point dtype.
    """
    for name, value in (("batch", batch), ("height", height), ("width", width), ("block", block)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio: expected a probability in [0, 1], got {ratio!r}")
    grid = (max(1, round(height / block)), max(1, round(width / block)))
    u = torch.rand((batch, 1, *grid), generator=generator, device=device)
    keep = (u > ratio).to(dtype)
    return F.interpolate(keep, size=(height, width), mode="nearest")
