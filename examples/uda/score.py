r"""Label-free scores of a whole model on the target domain (issue 27): no target label is read.

:func:`target_scores` runs a model over a fixed unlabelled target subset (e.g. the first N target-train images,
resized as for the static labels) and returns one number per candidate score, **higher = better** for every one:

``snd``
    Soft neighbourhood density (Saito et al., "Tune it the Right Way: Unsupervised Validation of Domain Adaptation
    via Soft Neighborhood Density", ICCV 2021), segmentation form: per image, ``snd_pixels`` pixels sampled at
    the input resolution (the same positions for every model scored with the same ``seed``), their softmax
    vectors L2-normalised, cosine similarities scaled by 1/τ (τ = 0.05), a softmax over each pixel's
    neighbours (itself excluded, as in the paper's definition), the entropy of each row, averaged over pixels
    and images (:func:`snd`). High when each pixel's prediction has many near neighbours (the paper keeps the
    model with the highest SND); a model that predicts one uncertain vector everywhere also scores high.
``neg_entropy``
    Minus the mean prediction entropy over every pixel of the subset at the input resolution, normalised by
    log K, so it lies in [−1, 0] (:func:`prediction_entropy`); 0 = one-hot predictions.
``flip_agreement``
    The share of pixels (input resolution) where the model's argmax on the image equals its argmax on the
    horizontally flipped image, flipped back: the consistency of the prediction under an augmentation the
    pipeline trains with (one more forward pass per image; ``flip=False`` leaves it out, NaN).
``proto_agreement`` / ``proto_margin`` / ``proto_separation``
    Class means ("self-prototypes") of the features under the model's own argmax over the whole subset
    (:func:`class_means`); then, over ``cells`` feature cells sampled per image: the share whose nearest
    prototype (cosine) is the class the classifier predicts (:func:`prototype_scores`), the mean best −
    second-best cosine, and the class mean of 1 − the largest cosine of a prototype with another class's
    (:func:`separation`). The model-only counterparts of :mod:`uda.signals`' ``prediction_agreement``,
    ``margin`` and ``separation``.
``ema_agreement`` / ``ema_margin`` / ``ema_separation``
    The same against given ``prototypes`` (e.g. the orchestrator's target EMA prototypes), only when given.

:func:`combine` turns several models' scores into one combined score per model (the mean over
:data:`COMBINED_FROM` of each score's rank among the models, normalised to [0, 1]); for two models it is the
share of those scores that prefer each: a vote.

The combination's components were fixed before any validation run, as the four scores defined for every model
without a second forward pass; ``flip_agreement`` and the ``ema_*`` scores stay out of it.

Cost per image: two forward passes at the subset's size (one with ``flip=False``), the softmax at the input
resolution (entropy), ``snd_pixels``² · K for SND, and ``cells`` · K · D for the prototype scores; for the tiny
CNN at 128×64 the forward passes dominate (measured: docs/examples.md, from the score-validation study
``benchmarks/study/round_scores.py``). Memory: ``cells`` feature vectors per image and K × D sums.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "COMBINED_FROM",
    "average_ranks",
    "EMA_SCORES",
    "SCORES",
    "class_means",
    "combine",
    "prediction_entropy",
    "prototype_scores",
    "separation",
    "snd",
    "target_scores",
]

SCORES = ("snd", "neg_entropy", "flip_agreement", "proto_agreement", "proto_margin", "proto_separation")
EMA_SCORES = ("ema_agreement", "ema_margin", "ema_separation")
# the combination's components, fixed before the validation: the four scores defined for every model
COMBINED_FROM = ("snd", "neg_entropy", "proto_agreement", "proto_margin")


def _float(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def snd(probs: Tensor, *, temperature: float = 0.05, exclude_self: bool = True) -> Tensor:
    r"""Soft neighbourhood density of sets of prediction vectors (Saito et al., ICCV 2021, Eq. 1–3).

    For each set of N softmax vectors :math:`p_i` (normalised :math:`\hat p_i = p_i / \lVert p_i \rVert_2`):

    .. math::
        s_{ij} = \frac{\hat p_i^\top \hat p_j}{\tau}, \quad
        q_{ij} = \frac{e^{s_{ij}}}{\sum_{j' \ne i} e^{s_{ij'}}}\ (j \ne i), \quad
        \mathrm{SND} = -\frac{1}{N} \sum_i \sum_{j \ne i} q_{ij} \log q_{ij}

    (``exclude_self=False`` keeps :math:`j = i` in both sums, as the authors' segmentation script does).
    :math:`0 \log 0 = 0`. Higher = denser neighbourhoods (the paper picks the model with the highest SND).

    Args:
        probs: softmax vectors of shape :math:`(N, K)` or :math:`(B, N, K)` (B sets scored separately).
        temperature: τ (the paper's 0.05).
        exclude_self: leave each vector out of its own neighbourhood.

    Returns:
        SND per set: a 0-dim tensor, or :math:`(B,)`; NaN for a set with no neighbour (N = 0, or N = 1 with
        ``exclude_self``). Computed in fp32 (fp64 stays fp64).

    Example:
        >>> snd(torch.softmax(torch.randn(5, 3), -1)).shape
        torch.Size([])
    """
    if not isinstance(probs, Tensor):
        raise TypeError(f"probs: expected a Tensor, got {type(probs).__name__}")
    if probs.ndim not in (2, 3):
        raise ValueError(f"probs: expected shape (N, K) or (B, N, K), got {tuple(probs.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    p = F.normalize(_float(probs), dim=-1)
    sim = p @ p.transpose(-1, -2) / temperature  # b n k, b m k -> b n m
    if exclude_self:
        eye = torch.eye(sim.shape[-1], dtype=torch.bool, device=sim.device)
        sim = sim.masked_fill(eye, -math.inf)
    q = torch.softmax(sim, dim=-1)  # a row of -inf only (N = 1) gives NaN: no neighbour
    return -torch.special.xlogy(q, q).sum(-1).mean(-1)


def prediction_entropy(probs: Tensor, *, dim: int = 1, normalize: bool = True) -> Tensor:
    r"""Entropy of softmax vectors along ``dim``, per element:

    .. math::
        H(p) = -\sum_k p_k \log p_k \;/\; \log K \quad (\text{``normalize``; } 0 \log 0 = 0)

    With K = 1 the entropy is 0 (a single class is certain). fp32 (fp64 stays fp64).

    Args:
        probs: softmax vectors, e.g. of shape :math:`(B, K, H, W)` with ``dim=1``.
        dim: the class dimension.
        normalize: divide by :math:`\log K` (the entropy then lies in [0, 1]).

    Returns:
        ``probs`` without ``dim``.

    Example:
        >>> prediction_entropy(torch.full((1, 4, 2, 2), 0.25)).tolist()
        [[[1.0, 1.0], [1.0, 1.0]]]
    """
    if not isinstance(probs, Tensor):
        raise TypeError(f"probs: expected a Tensor, got {type(probs).__name__}")
    p = _float(probs)
    h = -torch.special.xlogy(p, p).sum(dim)
    k = p.shape[dim]
    return h / math.log(k) if normalize and k > 1 else h


def class_means(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    r"""Per-class sums of feature vectors and their counts (fp64), the prototypes being sums / counts.

    Args:
        features: :math:`(N, D)`.
        labels: :math:`(N,)` int, in [0, K).
        num_classes: K.

    Returns:
        ``(sums (K, D) float64, counts (K,) float64)``.
    """
    if features.ndim != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"features, labels: expected shapes (N, D) and (N,), got {tuple(features.shape)} and "
                         f"{tuple(labels.shape)}")
    sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float64, device=features.device)
    sums.index_add_(0, labels.long(), features.double())
    counts = torch.bincount(labels.long(), minlength=num_classes)[:num_classes].double()
    return sums, counts


def _cosines(features: Tensor, prototypes: Tensor, valid: Tensor) -> Tensor:
    dtype = torch.promote_types(_float(features).dtype, _float(prototypes).dtype)
    cos = (F.normalize(features.to(dtype), dim=-1)
           @ F.normalize(prototypes.to(features.device, dtype), dim=-1).T)  # n d, k d -> n k
    return torch.where(valid.to(cos.device)[None, :], cos, torch.full_like(cos, -math.inf))  # n k


def prototype_scores(features: Tensor, predictions: Tensor, prototypes: Tensor, valid: Tensor | None = None
                     ) -> tuple[Tensor, Tensor]:
    r"""Agreement of the classifier with the nearest prototype, and the prototype margin, over N feature cells.

    With :math:`c_{ik}` the cosine of cell i's feature with prototype k (valid prototypes only):

    .. math::
        \mathrm{agreement} = \frac{1}{N} \sum_i [\arg\max_k c_{ik} = \hat y_i], \quad
        \mathrm{margin} = \frac{1}{N} \sum_i \big(c_{i(1)} - c_{i(2)}\big)

    where :math:`\hat y_i` is the classifier's argmax and :math:`c_{i(1)} \ge c_{i(2)}` the two largest
    cosines (a missing second prototype counts as cosine −1, as in :mod:`uda.signals`).

    Args:
        features: :math:`(N, D)`.
        predictions: :math:`(N,)` class ids.
        prototypes: :math:`(K, D)`.
        valid: :math:`(K,)` bool, the prototypes that exist (default: all).

    Returns:
        ``(agreement, margin)``, 0-dim fp32 tensors; NaN when N = 0 or no prototype is valid.
    """
    if features.ndim != 2 or prototypes.ndim != 2 or features.shape[1] != prototypes.shape[1]:
        raise ValueError(f"features, prototypes: expected shapes (N, D) and (K, D), got {tuple(features.shape)} "
                         f"and {tuple(prototypes.shape)}")
    if predictions.shape != features.shape[:1]:
        raise ValueError(f"predictions: expected shape {tuple(features.shape[:1])}, got {tuple(predictions.shape)}")
    k = prototypes.shape[0]
    valid = torch.ones(k, dtype=torch.bool) if valid is None else valid.bool()
    cos = _cosines(features, prototypes, valid)
    top = cos.topk(min(2, k), dim=1).values
    best = top[:, 0]
    second = top[:, 1].clamp_min(-1.0) if k > 1 else torch.full_like(best, -1.0)
    nearest = cos.argmax(1)
    nan = torch.full((), math.nan, dtype=cos.dtype, device=cos.device)
    any_valid = valid.any().to(cos.device)
    agreement = torch.where(any_valid, (nearest == predictions.to(cos.device)).to(cos.dtype).mean(), nan)
    margin = torch.where(any_valid, (best - second).mean(), nan)
    return agreement, margin


def separation(prototypes: Tensor, valid: Tensor | None = None) -> Tensor:
    r"""Mean over the valid classes of 1 − the largest cosine of its prototype with another valid class's:

    .. math::
        \mathrm{separation} = \frac{1}{|V|} \sum_{k \in V} \Big(1 - \max_{j \in V, j \ne k} \cos(\mu_k, \mu_j)\Big)

    Args:
        prototypes: :math:`(K, D)`.
        valid: :math:`(K,)` bool (default: all).

    Returns:
        0-dim fp64 tensor; NaN with fewer than 2 valid prototypes.
    """
    if prototypes.ndim != 2:
        raise ValueError(f"prototypes: expected shape (K, D), got {tuple(prototypes.shape)}")
    k = prototypes.shape[0]
    valid = (torch.ones(k, dtype=torch.bool) if valid is None else valid.bool()).to(prototypes.device)
    p = F.normalize(prototypes.double(), dim=-1)
    pair = valid[:, None] & valid[None, :] & ~torch.eye(k, dtype=torch.bool, device=p.device)
    cos = torch.where(pair, p @ p.T, torch.full((k, k), -math.inf, dtype=p.dtype, device=p.device))
    per_class = 1.0 - cos.max(1).values
    n = valid.sum()
    mean = torch.where(valid, per_class, torch.zeros_like(per_class)).sum() / n.clamp_min(1)
    return torch.where(n >= 2, mean, torch.full_like(mean, math.nan))


def _sample(generator: torch.Generator, total: int, count: int) -> Tensor:
    """``min(count, total)`` distinct positions in [0, total), from ``generator`` (CPU)."""
    return torch.randperm(total, generator=generator)[: min(count, total)]


@torch.no_grad()
def target_scores(model: nn.Module, loader: Iterable, device: torch.device | str, *, num_classes: int,
                  prototypes: Tensor | None = None, prototypes_valid: Tensor | None = None,
                  max_images: int | None = None, snd_pixels: int = 100, temperature: float = 0.05,
                  cells: int = 256, seed: int = 0, flip: bool = True, amp_dtype: torch.dtype | None = None
                  ) -> dict[str, float]:
    r"""Every label-free score of ``model`` on the images of ``loader`` (module docstring): :data:`SCORES`, and
    :data:`EMA_SCORES` when ``prototypes`` are given. Reads ``batch["image"]`` only (uint8 or float
    ``(B, 3, H, W)``; items with ``skipped`` set are left out); never a label.

    Args:
        model: returns ``(logits (B, K, h, w), features (B, D, h, w))``, as the pipeline's models do.
        loader: batches ``{"image": ...}`` (e.g. :class:`uda.loading.PseudoLabelSet` in a DataLoader).
        device: where the model runs.
        num_classes: K.
        prototypes: optional :math:`(K, D)` prototypes (e.g. ``contrast.target_ema.prototypes``).
        prototypes_valid: :math:`(K,)` bool, the given prototypes that exist (e.g. ``target_ema.initialized``).
        max_images: score the first ``max_images`` images only (default: all).
        snd_pixels: pixels sampled per image for SND (the authors' script: 100).
        temperature: SND's τ.
        cells: feature cells sampled per image for the prototype scores.
        seed: the sampling seed: the same positions for every model scored on the same images.
        flip: compute ``flip_agreement`` (a second forward pass on the flipped images).
        amp_dtype: run the network under autocast (scores in fp32).

    Returns:
        ``{name: float}`` (NaN where undefined, e.g. on an empty loader) plus ``"images"``, the count scored.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes: expected >= 1, got {num_classes}")
    if snd_pixels < 2 or cells < 1:
        raise ValueError(f"snd_pixels, cells: expected >= 2 and >= 1, got {snd_pixels} and {cells}")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    g_snd, g_cells = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    K = num_classes
    ent_sum = torch.zeros((), dtype=torch.float64, device=device)
    snd_sum = torch.zeros((), dtype=torch.float64, device=device)
    flip_sum = torch.zeros((), dtype=torch.float64, device=device)
    pixels, images = 0, 0
    sums, counts, cell_features, cell_predictions = None, None, [], []
    try:
        for batch in loader:
            image = batch["image"]
            if "skipped" in batch:  # on_bad_sample="skip": a placeholder image, not scored
                keep = torch.as_tensor(batch["skipped"]).reshape(-1) == 0
                image = image[keep]
            if max_images is not None:
                image = image[: max(0, max_images - images)]
            if image.shape[0] == 0:
                if max_images is not None and images >= max_images:
                    break
                continue
            b, _, H, W = image.shape
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits, features = model(image.to(device, non_blocking=True))
            logits, features = logits.float(), features.float()
            if logits.shape[1] != K:
                raise ValueError(f"model: expected logits with {K} classes, got shape {tuple(logits.shape)}")
            probs = torch.softmax(F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False), 1)
            ent_sum += prediction_entropy(probs).double().sum()
            if flip:
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    flipped, _ = model(image.flip(-1).to(device, non_blocking=True))
                flipped = F.interpolate(flipped.float(), size=(H, W), mode="bilinear", align_corners=False).flip(-1)
                flip_sum += (flipped.argmax(1) == probs.argmax(1)).sum().double()
            pixels += b * H * W
            index = torch.stack([_sample(g_snd, H * W, snd_pixels) for _ in range(b)]).to(device)  # b n
            picked = probs.flatten(2).gather(2, index[:, None, :].expand(b, K, -1))  # b k n
            snd_sum += snd(picked.transpose(1, 2), temperature=temperature).double().sum()
            h, w = features.shape[-2:]
            cell_logits = logits if logits.shape[-2:] == (h, w) else F.interpolate(
                logits, size=(h, w), mode="bilinear", align_corners=False)
            pred = cell_logits.argmax(1).flatten()  # (b h w)
            flat = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])  # b d h w -> (b h w) d
            s, c = class_means(flat, pred, K)
            sums, counts = (s, c) if sums is None else (sums + s, counts + c)
            cell_index = torch.cat([i * h * w + _sample(g_cells, h * w, cells) for i in range(b)]).to(device)
            cell_features.append(flat[cell_index])
            cell_predictions.append(pred[cell_index])
            images += b
            if max_images is not None and images >= max_images:
                break
    finally:
        model.train(was_training)
    nan = math.nan
    out = {name: nan for name in SCORES}
    if prototypes is not None:
        out.update({name: nan for name in EMA_SCORES})
    out["images"] = float(images)
    if images == 0:
        return out
    out["snd"] = float(snd_sum / images)
    out["neg_entropy"] = -float(ent_sum / pixels)
    if flip:
        out["flip_agreement"] = float(flip_sum / pixels)
    feats, preds = torch.cat(cell_features), torch.cat(cell_predictions)
    valid = counts > 0
    own = sums / counts.clamp_min(1)[:, None]
    agreement, margin = prototype_scores(feats, preds, own, valid)
    out.update(proto_agreement=float(agreement), proto_margin=float(margin),
               proto_separation=float(separation(own, valid)))
    if prototypes is not None:
        if prototypes.shape != (K, feats.shape[1]):
            raise ValueError(f"prototypes: expected shape {(K, feats.shape[1])}, got {tuple(prototypes.shape)}")
        given_valid = (torch.ones(K, dtype=torch.bool) if prototypes_valid is None
                       else prototypes_valid.bool()).to(device)
        agreement, margin = prototype_scores(feats, preds, prototypes.to(device), given_valid)
        out.update(ema_agreement=float(agreement), ema_margin=float(margin),
                   ema_separation=float(separation(prototypes.to(device), given_valid)))
    return out


def average_ranks(values: Sequence[float]) -> list[float]:
    """Average ranks (0-based; ties share the mean of their ranks) of the defined values; NaN stays NaN."""
    defined = [i for i, v in enumerate(values) if not math.isnan(v)]
    out = [math.nan] * len(values)
    order = sorted(defined, key=lambda i: values[i])
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2
        i = j + 1
    return out


def _ranks(values: Sequence[float]) -> list[float]:
    """:func:`average_ranks` normalised to [0, 1] (one defined value: 0.5)."""
    ranks = average_ranks(values)
    n = sum(not math.isnan(r) for r in ranks)
    return [r if math.isnan(r) else (0.5 if n == 1 else r / (n - 1)) for r in ranks]


def combine(rows: Sequence[Mapping[str, float]], names: Sequence[str] = COMBINED_FROM) -> list[float]:
    r"""One combined score per model: the mean over ``names`` of each score's rank among ``rows`` (average
    ranks for ties), normalised to [0, 1]:

    .. math::
        \mathrm{combined}_m = \frac{1}{|S_m|} \sum_{s \in S_m} \frac{\mathrm{rank}_s(m)}{M_s - 1}

    with :math:`S_m` the scores defined (not NaN) for model m and :math:`M_s` the models where s is defined
    (one model: rank 0.5). For two models it is the share of the scores that prefer each (ties: ½): a vote.
    A model with no defined score gets NaN. The value depends on the set of models compared.

    Args:
        rows: one ``{score name: value}`` per model (e.g. :func:`target_scores` of each round).
        names: the scores combined (default :data:`COMBINED_FROM`).

    Returns:
        ``len(rows)`` floats.
    """
    if not names:
        raise ValueError("names: expected at least one score name, got none")
    missing = [n for n in names for r in rows if n not in r]
    if missing:
        raise ValueError(f"rows: expected every row to hold {list(names)}, got rows without {sorted(set(missing))}")
    per_name = [_ranks([float(r[n]) for r in rows]) for n in names]
    out = []
    for m in range(len(rows)):
        ranks = [col[m] for col in per_name if not math.isnan(col[m])]
        out.append(sum(ranks) / len(ranks) if ranks else math.nan)
    return out
