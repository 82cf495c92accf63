"""Target pseudo labels: static (classifier confidence), dynamic (prototype matching) and their fusion.

The protocl method spec, §3: ``static_pseudo_label``, ``ClassBalancedThresholds``, ``dynamic_pseudo_label``,
``hybrid_fuse``.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from einops import rearrange
from torch import Tensor, nn

from ._validation import (
    IGNORE_INDEX,
    check_choice,
    check_dim_size,
    check_float_tensor,
    check_ignore_index,
    check_int,
    check_label_tensor,
    check_range,
    check_same_device,
    check_size2,
    upcast,
)
from .contrastive import check_features_prototypes, cosine_similarity_map
from .distributed import all_reduce_sum_, is_distributed
from .prototypes import no_autocast
from .resize import _resize_labels, _upsample_labels

__all__ = ["dynamic_pseudo_label", "hybrid_fuse", "static_pseudo_label", "ClassBalancedThresholds"]

FUSE_MODES = ("fill", "agree", "dynamic_first")


# ------------------------------------------------------------------------------------------------ dynamic


def dynamic_pseudo_label(
    target_features: Tensor,
    prototypes: Tensor,
    *,
    valid: Optional[Tensor] = None,
    threshold: float = 0.7,
    ignore_index: int = IGNORE_INDEX,
    size: Optional[Tuple[int, int]] = None,
) -> Tensor:
    r"""Dynamic pseudo labels: non-parametric label transfer from (calibrated) source prototypes.

    .. math::
        s[b,k,p] = \cos(\mathbf{f}_T(b,:,p), \mathbf{P}_{b,k}), \qquad
        y_D(b,p) = \begin{cases} \arg\max_k s[b,k,p] & \max_k s[b,k,p] > \text{threshold} \\
        \text{ignore\_index} & \text{otherwise} \end{cases}

    Invalid prototypes are excluded from the arg max (a pixel with none valid is ignore). Never differentiable:
    the features are detached. Ties go to the lowest class id.

    Args:
        target_features: ``Tensor[B, D, h, w]``.
        prototypes: ``Tensor[B, K, D]`` (paired with image b) or ``Tensor[K, D]``, typically
            :func:`~protocl.domain_bias_calibrate` output.
        valid: ``Tensor[B, K]`` or ``Tensor[K]`` bool, which prototypes exist. None: all.
        threshold: cosine threshold in ``[-1, 1]`` (paper grid {0.5, 0.6, 0.7, 0.8, 0.9}).
        ignore_index: label written where no prototype is similar enough.
        size: ``(H, W)`` to nearest-upsample the labels to (``F.interpolate`` rule); None keeps ``(h, w)``.

    Returns:
        ``Tensor[B, h, w]`` (or ``Tensor[B, H, W]``) int64.

    Shape:
        - target_features: :math:`(B, D, h, w)`; prototypes: :math:`(B, K, D)` or :math:`(K, D)`
        - output: :math:`(B, h, w)`, or :math:`(B, H, W)` with ``size``

    Example:
        >>> P = torch.eye(3, 4)
        >>> f = torch.zeros(1, 4, 1, 3); f[0, 0, 0, 0] = 1; f[0, 2, 0, 1] = 1; f[0, 3, 0, 2] = 1
        >>> dynamic_pseudo_label(f, P, threshold=0.7)
        tensor([[[  0,   2, 255]]])
    """
    B, K = check_features_prototypes(target_features, prototypes, valid, "target_features", "prototypes")
    check_range(threshold, "threshold", -1.0, 1.0)
    ignore_index = check_ignore_index(ignore_index)
    if size is not None:
        size = check_size2(size, "size")
    with torch.no_grad():
        s = cosine_similarity_map(target_features.detach(), prototypes.detach())  # b k h w
        if valid is not None:
            s = torch.where(valid.expand(B, K)[:, :, None, None], s, torch.full_like(s, -math.inf))
        best, arg = s.max(dim=1)  # b h w
        labels = torch.where(best > threshold, arg, torch.full_like(arg, ignore_index))
        if size is not None and tuple(labels.shape[-2:]) != size:
            if size[0] * size[1] > labels.shape[-2] * labels.shape[-1] and K <= 256 and 0 <= ignore_index <= 255:
                labels = _upsample_labels(labels, size, torch.uint8)  # ids fit a byte: a quarter of the traffic
            else:
                labels = _resize_labels(labels, size, "nearest", K, ignore_index)
    return labels


# ------------------------------------------------------------------------------------------------ fusion


def hybrid_fuse(
    static_labels: Tensor,
    dynamic_labels: Tensor,
    *,
    mode: str = "fill",
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    r"""Hybrid pseudo labels: fuse static (classifier) and dynamic (prototype) labels.

    ``dynamic_labels`` are nearest-resized to the static labels' size when they differ.

    - ``"fill"`` (default): :math:`y_F` where it is not ignore, else :math:`y_D` (denser than static, keeps
      the static labels' reliability; the release's intended rule).
    - ``"agree"``: the label where :math:`y_F = y_D`, else ignore.
    - ``"dynamic_first"``: :math:`y_D` where it is not ignore, else :math:`y_F`.

    Args:
        static_labels: ``Tensor[B, H, W]`` int64 (:func:`static_pseudo_label` output).
        dynamic_labels: ``Tensor[B, h, w]`` int64 (:func:`dynamic_pseudo_label` output, any size).
        mode: ``"fill"`` | ``"agree"`` | ``"dynamic_first"``.
        ignore_index: the ignore label.

    Returns:
        ``Tensor[B, H, W]`` int64.

    Shape:
        - static_labels: :math:`(B, H, W)`; dynamic_labels: :math:`(B, h, w)`; output: :math:`(B, H, W)`

    Example:
        >>> y_f = torch.tensor([[[0, 255, 1, 255]]]); y_d = torch.tensor([[[2, 2, 1, 255]]])
        >>> hybrid_fuse(y_f, y_d)
        tensor([[[  0,   2,   1, 255]]])
        >>> hybrid_fuse(y_f, y_d, mode="agree")
        tensor([[[255, 255,   1, 255]]])
    """
    check_label_tensor(static_labels, "static_labels", (3,), "(B, H, W)")
    check_label_tensor(dynamic_labels, "dynamic_labels", (3,), "(B, h, w)")
    check_same_device("static_labels", static_labels, "dynamic_labels", dynamic_labels)
    if dynamic_labels.shape[0] != static_labels.shape[0]:
        raise ValueError(
            f"dynamic_labels: expected batch size {static_labels.shape[0]} (the batch of static_labels), "
            f"got shape {tuple(dynamic_labels.shape)}"
        )
    check_choice(mode, "mode", FUSE_MODES)
    ignore_index = check_ignore_index(ignore_index)
    y_f = static_labels.long()
    y_d = _resize_labels(dynamic_labels.long(), tuple(y_f.shape[-2:]), "nearest", None, ignore_index)
    if mode == "fill":
        return torch.where(y_f != ignore_index, y_f, y_d)
    if mode == "dynamic_first":
        return torch.where(y_d != ignore_index, y_d, y_f)
    return torch.where(y_f == y_d, y_f, torch.full_like(y_f, ignore_index))


# ------------------------------------------------------------------------------------------------ static


def _confidence(logits: Tensor) -> Tuple[Tensor, Tensor]:
    r"""Max softmax probability (float64) and arg max over classes.

    :math:`c = 1 / (1 + r)` with :math:`r = \sum_{k \ne \hat y} \exp(z_k - z_{\hat y})` summed in fp32 (fp64 for
    fp64 logits) and the division in float64: the same value as the largest softmax probability, but confident
    pixels are not rounded to 1 (float32 ``softmax().max()`` is exactly 1 for logit margins above ~17, which ties
    the most confident pixels of a class together).
    """
    with no_autocast(logits):
        z = upcast(logits)
        top, pred = z.max(dim=1, keepdim=True)  # b 1 h w
        ratios = torch.exp(z - top).scatter_(1, pred, 0.0)  # exp(z_k - z_max) of the other classes
        rest = ratios.sum(dim=1).to(torch.float64)  # b h w
        return 1.0 / (1.0 + rest), pred[:, 0]


def static_pseudo_label(
    logits: Tensor,
    *,
    class_thresholds: Optional[Tensor] = None,
    proportion: float = 0.1,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    r"""Static pseudo labels from classifier logits: class-balanced thresholds ∪ per-image top proportion.

    With :math:`c(p) = \max_k \operatorname{softmax}(z)(p)` and :math:`\hat y(p) = \arg\max_k`, a pixel keeps
    :math:`\hat y(p)` when

    .. math::
        c(p) \ge t[\hat y(p)] \quad \text{or} \quad c(p) \ge c_{(n)}, \qquad n = \max(1, \lfloor \rho H W \rfloor)

    where :math:`t` are ``class_thresholds`` (the *arg-max class's* threshold, global) and :math:`c_{(n)}` is the
    n-th largest confidence of the pixel's image; else ``ignore_index``. Confidences are probabilities, never
    logits. ``class_thresholds=None`` uses the per-image rule alone; ``proportion=0`` disables it.

    The per-image rule keeps the pixels *at or above* the n-th largest confidence: n pixels (more on ties). The
    authors' release keeps those strictly above it, n − 1 pixels; protocl follows the spec's "top proportion".
    Confidences are computed as :math:`1 / (1 + \sum_{k \ne \hat y} e^{z_k - z_{\hat y}})` in float64 (equal
    to the largest softmax probability, without float32's rounding of confident pixels to exactly 1) and
    compared with the thresholds in float64.

    Args:
        logits: ``Tensor[B, K, H, W]`` classifier logits (fp16/bf16 computed in fp32).
        class_thresholds: ``Tensor[K]`` per-class confidence thresholds (:meth:`ClassBalancedThresholds.compute`).
        proportion: :math:`\rho \in [0, 1]`, the per-image top proportion.
        ignore_index: label written for rejected pixels.

    Returns:
        ``Tensor[B, H, W]`` int64.

    Shape:
        - logits: :math:`(B, K, H, W)`; class_thresholds: :math:`(K,)`; output: :math:`(B, H, W)`

    Example:
        >>> z = torch.tensor([[[[4.0, 0.0]], [[0.0, 0.1]]]])  # B=1, K=2, H=1, W=2
        >>> static_pseudo_label(z, proportion=0.5)
        tensor([[[  0, 255]]])
    """
    check_float_tensor(logits, "logits", (4,), "(B, K, H, W)")
    B, K, H, W = logits.shape
    if class_thresholds is not None:
        check_float_tensor(class_thresholds, "class_thresholds", (1,), "(K,)")
        check_dim_size(class_thresholds, 0, K, "class_thresholds", f"K, the classes of logits {tuple(logits.shape)}")
        check_same_device("logits", logits, "class_thresholds", class_thresholds)
    proportion = check_range(proportion, "proportion", 0.0, 1.0)
    ignore_index = check_ignore_index(ignore_index)
    conf, pred = _confidence(logits)  # b h w
    keep = torch.zeros_like(pred, dtype=torch.bool)
    if class_thresholds is not None:
        keep = keep | (conf >= class_thresholds.to(torch.float64)[pred])  # float64 on both sides
    if proportion > 0:
        n = max(1, math.floor(proportion * H * W))
        flat = rearrange(conf, "b h w -> b (h w)")
        nth_largest = flat.kthvalue(H * W - n + 1, dim=1).values  # b
        keep = keep | (conf >= nth_largest[:, None, None])
    return torch.where(keep, pred, torch.full_like(pred, ignore_index))


# Confidence bins of ClassBalancedThresholds: uniform in c on [0, 0.95) (flat, low-confidence classes), then
# uniform in s = -log(1 - c) from s(0.95) to 36 (saturated classes: c = 1 - e^{-s}; the float64 confidences of
# _confidence resolve 1 - c down to ~1e-16, s ~ 36.7). Spacing in c is at most 6.7e-4 with 4096 bins.
_BODY_TOP = 0.95
_BODY_SHARE = 0.4
_S_MAX = 36.0


def _confidence_bin_edges(bins: int, device=None) -> Tensor:
    r"""Lower edges of the confidence bins of :class:`ClassBalancedThresholds`: ``Tensor[bins]`` float64.

    .. math::
        E_j = \begin{cases} 0.95\, j / n_0 & j < n_0 \\
        1 - \exp(-s_j), \quad s_j = s_0 + (j - n_0) \frac{36 - s_0}{n_1 - 1} & j \ge n_0 \end{cases}

    with :math:`n_0 = \max(1, \lfloor 0.4 \cdot \text{bins} \rfloor)`, :math:`n_1 = \text{bins} - n_0`,
    :math:`s_0 = -\log(1 - 0.95)`: uniform in :math:`c` below 0.95, uniform in :math:`s = -\log(1 - c)` above,
    so that the bins resolve confidences of saturated classes (all within :math:`10^{-5}` of 1) as finely as those
    of uncertain ones. Bin ``j`` holds :math:`E_j \le c < E_{j+1}` (the last bin is closed at 1). Near
    :math:`s = 36` float64 cannot tell the edges apart: equal edges leave empty bins, which is harmless.

    Example:
        >>> e = _confidence_bin_edges(4096)
        >>> e.shape, bool(e[0] == 0), bool((e.diff() >= 0).all()), bool(e.diff().max() < 1e-3)
        (torch.Size([4096]), True, True, True)
    """
    bins = check_int(bins, "bins", 2)
    n0 = max(1, math.floor(_BODY_SHARE * bins))
    n1 = bins - n0
    body = torch.arange(n0, dtype=torch.float64, device=device) * (_BODY_TOP / n0)
    s0 = -math.log1p(-_BODY_TOP)
    step = (_S_MAX - s0) / max(1, n1 - 1)
    tail = -torch.expm1(-(s0 + torch.arange(n1, dtype=torch.float64, device=device) * step))
    return torch.cat([body, tail])


class ClassBalancedThresholds(nn.Module):
    r"""Class-balanced confidence thresholds over a whole target set, streamed in O(K · bins) memory.

    ``update(logits)`` adds, per class k, a histogram of the confidences
    :math:`c(p) = \max_k \operatorname{softmax}(z)(p)` of the pixels predicted as k, over ``bins`` bins
    uniform in :math:`c` below 0.95 and uniform in :math:`-\log(1 - c)` above, so
    that a confidently predicted class (late in training, or a background class, whose top 10 % all lie within
    :math:`10^{-4}` of 1) is resolved as finely as an uncertain one. ``compute()`` returns for each class a
    threshold :math:`t_k` at the edge of the bin holding its :math:`n_k`-th most confident pixel,

    .. math::
        n_k = \max(1, \lfloor \rho \cdot \text{count}_k \rfloor), \qquad
        t_k \in \{E_j, E_{j+1}\}, \quad E_j \le c^{(k)}_{(n_k)} < E_{j+1},

    choosing the edge whose number of passing pixels :math:`|\{p : \hat y(p) = k, c(p) \ge t_k\}|` is closer to
    :math:`n_k` in ratio (:math:`E_{j+1}` only if at least one pixel passes it). So :math:`t_k` is within one bin
    (below 6.7e-4 with the default 4096 bins) of the exact :math:`c^{(k)}_{(n_k)}`, and the share of the class that
    passes is :math:`\rho` up to the pixels of one bin. Confidences are float64,
    :math:`1 / (1 + \sum_{k \ne \hat y} e^{z_k - z_{\hat y}})` (the largest softmax probability, but a float32
    ``softmax().max()`` rounds every pixel with a logit margin above ~17 to exactly 1, which would tie a
    saturated class's top pixels together), and so are the thresholds; :func:`static_pseudo_label` computes and
    compares confidences the same way. ``+inf`` for a class never predicted.

    Histograms are int64 buffers (exact counts, ``state_dict``-able) and are all-reduced across ranks on every
    ``update`` when ``torch.distributed`` is initialised and ``sync=True``, so all ranks hold the same thresholds at
    all times (and any rank's checkpoint is complete). ``update`` is then a collective: every rank must call it the
    same number of times (pad uneven shards, or use ``sync=False`` and all-reduce ``histogram`` once before
    ``compute()``).

    Args:
        num_classes: K.
        proportion: :math:`\rho \in (0, 1]`, the share of each class's pixels that passes (paper: 0.1).
        bins: histogram resolution (4096 keeps bins narrower than 1e-3 in confidence).
        sync: all-reduce histograms across ranks.

    Shape:
        - update logits: :math:`(B, K, H, W)`; histogram: :math:`(K, \text{bins})`; compute(): :math:`(K,)`

    Example:
        >>> cbt = ClassBalancedThresholds(num_classes=3, proportion=0.5)
        >>> cbt.update(torch.randn(2, 3, 8, 8))
        >>> cbt.compute().shape
        torch.Size([3])
    """

    histogram: Tensor

    def __init__(self, num_classes: int, proportion: float = 0.1, bins: int = 4096, *, sync: bool = True) -> None:
        super().__init__()
        self.num_classes = check_int(num_classes, "num_classes", 1)
        self.proportion = check_range(proportion, "proportion", 0.0, 1.0)
        if self.proportion <= 0:
            raise ValueError(f"proportion: expected a value in (0, 1], got {proportion}")
        self.bins = check_int(bins, "bins", 2)
        if not isinstance(sync, bool):
            raise TypeError(f"sync: expected a bool, got {type(sync).__name__}")
        self.sync = sync
        self.register_buffer("histogram", torch.zeros(self.num_classes, self.bins, dtype=torch.int64))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, proportion={self.proportion}, bins={self.bins}, sync={self.sync}"

    @torch.no_grad()
    def reset(self) -> None:
        """Forget everything seen (start of a new pass over the target set)."""
        self.histogram.zero_()

    @torch.no_grad()
    def update(self, logits: Tensor) -> None:
        """Accumulate the confidences of a batch of logits ``(B, K, H, W)``."""
        check_float_tensor(logits, "logits", (4,), "(B, K, H, W)")
        check_dim_size(logits, 1, self.num_classes, "logits", "K, the classes of the thresholds")
        check_same_device("histogram", self.histogram, "logits", logits)
        conf, pred = _confidence(logits)
        # bin j holds E_j <= c < E_{j+1} (float64 on both sides: exactly the pixels that pass E_j)
        bin_index = torch.searchsorted(_confidence_bin_edges(self.bins, logits.device), conf, right=True) - 1
        flat = (pred * self.bins + bin_index).reshape(-1)
        delta = torch.zeros(self.num_classes * self.bins, dtype=torch.int64, device=logits.device)
        delta.index_add_(0, flat, torch.ones_like(flat))
        if self.sync and is_distributed():
            all_reduce_sum_(delta)
        self.histogram.add_(delta.view(self.num_classes, self.bins))

    def compute(self) -> Tensor:
        """Per-class thresholds ``(K,)`` float64 (``+inf`` for classes never predicted)."""
        hist = self.histogram
        counts = hist.sum(dim=1)  # k
        n = torch.floor(self.proportion * counts.to(torch.float64)).clamp_min(1)  # k
        at_or_above = hist.flip(1).cumsum(1).flip(1).to(torch.float64)  # k bins: pixels in bins >= j
        j = ((at_or_above >= n[:, None]).sum(1) - 1).clamp_min(0)  # the bin of the n-th most confident pixel
        passing_j = at_or_above.gather(1, j[:, None])[:, 0]  # >= n pass E_j
        passing_next = passing_j - hist.gather(1, j[:, None])[:, 0].to(torch.float64)  # < n pass E_{j+1}
        # the edge whose passing count is closer to n in ratio: E_{j+1} when n / b < a / n, i.e. a * b > n^2
        up = (passing_next > 0) & (passing_j * passing_next > n * n)
        edges = _confidence_bin_edges(self.bins, hist.device)
        chosen = edges[torch.where(up, j + 1, j).clamp_max(self.bins - 1)]
        return torch.where(counts > 0, chosen, torch.full_like(chosen, math.inf))

    def forward(self) -> Tensor:
        """Same as :meth:`compute`."""
        return self.compute()
