"""Argument validation shared by every public function, and the global value-check switch.

Shape, dtype and setting checks read only metadata: they cost nothing and always run. Checks of tensor *values*
(label ids outside ``[0, K) ∪ {ignore_index}``) need one device-to-host read; they run in eager mode by default,
are skipped automatically while ``torch.compile`` traces or a CUDA graph is being captured, and can be switched
off globally with :func:`set_value_checks`.
"""

from __future__ import annotations

from typing import Iterable, Literal, Optional, Sequence, get_args

import torch
from torch import Tensor

__all__ = ["IGNORE_INDEX", "set_value_checks", "value_checks_enabled"]

IGNORE_INDEX = 255
"""The label id that marks pixels to ignore (Cityscapes/GTA5 convention)."""

EPS = 1e-6
"""Floor of the norms in every cosine, representable in fp16/bf16 (the protocl method spec, §2)."""

MIN_PURITY = 0.75
"""Default ``min_purity`` of the ``"purity"`` label resize (the protocl method spec, §2)."""

# The choices of every string setting, as types (documentation, IDEs, type checkers) and as tuples (validation).
Reduction = Literal["none", "mean", "sum"]
Absent = Literal["mask", "min_similarity"]
At = Literal["feature", "label"]
ResizeMode = Literal["nearest", "purity"]
FuseMode = Literal["fill", "agree", "dynamic_first"]
REDUCTIONS = get_args(Reduction)
ABSENT_MODES = get_args(Absent)
AT_MODES = get_args(At)
RESIZE_MODES = get_args(ResizeMode)
FUSE_MODES = get_args(FuseMode)

_VALUE_CHECKS = True


def set_value_checks(enabled: bool) -> None:
    r"""Switch the checks of tensor *values* on or off, globally.

    Value checks (label ids outside ``[0, K) ∪ {ignore_index}``, e.g. raw GTA5/Cityscapes ids passed instead of
    train ids) cost one device-to-host read per labelled input. They are on by default in eager mode and always
    skipped while compiling or capturing a CUDA graph. Switch them off for maximum speed once the data pipeline is
    trusted. Shape, dtype and setting checks are free and always run.

    Args:
        enabled: ``True`` to run value checks in eager mode, ``False`` to skip them.

    Example:
        >>> import protocl
        >>> protocl.set_value_checks(False)
        >>> protocl.value_checks_enabled()
        False
        >>> protocl.set_value_checks(True)
    """
    global _VALUE_CHECKS
    if not isinstance(enabled, bool):
        raise TypeError(f"set_value_checks: expected enabled to be a bool, got {type(enabled).__name__}")
    _VALUE_CHECKS = enabled


def value_checks_enabled() -> bool:
    """Return whether value checks are switched on (see :func:`set_value_checks`)."""
    return _VALUE_CHECKS


def _value_checks_active(t: Tensor) -> bool:
    if not _VALUE_CHECKS or torch.compiler.is_compiling():
        return False
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return True


# --------------------------------------------------------------------------------------------------- types


def check_tensor(x, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def check_float_tensor(x, name: str, ndims: Sequence[int], layout: str) -> Tensor:
    check_tensor(x, name)
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating point tensor of shape {layout}, got dtype {x.dtype}")
    check_ndim(x, name, ndims, layout)
    return x


def check_label_tensor(x, name: str, ndims: Sequence[int], layout: str) -> Tensor:
    check_tensor(x, name)
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(
            f"{name}: expected an integer (int64) label tensor of shape {layout}, got dtype {x.dtype}"
        )
    check_ndim(x, name, ndims, layout)
    return x


def check_bool_tensor(x, name: str, ndims: Sequence[int], layout: str) -> Tensor:
    check_tensor(x, name)
    if x.dtype != torch.bool:
        raise TypeError(f"{name}: expected a bool tensor of shape {layout}, got dtype {x.dtype}")
    check_ndim(x, name, ndims, layout)
    return x


def check_ndim(x: Tensor, name: str, ndims: Sequence[int], layout: str) -> None:
    if x.ndim not in tuple(ndims):
        raise ValueError(f"{name}: expected a tensor of shape {layout}, got shape {tuple(x.shape)}")


def check_dim_size(x: Tensor, dim: int, size: int, name: str, what: str) -> None:
    if x.shape[dim] != size:
        raise ValueError(
            f"{name}: expected size {size} at dimension {dim} ({what}), got shape {tuple(x.shape)}"
        )


def shape_equals(shape, expected) -> bool:
    """``tuple(shape) == tuple(expected)`` dimension by dimension (tuple ``in``/``==`` misreads symbolic sizes
    under ``torch.compile(dynamic=True)``)."""
    if len(shape) != len(expected):
        return False
    return all(a == b for a, b in zip(shape, expected))


def shape_in(shape, *candidates) -> bool:
    """Whether ``shape`` equals one of ``candidates`` (see :func:`shape_equals`)."""
    return any(shape_equals(shape, c) for c in candidates)


def check_same_device(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_b}: expected a tensor on {a.device} (the device of {name_a}), got {b.device}")


def check_int(value, name: str, minimum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def check_real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    return float(value)


def check_positive(value, name: str) -> float:
    v = check_real(value, name)
    if not v > 0:
        raise ValueError(f"{name}: expected a float > 0, got {value}")
    return v


def check_range(value, name: str, low: float, high: float, *, high_inclusive: bool = True) -> float:
    v = check_real(value, name)
    ok = low <= v <= high if high_inclusive else low <= v < high
    if not ok:
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"{name}: expected a value in [{low}, {high}{bracket}, got {value}")
    return v


def check_choice(value, name: str, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        expected = " | ".join(repr(c) for c in choices)
        raise ValueError(f"{name}: {value!r} is not a valid value; expected {expected}")
    return value


def check_size2(value, name: str) -> tuple:
    if (
        not isinstance(value, (tuple, list, torch.Size))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ValueError(f"{name}: expected a pair of positive ints (H, W), got {value!r}")
    return (int(value[0]), int(value[1]))


def check_ignore_index(value, name: str = "ignore_index") -> int:
    return check_int(value, name)


def check_reduction(reduction) -> str:
    return check_choice(reduction, "reduction", REDUCTIONS)


def check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------------------------------- groups


def check_features_labels(features, labels, fname: str = "features", lname: str = "labels") -> None:
    """Pixel features ``(B, D, h, w)`` and labels ``(B, H, W)`` of one batch, on one device."""
    check_float_tensor(features, fname, (4,), "(B, D, h, w)")
    check_label_tensor(labels, lname, (3,), "(B, H, W)")
    check_same_device(fname, features, lname, labels)
    if labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"{lname}: expected batch size {features.shape[0]} (the batch of {fname} {tuple(features.shape)}), "
            f"got shape {tuple(labels.shape)}"
        )


def check_features_prototypes(features, prototypes, valid, fname: str, pname: str) -> tuple:
    """Pixel features ``(B, D, h, w)``, prototypes ``(B, K, D)``/``(K, D)`` and ``valid``; returns ``(B, K)``."""
    check_float_tensor(features, fname, (4,), "(B, D, h, w)")
    check_float_tensor(prototypes, pname, (2, 3), "(B, K, D) or (K, D)")
    check_same_device(fname, features, pname, prototypes)
    B, D = features.shape[:2]
    check_dim_size(prototypes, -1, D, pname, f"D, the channels of {fname} {tuple(features.shape)}")
    if prototypes.ndim == 3:
        check_dim_size(prototypes, 0, B, pname, f"B, the batch of {fname} {tuple(features.shape)}")
    K = prototypes.shape[-2]
    if valid is not None:
        check_bool_tensor(valid, "valid", (1, 2), "(B, K) or (K,)")
        check_same_device(fname, features, "valid", valid)
        if not shape_in(valid.shape, (K,), (B, K)):
            raise ValueError(f"valid: expected shape {(K,)} or {(B, K)}, got {tuple(valid.shape)}")
    return B, K


def check_pixel_weights(weights, features: Tensor, labels: Tensor) -> None:
    """Non-negative pixel weights on the feature grid ``(B, h, w)`` or the label grid ``(B, H, W)``."""
    check_float_tensor(weights, "weights", (3,), "(B, h, w) or (B, H, W)")
    check_same_device("features", features, "weights", weights)
    B, _, h, w = features.shape
    shape = tuple(weights.shape)
    if not shape_in(shape, (B, h, w), (B,) + tuple(labels.shape[-2:])):
        raise ValueError(
            f"weights: expected shape {(B, h, w)} (feature grid) or {(B,) + tuple(labels.shape[-2:])} "
            f"(label grid), got {shape}"
        )
    if _value_checks_active(weights) and bool((weights < 0).any()):
        raise ValueError("weights: expected non-negative pixel weights, got a negative value")


# --------------------------------------------------------------------------------------------------- values


def check_label_values(labels: Tensor, num_classes: int, ignore_index: int, name: str) -> None:
    """Raise if a label is outside ``[0, K) ∪ {ignore_index}`` (one host read; skipped when compiling)."""
    if not _value_checks_active(labels) or labels.numel() == 0:
        return
    # bool temporaries only (a label-sized int64 temporary costs more than the comparisons) and one host read
    bad = (labels < 0) | (labels >= num_classes)
    if not 0 <= ignore_index < num_classes:  # (an ignore_index inside [0, K) is in range already)
        bad &= labels != ignore_index
    if bool(bad.any()):
        example = int(labels[bad][0])
        raise ValueError(
            f"{name}: expected label ids in [0, {num_classes}) or ignore_index={ignore_index}, got {example} "
            f"(raw GTA5/Cityscapes label ids must be mapped to train ids first; "
            f"protocl.set_value_checks(False) disables this check)"
        )
