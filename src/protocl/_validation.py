"""Argument validation of every public function, and the value checks with their global switch.

Shape, dtype and setting checks read only metadata: they cost nothing and always run. Checks of tensor *values*
(label ids outside ``[0, K) ∪ {ignore_index}``, negative pixel weights) run by default in eager mode, are skipped
while ``torch.compile`` traces or a CUDA graph is captured, can be switched off with :func:`set_value_checks`, and
never synchronise a CUDA device with the host:

- a tensor not on CUDA is checked at once and the call itself raises;
- a CUDA tensor is checked *on the device*: its verdict (a count and an example value) is copied to pinned host
  memory without blocking and queued; every public function and method of protocl first calls
  :func:`report_pending`, which raises the first failed verdict that has reached the host (so the next call
  reports it, or a later one if the device is behind), and :func:`flush_value_checks` waits for all of them.

Every value-check message names the public function that received the tensor and the argument.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Iterable, Optional, Sequence, Tuple, TypeVar

import torch
from torch import Tensor

from ._types import REDUCTIONS, Reduction

__all__ = ["set_value_checks", "value_checks_enabled", "flush_value_checks"]

_VALUE_CHECKS = True


def set_value_checks(enabled: bool) -> None:
    r"""Switch the checks of tensor *values* on or off, globally.

    Value checks (label ids outside ``[0, K) ∪ {ignore_index}``, e.g. raw GTA5/Cityscapes ids passed instead of
    train ids; negative pixel weights) are on by default in eager mode and always skipped while compiling or
    capturing a CUDA graph. They never synchronise a CUDA device: on CPU a bad label raises in the call itself;
    on CUDA the check runs on the device and its ``ValueError`` is raised by the next protocl call that finds the
    verdict on the host (usually the next call) or by :func:`flush_value_checks`. Their cost on CPU is one pass
    over each label map (about 0.3-0.5 ms for ``(2, 730, 730)`` int64 labels on one thread, see
    ``docs/benchmarks.md``); on CUDA a few small kernels. Switch them off for maximum speed once the data
    pipeline is trusted; verdicts already queued are still reported. Shape, dtype and setting checks are free and
    always run.

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
    report_pending()  # after the switch: a verdict of an earlier call is still reported, and the setting holds


def value_checks_enabled() -> bool:
    """Return whether value checks are switched on (see :func:`set_value_checks`)."""
    report_pending()
    return _VALUE_CHECKS


def flush_value_checks() -> None:
    r"""Wait for the value checks still running on a device, and raise the first one that failed.

    On CUDA, value checks run on the device and report through pinned host memory without synchronising; their
    ``ValueError`` is raised by the first protocl call that finds the verdict on the host. Call this where your
    step synchronises anyway (logging a loss, the end of an epoch, before saving a checkpoint) to be told for
    sure: it waits for the pending checks (a host synchronisation) and raises the first failure. On CPU every
    check has already raised in its own call, and this returns at once.

    Raises:
        ValueError: the message of the first failed check, naming the function that received the tensor and the
            argument.

    Example:
        >>> import protocl
        >>> protocl.flush_value_checks()  # nothing pending
    """
    _poll(wait=True)


def report_pending() -> None:
    """Raise the first failed device-side value check whose verdict has reached the host; never waits.

    The first statement of every public function and method of protocl (skipped while compiling or capturing).
    """
    if _PENDING and not torch.compiler.is_compiling() and not _capturing():
        _poll()


def _capturing() -> bool:
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def _value_checks_active(t: Tensor) -> bool:
    if not _VALUE_CHECKS or t.device.type == "meta" or torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


# --------------------------------------------------------------------------------------------------- deferral

# Verdicts of device-side checks on their way to the host: (verdict, event, message). ``verdict`` is an int64 host
# tensor ``[bad count, example value]`` (pinned; filled by a non-blocking copy); ``event`` completes when the copy
# has landed (None: already there). Past ``_MAX_PENDING`` entries the oldest is waited for.
_PENDING: collections.deque = collections.deque()
_MAX_PENDING = 256


def deferred(t: Tensor) -> bool:
    """Whether the value checks of ``t`` run on its device and report later (CUDA tensors). The test suite
    rehearses that path on CPU by patching this function (the ``deferred_checks`` fixture)."""
    return t.is_cuda


def _defer(verdict: Tensor, message: Callable[[int], str]) -> None:
    """Queue a verdict ``[bad count, example]`` (int64, on the checked tensor's device) without synchronising."""
    host, event = verdict, None
    if verdict.is_cuda:
        host = torch.empty(verdict.shape, dtype=verdict.dtype, pin_memory=True)
        host.copy_(verdict, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
    _PENDING.append((host, event, message))
    if len(_PENDING) > _MAX_PENDING:
        _poll(wait=True, limit=1)


def _poll(*, wait: bool = False, limit: Optional[int] = None) -> None:
    """Raise the first failed verdict among those on the host (all of them, or the oldest ``limit``, when
    ``wait``); never blocks unless ``wait``."""
    done = 0
    while _PENDING and (limit is None or done < limit):
        host, event, message = _PENDING[0]
        if event is not None:
            if wait:
                event.synchronize()
            elif not event.query():
                return
        _PENDING.popleft()
        done += 1
        count, example = (int(v) for v in host.tolist())
        if count:
            _PENDING.clear()  # one report per failure burst: later verdicts of the same bad data say the same
            raise ValueError(message(example) + " [checked on the device, reported by a later protocl call]")


# --------------------------------------------------------------------------------------------------- types


def check_tensor(x: Any, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def check_float_tensor(x: Any, name: str, ndims: Sequence[int], layout: str) -> Tensor:
    check_tensor(x, name)
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating point tensor of shape {layout}, got dtype {x.dtype}")
    check_ndim(x, name, ndims, layout)
    return x


def check_label_tensor(x: Any, name: str, ndims: Sequence[int], layout: str) -> Tensor:
    check_tensor(x, name)
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(
            f"{name}: expected an integer (int64) label tensor of shape {layout}, got dtype {x.dtype}"
        )
    check_ndim(x, name, ndims, layout)
    return x


LABEL_LAYOUT = "(B, H, W) or (B, 1, H, W)"


def label_map(x: Any, name: str) -> Tensor:
    """A label map ``(B, H, W)``, or mmseg's ``gt_semantic_seg`` ``(B, 1, H, W)`` returned as the ``(B, H, W)``
    view of it (no copy)."""
    check_label_tensor(x, name, (3, 4), LABEL_LAYOUT)
    if x.ndim == 4:
        if x.shape[1] != 1:
            raise ValueError(
                f"{name}: expected a tensor of shape {LABEL_LAYOUT} (a 4-d label map has one channel), "
                f"got shape {tuple(x.shape)}"
            )
        return x[:, 0]
    return x


def check_bool_tensor(x: Any, name: str, ndims: Sequence[int], layout: str) -> Tensor:
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


def shape_equals(shape: Sequence[int], expected: Sequence[int]) -> bool:
    """``tuple(shape) == tuple(expected)`` dimension by dimension (tuple ``in``/``==`` misreads symbolic sizes
    under ``torch.compile(dynamic=True)``)."""
    if len(shape) != len(expected):
        return False
    return all(a == b for a, b in zip(shape, expected))


def shape_in(shape: Sequence[int], *candidates: Sequence[int]) -> bool:
    """Whether ``shape`` equals one of ``candidates`` (see :func:`shape_equals`)."""
    return any(shape_equals(shape, c) for c in candidates)


def check_same_device(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_b}: expected a tensor on {a.device} (the device of {name_a}), got {b.device}")


def check_int(value: Any, name: str, minimum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def check_real(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    return float(value)


def check_positive(value: Any, name: str) -> float:
    v = check_real(value, name)
    if not v > 0:
        raise ValueError(f"{name}: expected a float > 0, got {value}")
    return v


def check_range(value: Any, name: str, low: float, high: float, *, high_inclusive: bool = True) -> float:
    v = check_real(value, name)
    ok = low <= v <= high if high_inclusive else low <= v < high
    if not ok:
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"{name}: expected a value in [{low}, {high}{bracket}, got {value}")
    return v


_Choice = TypeVar("_Choice", bound=str)


def check_choice(value: object, name: str, choices: Iterable[_Choice]) -> _Choice:
    """``value`` if it is one of ``choices`` (typed as the choices' ``Literal``), else ``ValueError``."""
    options = tuple(choices)
    if isinstance(value, str):
        for option in options:
            if value == option:
                return option
    expected = " | ".join(repr(c) for c in options)
    raise ValueError(f"{name}: {value!r} is not a valid value; expected {expected}")


def check_size2(value: Any, name: str) -> Tuple[int, int]:
    if (
        not isinstance(value, (tuple, list, torch.Size))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ValueError(f"{name}: expected a pair of positive ints (H, W), got {value!r}")
    return (int(value[0]), int(value[1]))


def check_ignore_index(value: Any, name: str = "ignore_index") -> int:
    return check_int(value, name)


def check_reduction(reduction: object) -> Reduction:
    return check_choice(reduction, "reduction", REDUCTIONS)


def check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------------------------------- groups


def channels_last_error(features: Tensor, name: str, why: str) -> ValueError:
    """The error for features given as ``(B, h, w, D)``: names the layout and the fix."""
    return ValueError(
        f"{name}: expected channels-first features of shape (B, D, h, w), got shape {tuple(features.shape)}, "
        f"which looks channels-last (B, h, w, D) ({why}); pass {name}.permute(0, 3, 1, 2)"
    )


def _scales_agree(grid: Sequence[int], label_size: Sequence[int], tolerance: float) -> bool:
    """Whether a grid ``(a, b)`` scales to the label grid ``(H, W)`` by nearly the same factor on both axes."""
    (a, b), (H, W) = grid, label_size
    if a <= 0 or b <= 0:
        return False
    ratio = (H / a) / (W / b)
    return 1 / tolerance <= ratio <= tolerance


def check_layout_against_labels(features: Tensor, labels: Tensor, fname: str) -> None:
    """Raise when ``(B, D, h, w)`` features are really channels-last ``(B, h, w, D)``, as far as the label grid
    shows it, from metadata alone: ``shape[1:3]`` fits the label grid (equal, or the same downsampling on both axes
    within 10 %) while ``shape[2:4]`` does not (its axes' factors differ by more than 1.5x), on grids of at least
    4 x 4. When D is close to w both readings fit (docs/conventions.md, Shapes); what knows D catches it."""
    H, W = labels.shape[-2], labels.shape[-1]
    first, last = tuple(features.shape[2:4]), tuple(features.shape[1:3])
    if shape_equals(first, (H, W)) or min(last) < 4 or _scales_agree(first, (H, W), 1.5):
        return
    if shape_equals(last, (H, W)):
        raise channels_last_error(features, fname, f"its dimensions 1-2 {last} are the label grid {(H, W)}")
    if _scales_agree(last, (H, W), 1.1):
        raise channels_last_error(
            features, fname, f"its dimensions 1-2 {last}, not 2-3 {first}, are a downsampled label grid {(H, W)}"
        )


def check_channels(features: Tensor, dim: int, fname: str, what: str) -> None:
    """``features.shape[1] == dim``, naming the channels-last layout when it is that."""
    if features.shape[1] != dim:
        if features.shape[-1] == dim:
            raise channels_last_error(features, fname, f"its last dimension is D = {dim}, {what}")
        check_dim_size(features, 1, dim, fname, what)


def check_features_labels(features: Any, labels: Any, fname: str = "features", lname: str = "labels") -> Tensor:
    """Pixel features ``(B, D, h, w)`` and labels ``(B, H, W)`` / ``(B, 1, H, W)`` of one batch, on one device;
    returns the ``(B, H, W)`` labels."""
    check_float_tensor(features, fname, (4,), "(B, D, h, w)")
    labels = label_map(labels, lname)
    check_same_device(fname, features, lname, labels)
    if labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"{lname}: expected batch size {features.shape[0]} (the batch of {fname} {tuple(features.shape)}), "
            f"got shape {tuple(labels.shape)}"
        )
    check_layout_against_labels(features, labels, fname)
    return labels


def check_features_prototypes(features: Any, prototypes: Any, valid: Any, fname: str, pname: str) -> Tuple[int, int]:
    """Pixel features ``(B, D, h, w)``, prototypes ``(B, K, D)``/``(K, D)`` and ``valid``; returns ``(B, K)``."""
    check_float_tensor(features, fname, (4,), "(B, D, h, w)")
    check_float_tensor(prototypes, pname, (2, 3), "(B, K, D) or (K, D)")
    check_same_device(fname, features, pname, prototypes)
    B = features.shape[0]
    D = prototypes.shape[-1]
    check_channels(features, D, fname, f"the channels of {pname} {tuple(prototypes.shape)}")
    if prototypes.ndim == 3:
        check_dim_size(prototypes, 0, B, pname, f"B, the batch of {fname} {tuple(features.shape)}")
    K = prototypes.shape[-2]
    if valid is not None:
        check_bool_tensor(valid, "valid", (1, 2), "(B, K) or (K,)")
        check_same_device(fname, features, "valid", valid)
        if not shape_in(valid.shape, (K,), (B, K)):
            raise ValueError(f"valid: expected shape {(K,)} or {(B, K)}, got {tuple(valid.shape)}")
    return B, K


def check_pixel_weights(
    weights: Any, features: Tensor, labels: Tensor, name: str, fn: str, *, per_image: bool = False
) -> Tensor:
    """Non-negative pixel weights on the feature grid ``(B, h, w)`` or the label grid ``(B, H, W)`` (a singleton
    channel axis ``(B, 1, ·, ·)`` is squeezed), or with ``per_image`` one weight per image ``(B,)``; returns
    them in 1-d or 3-d form. ``fn``: the public function, named by the value check."""
    layout = "(B,), (B, h, w) or (B, H, W)" if per_image else "(B, h, w) or (B, H, W)"
    check_float_tensor(weights, name, (1, 3, 4) if per_image else (3, 4), layout)
    check_same_device("features", features, name, weights)
    if weights.ndim == 4:
        if weights.shape[1] != 1:
            raise ValueError(f"{name}: expected shape {layout} or a singleton channel, got {tuple(weights.shape)}")
        weights = weights[:, 0]
    B, _, h, w = features.shape
    label_grid = (B,) + tuple(labels.shape[-2:])
    shape = tuple(weights.shape)
    if weights.ndim == 1:
        if not shape_equals(shape, (B,)):
            raise ValueError(f"{name}: expected shape {(B,)} (one weight per image), got {shape}")
    elif not shape_in(shape, (B, h, w), label_grid):
        raise ValueError(f"{name}: expected shape {(B, h, w)} (feature grid) or {label_grid} (label grid), got {shape}")
    check_weight_values(weights, name, fn)
    return weights


def class_weight_vector(class_weight: Any, num_classes: int, features: Tensor, fname: str) -> Optional[Tensor]:
    """``class_weight`` as ``(K,)`` or ``(B, K)`` on the device of ``features`` (``B`` their batch); DASS's
    ``(K, 1)`` column is flattened (it cannot be ``(B, K)`` unless K = 1, where both readings are the same)."""
    if class_weight is None:
        return None
    K, B = num_classes, features.shape[0]
    check_float_tensor(class_weight, "class_weight", (1, 2), "(K,) or (B, K)")
    check_same_device(fname, features, "class_weight", class_weight)
    if class_weight.ndim == 2 and shape_equals(class_weight.shape, (K, 1)) and not shape_equals(
        class_weight.shape, (B, K)
    ):
        class_weight = class_weight.reshape(K)  # a view
    if not shape_in(class_weight.shape, (K,), (B, K)):
        raise ValueError(
            f"class_weight: expected shape {(K,)} (one weight per class, as F.cross_entropy's weight; a column "
            f"{(K, 1)} is accepted too) or {(B, K)} (per image), got {tuple(class_weight.shape)}"
        )
    return class_weight


def check_contrast_inputs(
    features: Any, prototypes: Any, labels: Any, valid: Any, class_weight: Any, pixel_weight: Any,
    names: Tuple[str, str, str], fn: str,
) -> Tuple[int, Tensor, Optional[Tensor], Optional[Tensor]]:
    """The tensors of one contrastive term (``names``: of the features, prototypes and labels); returns ``(K,
    labels (B, H, W), class_weight, pixel_weight)`` normalised (a ``(B, 1, H, W)`` label map squeezed, a
    ``(K, 1)`` class weight flattened)."""
    fname, pname, lname = names
    _, K = check_features_prototypes(features, prototypes, valid, fname, pname)
    labels = check_features_labels(features, labels, fname, lname)
    class_weight = class_weight_vector(class_weight, K, features, fname)
    if pixel_weight is not None:
        pixel_weight = check_pixel_weights(pixel_weight, features, labels, "pixel_weight", fn, per_image=True)
    return K, labels, class_weight, pixel_weight


# --------------------------------------------------------------------------------------------------- values


def _label_message(fn: str, name: str, num_classes: int, ignore_index: int) -> Callable[[int], str]:
    def message(example: int) -> str:
        return (
            f"{fn}: {name}: expected label ids in [0, {num_classes}) or ignore_index={ignore_index}, got {example} "
            f"(raw GTA5/Cityscapes label ids must be mapped to train ids first; "
            f"protocl.set_value_checks(False) disables this check)"
        )

    return message


def _host_label_violation(labels: Tensor, num_classes: int, ignore_index: int) -> Optional[int]:
    """A bad id of host ``labels``, or None. One ``aminmax`` pass; when the largest id is ``ignore_index`` (in
    ``[K, 255]``: the common case of a map with ignored pixels) a second pass over a uint8 copy, where adding
    ``256 - ignore_index`` wraps ``ignore_index`` to 0 and keeps the other ids in order, so that the largest
    other id comes out of one ``amax`` with no label-sized int64 temporary (6x faster than a ``where`` pass on a
    ``(2, 730, 730)`` map; docs/benchmarks.md). Other cases: a ``where`` pass."""
    lo, hi = (int(v) for v in torch.aminmax(labels))
    if lo >= 0 and hi < num_classes:
        return None
    if ignore_index not in (lo, hi):
        return lo if lo < 0 else hi
    if lo >= 0 and hi == ignore_index <= 255:  # every id in [0, ignore_index]: they fit a byte
        shift = 256 - ignore_index
        small = labels if labels.dtype == torch.uint8 else labels.to(torch.uint8)
        top = int((small + shift).amax())  # uint8 arithmetic: ignore_index -> 0, x -> x + shift (no wrap)
        rest = top - shift if top > 0 else None
        return rest if rest is not None and rest >= num_classes else None
    # ignore_index (outside [0, K)) is an extreme: look at the other ids
    others = torch.where(labels == ignore_index, torch.zeros((), dtype=labels.dtype), labels)
    lo, hi = (int(v) for v in torch.aminmax(others))
    if lo < 0:
        return lo
    return hi if hi >= num_classes else None


def _device_label_verdict(labels: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """``[bad count, an example bad id]`` int64 on the labels' device (no host read)."""
    bad = (labels < 0) | (labels >= num_classes)
    if not 0 <= ignore_index < num_classes:
        bad &= labels != ignore_index
    example = torch.where(bad, labels.long(), torch.full((), -(2**62), dtype=torch.int64, device=labels.device))
    return torch.stack([bad.sum(dtype=torch.int64), example.amax()])


def check_label_values(labels: Tensor, num_classes: int, ignore_index: int, name: str, fn: str) -> None:
    """Raise if a label is outside ``[0, K) ∪ {ignore_index}``, naming the public function ``fn`` and the argument
    ``name`` (skipped when off or compiling; on CUDA checked on the device and reported later)."""
    if not _value_checks_active(labels) or labels.numel() == 0:
        return
    message = _label_message(fn, name, num_classes, ignore_index)
    if deferred(labels):
        _defer(_device_label_verdict(labels, num_classes, ignore_index), message)
        return
    example = _host_label_violation(labels, num_classes, ignore_index)
    if example is not None:
        raise ValueError(message(example))


def check_weight_values(weights: Tensor, name: str, fn: str) -> None:
    """Raise if a weight is negative or NaN, naming ``fn`` and ``name`` (skipped when off or compiling; deferred
    on CUDA)."""
    if not _value_checks_active(weights) or weights.numel() == 0:
        return

    def message(example: int) -> str:
        return f"{fn}: {name}: expected non-negative weights, got a negative or NaN value"

    bad = ~(weights.detach() >= 0)
    if deferred(weights):
        _defer(torch.stack([bad.sum(dtype=torch.int64), torch.zeros((), dtype=torch.int64, device=weights.device)]),
               message)
    elif bool(bad.any()):
        raise ValueError(message(0))
