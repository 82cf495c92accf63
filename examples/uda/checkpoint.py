r"""Atomic checkpoints, safe loading and RNG states.

A checkpoint is one ``torch.save`` dict written to ``<path>.tmp`` and moved over ``<path>`` with
``os.replace`` (atomic on POSIX), so an interrupted or failed write (no space left, permission denied) never
leaves a truncated checkpoint behind: the previous file stays intact and the temporary file is removed.

Every file is read back with ``torch.load(weights_only=True)``: unpickling can only rebuild tensors and plain
Python values (dict, list, tuple, str, int, float, bool, None), never call a function, so a file shared by
someone else cannot run code. The pipeline's own checkpoints hold nothing else: RNG states are tensors and
lists (:func:`rng_state`), the configuration is a dict of primitives (:func:`to_primitives`). A file that
needs more (or is no checkpoint at all) is a ``ValueError`` naming the file and what it held.
"""

from __future__ import annotations

import argparse
import os
import pickle
import random
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch


def rng_state() -> dict:
    """The states of Python's, NumPy's and torch's global generators (and CUDA's when available), as tensors,
    lists and plain values only (readable with ``torch.load(weights_only=True)``); :func:`set_rng_state`
    restores them exactly.

    - ``python``: ``{"version": int, "state": list of 625 ints, "gauss_next": float | None}``
      (:func:`random.getstate`);
    - ``numpy``: ``{"kind": "MT19937", "keys": int64 tensor (624,), "pos": int, "has_gauss": int,
      "cached_gaussian": float}`` (:func:`numpy.random.get_state`; keys are uint32 values, widened to int64);
    - ``torch``: uint8 tensor; ``cuda``: list of uint8 tensors (one per device) when CUDA is available.
    """
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {
        "python": {"version": int(version), "state": [int(v) for v in internal], "gauss_next": gauss_next},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the generators from :func:`rng_state` (CUDA's only when the state has them and CUDA is there)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    n = state["numpy"]
    keys = n["keys"].numpy() if isinstance(n["keys"], torch.Tensor) else np.asarray(n["keys"])
    np.random.set_state((n["kind"], keys.astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def to_primitives(value, where: str = "config"):
    """A configuration (``argparse.Namespace``, dict, list, ...) as plain Python values that JSON and
    ``torch.load(weights_only=True)`` accept: dicts with str keys, lists (tuples and sets become lists),
    str (``Path`` becomes its string), int, float, bool, None; NumPy scalars become Python numbers.

    Anything else is a ``TypeError`` naming where it is (e.g. ``config.eval_size[0]``).
    """
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): to_primitives(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_primitives(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (set, frozenset)):
        return [to_primitives(v, f"{where}[{i}]") for i, v in enumerate(sorted(value, key=repr))]
    raise TypeError(f"expected {where} to hold plain values (dict, list, str, int, float, bool, None, Path), "
                    f"got {type(value).__module__}.{type(value).__qualname__}")


def save_atomic(obj: dict, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` through ``<path>.tmp``, ``fsync`` and ``os.replace``.

    When writing fails (``ENOSPC`` no space left, ``EACCES`` permission denied, ...), the temporary file is
    removed, ``path`` keeps its previous content, and the ``OSError`` is re-raised with the file's name and that
    fact in its message (same errno).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        kept = "the previous checkpoint is kept" if path.is_file() else "no checkpoint was there before"
        raise OSError(error.errno, f"could not write the checkpoint {str(path)!r} ({kept}; "
                                   f"{error.strerror or error})") from error
    return path


def _refusal(error: Exception) -> str:
    """What the safe unpickler refused, from its message (which names the global it would have had to call)."""
    text = str(error)
    match = re.search(r"GLOBAL\s+([\w.]+)", text)
    if match:
        return f"a reference to {match.group(1)!r}, which the safe loader does not call"
    match = re.search(r"Unsupported operand (\d+)", text)
    if match:
        return f"pickle opcode {match.group(1)}, which the safe loader does not run (a plain pickle, not torch.save?)"
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue", "(1)", "(2)",
                   "WeightsUnpickler error")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(boilerplate)]
    return lines[0] if lines else "an object the safe loader does not rebuild"


def load(path: str | Path, option: str = "--resume"):
    """Read a file written by ``torch.save`` with ``torch.load(weights_only=True, map_location="cpu")``.

    ``ValueError`` naming ``option``, the file and the reason when the path is not a file, when the file holds
    more than tensors and plain values (the safe loader refuses it; nothing in it was run), or when it is not a
    readable ``torch.save`` file (truncated, empty, another format).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"expected {option} to name a checkpoint file, got {str(path)!r} (not a file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        text = str(error)
        if "weights_only" in text or "Weights only" in text or "WeightsUnpickler" in text:
            raise ValueError(
                f"expected {option} {str(path)!r} to hold only tensors and plain Python values (read with "
                f"torch.load(weights_only=True)), but it holds {_refusal(error)}: refused, nothing in it was run. "
                "Checkpoints written by this pipeline load safely; a file from elsewhere must be re-saved as a "
                "plain state dict (by its author, or by you if you trust it)"
            ) from None
        raise ValueError(f"expected {option} {str(path)!r} to be a file written by torch.save, got an unreadable "
                         f"file ({text.splitlines()[0] if text else 'UnpicklingError'})") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, ImportError, IndexError, KeyError,
            TypeError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"expected {option} {str(path)!r} to be a complete file written by torch.save, got an "
                         f"unreadable file ({type(error).__name__}: {first}; truncated or another format?)") from None
