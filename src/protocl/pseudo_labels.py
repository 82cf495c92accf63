"""Target pseudo labels: static (classifier confidence), dynamic (prototype matching) and their fusion.

The protocl method spec, §3: ``static_pseudo_label``, ``ClassBalancedThresholds``, ``dynamic_pseudo_label``,
``hybrid_fuse``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ._kernels import pseudo_labels as kernels
from ._kernels.resize import grid_of
from ._types import EPS, FUSE_MODES, IGNORE_INDEX, THRESHOLD, FuseMode
from ._validation import (
    check_bool,
    check_choice,
    check_dim_size,
    check_features_prototypes,
    check_float_tensor,
    check_ignore_index,
    check_int,
    check_range,
    check_same_device,
    check_size2,
    label_map,
    report_pending,
)
from .distributed import all_reduce_sum_, is_distributed
from .prototypes import PooledPrototypes, unpack_prototypes

__all__ = ["dynamic_pseudo_label", "hybrid_fuse", "static_pseudo_label", "ClassBalancedThresholds"]


# ------------------------------------------------------------------------------------------------ dynamic


def dynamic_pseudo_label(
    target_features: Tensor,
    prototypes: Union[Tensor, PooledPrototypes],
    *,
    valid: Optional[Tensor] = None,
    threshold: float = THRESHOLD,
    ignore_index: int = IGNORE_INDEX,
    size: Optional[Tuple[int, int]] = None,
) -> Tensor:
    r"""Dynamic pseudo labels: non-parametric label transfer from (calibrated) source prototypes.

    .. math::
        s[b,k,p] = \cos(\mathbf{f}_T(b,:,p), \mathbf{P}_{b,k}), \qquad
        y_D(b,p) = \begin{cases} \arg\max_k s[b,k,p] & \max_k s[b,k,p] > \text{threshold} \\
        \text{ignore\_index} & \text{otherwise} \end{cases}

    Invalid prototypes are excluded from the arg max (a pixel with none valid is ignore). Never differentiable:
    the features are detached. Ties go to the lowest class id. As in the losses, ``valid=None`` takes every
    prototype that is not all zeros as valid, and a :class:`~protocl.PooledPrototypes` gives ``counts > 0``
    (calibrated prototypes of absent classes are not zero: pass ``valid`` with them).

    Args:
        target_features: ``Tensor[B, D, h, w]``.
        prototypes: ``Tensor[B, K, D]`` (paired with image b) or ``Tensor[K, D]``, typically
            :func:`~protocl.domain_bias_calibrate` output; or a :class:`~protocl.PooledPrototypes`.
        valid: ``Tensor[B, K]`` or ``Tensor[K]`` bool, which prototypes exist. None: the nonzero ones.
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
    report_pending()
    prototypes, valid = unpack_prototypes(prototypes, valid, "prototypes")
    check_features_prototypes(target_features, prototypes, valid, "target_features", "prototypes")
    threshold = check_range(threshold, "threshold", -1.0, 1.0)
    ignore_index = check_ignore_index(ignore_index)
    if size is not None:
        size = check_size2(size, "size")
    s = kernels.prototype_cosine(target_features, prototypes, valid, EPS)
    return kernels.labels_from_cosine(s, grid_of(target_features), threshold, ignore_index, size)


# ------------------------------------------------------------------------------------------------ fusion


def hybrid_fuse(
    static_labels: Tensor,
    dynamic_labels: Tensor,
    *,
    mode: FuseMode = "fill",
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    r"""Hybrid pseudo labels: fuse static (classifier) and dynamic (prototype) labels.

    ``dynamic_labels`` are nearest-resized to the static labels' size when they differ.

    - ``"fill"`` (default): :math:`y_F` where it is not ignore, else :math:`y_D` (denser than static, keeps
      the static labels' reliability; the release's intended rule).
    - ``"agree"``: the label where :math:`y_F = y_D`, else ignore.
    - ``"dynamic_first"``: :math:`y_D` where it is not ignore, else :math:`y_F`.

    Args:
        static_labels: ``Tensor[B, H, W]`` int64 (:func:`static_pseudo_label` output; ``(B, 1, H, W)`` accepted).
        dynamic_labels: ``Tensor[B, h, w]`` int64 (:func:`dynamic_pseudo_label` output, any size; ``(B, 1, h, w)``
            accepted).
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
    report_pending()
    static_labels = label_map(static_labels, "static_labels")
    dynamic_labels = label_map(dynamic_labels, "dynamic_labels")
    check_same_device("static_labels", static_labels, "dynamic_labels", dynamic_labels)
    if dynamic_labels.shape[0] != static_labels.shape[0]:
        raise ValueError(
            f"dynamic_labels: expected batch size {static_labels.shape[0]} (the batch of static_labels), "
            f"got shape {tuple(dynamic_labels.shape)}"
        )
    check_choice(mode, "mode", FUSE_MODES)
    ignore_index = check_ignore_index(ignore_index)
    return kernels.fuse(static_labels, dynamic_labels, mode, ignore_index)


# ------------------------------------------------------------------------------------------------ static


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
    report_pending()
    check_float_tensor(logits, "logits", (4,), "(B, K, H, W)")
    K = logits.shape[1]
    if class_thresholds is not None:
        check_float_tensor(class_thresholds, "class_thresholds", (1,), "(K,)")
        check_dim_size(class_thresholds, 0, K, "class_thresholds", f"K, the classes of logits {tuple(logits.shape)}")
        check_same_device("logits", logits, "class_thresholds", class_thresholds)
    proportion = check_range(proportion, "proportion", 0.0, 1.0)
    ignore_index = check_ignore_index(ignore_index)
    return kernels.static_labels(logits, class_thresholds, proportion, ignore_index)


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
    compares confidences the same way. ``+inf`` for a class never predicted (in a set that was seen: calling
    ``compute()`` before any ``update()``, or after ``reset()``, raises a ``RuntimeError`` instead of silently
    returning ``+inf`` for every class, which would label nothing; a loaded ``state_dict`` counts as seen).

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
        self.sync = check_bool(sync, "sync")
        self.register_buffer("histogram", torch.zeros(self.num_classes, self.bins, dtype=torch.int64))
        # whether a set has been seen since construction or reset(): host-side, so compute() needs no host read
        # (a loaded state_dict counts as seen)
        self._seen = False

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        self._seen = True
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, proportion={self.proportion}, bins={self.bins}, sync={self.sync}"

    @torch.no_grad()
    def reset(self) -> None:
        """Forget everything seen (start of a new pass over the target set)."""
        report_pending()
        self.histogram.zero_()
        self._seen = False

    @torch.no_grad()
    def update(self, logits: Tensor) -> None:
        """Accumulate the confidences of a batch of logits ``(B, K, H, W)``."""
        report_pending()
        check_float_tensor(logits, "logits", (4,), "(B, K, H, W)")
        check_dim_size(logits, 1, self.num_classes, "logits", "K, the classes of the thresholds")
        check_same_device("histogram", self.histogram, "logits", logits)
        delta = kernels.confidence_histogram(logits, self.num_classes, self.bins)
        self._seen = True
        if self.sync and is_distributed():
            all_reduce_sum_(delta)
        self.histogram.add_(delta)

    def compute(self) -> Tensor:
        """Per-class thresholds ``(K,)`` float64 (``+inf`` for classes never predicted).

        Raises ``RuntimeError`` when no ``update`` has run since construction or ``reset`` (and no state was
        loaded): a host-side flag, so this reads nothing back from the device.
        """
        report_pending()
        if not self._seen:
            raise RuntimeError(
                "ClassBalancedThresholds.compute(): no confidences accumulated (no update() since construction or "
                "reset()); call update(logits) on the target set first (every class would get +inf and "
                "static_pseudo_label would label nothing)"
            )
        return kernels.thresholds(self.histogram, self.proportion)

    def forward(self) -> Tensor:
        """Same as :meth:`compute`."""
        return self.compute()
