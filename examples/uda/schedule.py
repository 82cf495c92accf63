r"""DAFormer's optimiser and learning-rate schedule: AdamW with parameter-wise multipliers, linear warm-up into a
polynomial decay.

Written from DAFormer's ``configs/_base_/schedules/adamw.py``, ``poly10warm.py`` and the ``paramwise_cfg`` of its
``configs/daformer/*`` files, and mmcv 1.3's ``DefaultOptimizerConstructor`` and ``PolyLrUpdaterHook`` (the
versions DAFormer runs); nothing of them is reproduced.

- :func:`adamw_param_groups`: AdamW(lr 6e-5, betas (0.9, 0.999), weight decay 0.01) with mmcv's ``custom_keys``
  ``{'head': lr_mult 10, 'pos_block': decay_mult 0, 'norm': decay_mult 0}``: a key matches when it is a
  **substring** of the parameter's name, the longest matching key wins (ties: alphabetical), and nothing else
  is special (no rule for biases: DAFormer sets none). So every ``decode_head.*`` parameter (its BatchNorms
  included) trains at 10x with weight decay, and every encoder LayerNorm (``norm1``, ``attn.norm``,
  ``patch_embed*.norm``, ``norm4``...) without.
- :func:`scheduled_lr` / :func:`lr_factor` / :func:`set_lr_`: mmcv's ``poly`` policy by iteration with ``linear``
  warm-up: ``regular = (base - min_lr)(1 - i / max_iters)^power + min_lr`` and, for ``i < warmup_iters``,
  ``lr = regular (1 - (1 - i / warmup_iters)(1 - warmup_ratio))`` (the warm-up scales the poly lr). ``i`` is
  mmcv's ``runner.iter``: the number of iterations done, 0 for the first, set before the iteration's step.

Differences from mmcv, none of which changes a trained model: parameters sharing multipliers share one group
(mmcv makes a group per parameter; same updates, far fewer groups for the fused/foreach AdamW); parameters that
do not require a gradient are left out (mmcv adds them to groups where AdamW never updates them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

LR = 6e-5
WEIGHT_DECAY = 0.01
BETAS = (0.9, 0.999)
HEAD_LR_MULT = 10.0
HEAD_KEYS = ("head",)
NO_DECAY_KEYS = ("pos_block", "norm")
MAX_ITERS = 40000
WARMUP_ITERS = 1500
WARMUP_RATIO = 1e-6


def _match_order(keys: Sequence[str]) -> list[str]:
    """mmcv's order of custom keys: longest first, alphabetical among equal lengths."""
    return sorted(sorted(set(keys)), key=len, reverse=True)


def adamw_param_groups(model: nn.Module, *, lr: float = LR, weight_decay: float = WEIGHT_DECAY,
                       head_lr_mult: float = HEAD_LR_MULT, head_keys: Sequence[str] = HEAD_KEYS,
                       no_decay_keys: Sequence[str] = NO_DECAY_KEYS,
                       betas: tuple[float, float] = BETAS) -> list[dict]:
    r"""DAFormer's AdamW parameter groups for ``model`` (pass them to ``torch.optim.AdamW``, or use
    :func:`build_adamw`).

    A parameter whose name (``model.named_parameters()``; mmcv writes a top-level one as ``.name``) contains one
    of ``head_keys`` or ``no_decay_keys`` takes that key's multipliers, the longest matching key first and
    alphabetical order among equally long ones (mmcv's ``custom_keys`` rule): ``head_keys`` give
    ``lr x head_lr_mult`` with full weight decay, ``no_decay_keys`` give ``lr`` without weight decay. Every other
    parameter gets ``lr`` and ``weight_decay``. With the defaults a ``decode_head.*.norm.*`` parameter would be a
    head parameter *with* weight decay ("head" and "norm" are equally long, "head" comes first), as in DAFormer.

    Each group is ``{"params", "lr", "base_lr", "weight_decay", "betas"}``; ``base_lr`` is the group's lr before
    any schedule (:func:`set_lr_` scales it; mmcv's ``initial_lr``). Groups come in the order their first
    parameter appears; parameters without ``requires_grad`` are left out.

    Args:
        model: the student (encoder and decoder; DAFormer's names: ``backbone.*``, ``decode_head.*``).
        lr: the base learning rate (the recipe: 6e-5).
        weight_decay: AdamW's decoupled weight decay (the recipe: 0.01).
        head_lr_mult: the lr multiplier of ``head_keys`` parameters (the recipe: 10).
        head_keys: substrings marking the decoder (the recipe: ``("head",)``).
        no_decay_keys: substrings marking parameters without weight decay (the recipe: ``("pos_block", "norm")``).
        betas: AdamW's betas (the recipe: (0.9, 0.999)).
    """
    if not lr > 0.0:
        raise ValueError(f"lr: expected a float > 0, got {lr!r}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay: expected a float >= 0, got {weight_decay!r}")
    if not head_lr_mult > 0.0:
        raise ValueError(f"head_lr_mult: expected a float > 0, got {head_lr_mult!r}")
    for name, keys in (("head_keys", head_keys), ("no_decay_keys", no_decay_keys)):
        if isinstance(keys, str) or any(not isinstance(k, str) or not k for k in keys):
            raise ValueError(f"{name}: expected a sequence of non-empty strings, got {keys!r}")
    both = set(head_keys) & set(no_decay_keys)
    if both:
        raise ValueError(f"no_decay_keys: expected keys not in head_keys, got {sorted(both)} in both")
    multipliers = {**{k: (head_lr_mult, 1.0) for k in head_keys}, **{k: (1.0, 0.0) for k in no_decay_keys}}
    order = _match_order(list(multipliers))
    groups: dict[tuple[float, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        full = name if "." in name else f".{name}"
        key = next((k for k in order if k in full), None)
        lr_mult, decay_mult = multipliers[key] if key is not None else (1.0, 1.0)
        group = groups.setdefault((lr_mult, decay_mult), {
            "params": [], "lr": lr * lr_mult, "base_lr": lr * lr_mult, "weight_decay": weight_decay * decay_mult,
            "betas": tuple(betas)})
        group["params"].append(param)
    return list(groups.values())


def build_adamw(model: nn.Module, **kwargs) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over :func:`adamw_param_groups` (``kwargs`` go there; eps 1e-8, PyTorch's default
    and mmcv's)."""
    return torch.optim.AdamW(adamw_param_groups(model, **kwargs))


def scheduled_lr(base_lr: float, iteration: int, *, max_iters: int = MAX_ITERS, warmup_iters: int = WARMUP_ITERS,
                 warmup_ratio: float = WARMUP_RATIO, power: float = 1.0, min_lr: float = 0.0) -> float:
    r"""mmcv's learning rate at ``iteration`` for a group whose initial lr is ``base_lr`` (policy ``poly``, warm-up
    ``linear``, by iteration):

    .. math::
        r_i = (\eta_0 - \eta_{min}) (1 - i / N)^p + \eta_{min}, \qquad
        \eta_i = \begin{cases} r_i \, (1 - (1 - i / W)(1 - \rho)) & i < W \\ r_i & i \ge W \end{cases}

    so ``eta_0 = rho r_0`` and the warm-up ends at ``i = W`` on the poly curve (DAFormer's ``poly10warm``:
    ``N = 40000, W = 1500, rho = 1e-6, p = 1, eta_min = 0``). ``i`` counts from 0: the lr of the first
    optimiser step is ``eta_0``.

    Args:
        base_lr: ``eta_0``, the group's lr without schedule.
        iteration: ``i``, in ``[0, max_iters]``.
        max_iters: ``N`` (the recipe: 40000).
        warmup_iters: ``W`` (the recipe: 1500; 0: no warm-up).
        warmup_ratio: ``rho``, the first warm-up step's share of the poly lr, in ``(0, 1]`` (the recipe: 1e-6).
        power: ``p`` (the recipe: 1.0).
        min_lr: ``eta_min``, an absolute lr (the recipe: 0).
    """
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"max_iters: expected an int >= 1, got {max_iters!r}")
    if isinstance(iteration, bool) or not isinstance(iteration, int) or not 0 <= iteration <= max_iters:
        raise ValueError(f"iteration: expected an int in [0, {max_iters}], got {iteration!r}")
    if isinstance(warmup_iters, bool) or not isinstance(warmup_iters, int) or warmup_iters < 0:
        raise ValueError(f"warmup_iters: expected an int >= 0, got {warmup_iters!r}")
    if not 0.0 < warmup_ratio <= 1.0:
        raise ValueError(f"warmup_ratio: expected a float in (0, 1], got {warmup_ratio!r}")
    if not power > 0.0:
        raise ValueError(f"power: expected a float > 0, got {power!r}")
    if not min_lr >= 0.0:
        raise ValueError(f"min_lr: expected a float >= 0, got {min_lr!r}")
    regular = (base_lr - min_lr) * (1.0 - iteration / max_iters) ** power + min_lr
    if iteration >= warmup_iters:
        return regular
    return regular * (1.0 - (1.0 - iteration / warmup_iters) * (1.0 - warmup_ratio))


def lr_factor(iteration: int, *, max_iters: int = MAX_ITERS, warmup_iters: int = WARMUP_ITERS,
              warmup_ratio: float = WARMUP_RATIO, power: float = 1.0, min_lr: float = 0.0,
              base_lr: float = 1.0) -> float:
    r"""``scheduled_lr(base_lr, iteration, ...) / base_lr``: the factor on a group's base lr at ``iteration``.

    With ``min_lr = 0`` (the recipe) it does not depend on ``base_lr`` and every group's lr is
    ``group["base_lr"] * lr_factor(i)``; with ``min_lr > 0`` mmcv's ``min_lr`` is absolute, so pass the group's
    ``base_lr`` (or use :func:`set_lr_`). Arguments as :func:`scheduled_lr`.
    """
    if not base_lr > 0.0:
        raise ValueError(f"base_lr: expected a float > 0, got {base_lr!r}")
    return scheduled_lr(base_lr, iteration, max_iters=max_iters, warmup_iters=warmup_iters,
                        warmup_ratio=warmup_ratio, power=power, min_lr=min_lr) / base_lr


def set_lr_(optimizer: torch.optim.Optimizer, iteration: int, **schedule) -> None:
    """Sets every group's ``lr`` to :func:`scheduled_lr` of its ``base_lr`` at ``iteration`` (``schedule``: the
    keyword arguments of :func:`scheduled_lr`); call it before the iteration's ``optimizer.step()`` (mmcv's
    ``before_train_iter``). Host floats only: no device read."""
    for i, group in enumerate(optimizer.param_groups):
        if "base_lr" not in group:
            raise ValueError(f"optimizer: expected param groups with 'base_lr' (adamw_param_groups), got group {i} "
                             f"with keys {sorted(k for k in group if k != 'params')}")
        group["lr"] = scheduled_lr(group["base_lr"], iteration, **schedule)
