r"""Pieces of a day-long run that the training loop calls: stop requests (preemption), a non-finite guard, the
output folder check and ``--resume auto``.

- :class:`StopRequest`: SIGTERM / SIGUSR1 only set a flag; the loop asks :meth:`StopRequest.requested` once per
  step, finishes the step, writes the checkpoint and exits with :data:`EXIT_STOPPED` (75).
- :class:`NonFiniteGuard`: per named loss term (and the gradient norm) a device-side record of the first
  iteration whose value was NaN or inf; no host read per step, one read at the log step (:meth:`check`), which
  raises :class:`NonFiniteError` naming the term and the iteration.
- :func:`check_output_dir`: before training, the output folder exists, takes a file and has room.
- :func:`resolve_resume`: ``--resume auto`` -> ``<out>/checkpoint.pt`` when it exists, else a fresh start.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.distributed as tdist
from torch import Tensor

import protocl

EXIT_STOPPED = 75
"""Exit status of a run stopped by SIGTERM or SIGUSR1 after it wrote its checkpoint: ``EX_TEMPFAIL`` of
``sysexits.h`` ("temporary failure, the user is invited to retry"). Not 143 (128 + SIGTERM): that is what a
shell reports for a process *killed* by SIGTERM, so a scheduler or a wrapper script could not tell "stopped
cleanly, checkpoint written, rerun with ``--resume auto``" from "killed, the last periodic checkpoint is all
there is". Not 0 either: the run is not finished, and ``torchrun --max-restarts`` or a requeueing job script
must see a failure to restart it."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Stopped(Exception):
    """Raised by the loop after it wrote the checkpoint of a stop request; the message names the signal."""


def last_line(error: BaseException) -> str:
    """The message of ``error`` without a DataLoader worker's traceback: for an exception re-raised from a worker
    ("Caught X in DataLoader worker process N. Original Traceback ..."), the original exception's message."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    lines = [line for line in text.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else text
    head, sep, tail = last.partition(": ")
    return tail if sep and " " not in head else last


class StopRequest:
    """Turn SIGTERM and SIGUSR1 into a stop request that the training loop polls.

    Use as a context manager around the training loop: on entry it installs handlers for ``signals`` that
    only record the signal (nothing else happens in the handler, so a signal never interrupts a step or a
    checkpoint write halfway); on exit it restores the previous handlers. The loop calls :meth:`requested`
    once per step, after the step; when it returns True the loop writes its checkpoint and exits with
    :data:`EXIT_STOPPED`.

    Under ``torch.distributed`` every rank must stop after the same step, while the signal may reach the ranks
    at different times (or only some of them). :meth:`requested` then all-reduces the flag (MAX) every
    ``every`` calls, the same calls on all ranks, and returns False in between. The flag is a CPU tensor
    reduced over a gloo group (created on entry when the default group is not gloo already), so the check never
    touches a CUDA stream: no device sync, one small host collective every ``every`` steps. Latency: a stop
    takes effect at most ``every`` steps after the signal reached the last rank to see it; single-process,
    after the current step. Choose ``every`` so that ``every`` steps plus a checkpoint write fit in the grace
    period of the scheduler (SLURM's ``KillWait``, 30 s by default, after SIGTERM; ``--signal=USR1@120``
    gives 120 s; Kubernetes' ``terminationGracePeriodSeconds``, 30 s by default).

    When the block ends with :class:`Stopped` (the checkpoint is written, the process is on its way out with
    :data:`EXIT_STOPPED`), the signals are then *ignored* instead of restored: a second signal must not turn a
    clean stop into a kill while the DataLoader workers, the log and the process group are closed. It comes:
    ``torchrun``'s agent sends SIGTERM to every rank still alive once the first rank has exited (it polls every
    0.1 s), and schedulers repeat theirs. SIGKILL, which a scheduler sends when its grace period ends, still ends
    the process. Any other end of the block restores the previous handlers.

    Handlers can only be installed from the main thread; elsewhere the context is a no-op that never requests
    a stop (and says so in :attr:`installed`).
    """

    def __init__(self, signals: Iterable[int] = STOP_SIGNALS, *, every: int = 10) -> None:
        if every < 1:
            raise ValueError(f"expected every >= 1, got {every}")
        self.signals, self.every = tuple(signals), int(every)
        self.signum: int | None = None  # the first signal received
        self.installed = False
        self._previous: dict[int, object] = {}
        self._calls = 0
        self._group = None
        self._agreed = False

    def __enter__(self) -> StopRequest:  # noqa: PYI034 (typing.Self needs Python 3.11)
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
            self.installed = True
        if _distributed():
            self._group = None if tdist.get_backend() == "gloo" else tdist.new_group(backend="gloo")
        return self

    def __exit__(self, exc_type, *exc) -> None:
        stopped = exc_type is not None and issubclass(exc_type, Stopped)
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if stopped else previous)
        self._previous.clear()
        self.installed = False
        if self._group is not None:
            tdist.destroy_process_group(self._group)
            self._group = None

    def _handle(self, signum, frame) -> None:  # only a flag: async-signal-safe enough for Python
        if self.signum is None:
            self.signum = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "none"

    def requested(self) -> bool:
        """True when a stop was requested (on any rank); call once per step, on every rank."""
        if self._agreed:
            return True
        if not _distributed():
            self._agreed = self.signum is not None
            return self._agreed
        self._calls += 1
        if self._calls % self.every:
            return False
        flag = torch.tensor([0 if self.signum is None else 1], dtype=torch.int32)
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX, group=self._group)
        self._agreed = bool(flag.item())  # a CPU tensor: no device sync
        return self._agreed


def _distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized()


class NonFiniteError(RuntimeError):
    """A loss term or the gradients became NaN or inf; the message names the term and the iteration."""


class NonFiniteGuard:
    """Record, on the device, the first iteration at which each named term was NaN or inf.

    :meth:`update` takes the step's scalar loss terms (and optionally the parameters, whose gradient norm is
    checked as the term ``"grad_norm"``); it stacks them, tests ``isfinite`` and keeps ``min(first, iteration)``
    where a term is not finite: a few small kernels per step, no host read. :meth:`check` reads the record once
    (at the log step, where the loop reads its losses anyway, and before every checkpoint) and raises
    :class:`NonFiniteError` naming the first bad term and its iteration; under ``torch.distributed`` the records
    are all-reduced (MIN) first, so every rank raises at the same check.

    With fp16 autocast and a ``GradScaler``, inf/NaN gradients are expected now and then (the scaler skips the
    step and lowers the scale): pass ``grads=False`` there and check the losses only.
    """

    _NONE = 2**62  # "never non-finite"

    def __init__(self, device: torch.device | str = "cpu", *, grads: bool = True) -> None:
        self.device, self.grads = torch.device(device), grads
        self.names: list[str] = []
        self.first = torch.empty(0, dtype=torch.int64, device=self.device)
        self.window_start = 0  # first iteration not yet covered by a check
        self._slot_cache: dict[tuple[str, ...], Tensor] = {}

    def _slots(self, names: tuple[str, ...]) -> Tensor | None:
        """Indices of ``names`` in the record (None when they are all of it, in order); new names get a slot.
        Index tensors are made once per distinct tuple of names (no host-to-device copy per step)."""
        new = [n for n in names if n not in self.names]
        if new:
            self.names += new
            self.first = torch.cat([self.first, torch.full((len(new),), self._NONE, dtype=torch.int64,
                                                           device=self.device)])
            self._slot_cache.clear()
        if list(names) == self.names:
            return None
        if names not in self._slot_cache:
            self._slot_cache[names] = torch.tensor([self.names.index(n) for n in names], device=self.device)
        return self._slot_cache[names]

    def update(self, iteration: int, terms: Mapping[str, Tensor], parameters: Iterable[Tensor] | None = None) -> None:
        """Record which of ``terms`` (scalars, any shape is reduced with ``all``) and, with ``parameters``, the
        total gradient norm are non-finite at ``iteration``; no host sync."""
        names = list(terms)
        values = [torch.isfinite(t.detach()).all() for t in terms.values()]
        if parameters is not None and self.grads:
            grads = [p.grad for p in parameters if p.grad is not None]
            if grads:
                names.append("grad_norm")
                values.append(torch.isfinite(torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False)))
        if not names:
            return
        slots = self._slots(tuple(names))
        finite = torch.stack([v.to(self.device) for v in values])
        current = self.first if slots is None else self.first[slots]
        updated = torch.where(finite, current, torch.clamp(current, max=int(iteration)))
        if slots is None:
            self.first = updated
        else:
            self.first[slots] = updated

    def check(self, iteration: int | None = None) -> None:
        """Read the record (one host read; a collective under torch.distributed: call it on every rank) and
        raise :class:`NonFiniteError` when a term was non-finite since the start; ``iteration`` closes the
        window named in the message."""
        if not self.names:
            return
        first = self.first.clone()
        if _distributed():
            if tdist.get_backend() == "nccl" and first.device.type != "cuda":
                first = first.cuda()
            tdist.all_reduce(first, op=tdist.ReduceOp.MIN)
        values = first.tolist()
        bad = [(it, name) for it, name in zip(values, self.names) if it < self._NONE]
        start = self.window_start
        if iteration is not None:
            self.window_start = int(iteration) + 1
        if not bad:
            return
        order = {name: k for k, name in enumerate(self.names)}  # ties: the term registered first
        it, name = min(bad, key=lambda b: (b[0], order[b[1]]))
        others = ", ".join(f"{n} (iteration {i})" for i, n in sorted(bad, key=lambda b: (b[0], order[b[1]]))
                           if n != name)
        window = f" (checked iterations {start}-{iteration})" if iteration is not None else ""
        raise NonFiniteError(f"non-finite {name} (NaN or inf) at iteration {it}{window}"
                             + (f"; also {others}" if others else ""))


def non_finite_tensors(named: Iterable[tuple[str, Tensor]]) -> list[str]:
    """Names of the floating-point tensors of ``named`` (e.g. ``model.state_dict().items()``) holding NaN or
    inf, with a single host read (for checks at save or load time, not in the step)."""
    named = [(n, t) for n, t in named if isinstance(t, Tensor) and t.is_floating_point() and t.numel()]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(t).all().to(named[0][1].device) for _, t in named]).tolist()
    return [n for (n, _), ok in zip(named, finite) if not ok]


def check_output_dir(path: str | Path, need_bytes: int = 0, *, option: str = "--out") -> Path:
    """Before training: create ``path`` (and its parents), write, ``fsync`` and remove a probe file, and check
    that the file system has at least ``need_bytes`` free. ``ValueError`` naming the folder and the cause when
    any of it fails (not a folder, read-only, permission denied, no space left)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"expected {option} to be a folder, got {str(path)!r} (an existing file, not a folder)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"expected {option} to be a folder that can be created, got {str(path)!r} "
                         f"({type(error).__name__}: {error.strerror or error})") from None
    probe = path / f".write_probe.{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as error:
        raise ValueError(f"expected {option} {str(path)!r} to be writable, got {type(error).__name__}: "
                         f"{error.strerror or error}") from None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise ValueError(f"expected {option} {str(path)!r} to have about {need_bytes / 2**20:.0f} MiB free for "
                         f"checkpoints and pseudo labels, got {free / 2**20:.0f} MiB "
                         f"({os.strerror(errno.ENOSPC).lower()} soon)")
    return path


def output_files(model_bytes: int, state_bytes: int, *, rounds: int = 1, decisions: bool = False,
                 control: bool = False, stage1_best: bool = False, initial: bool = False, pseudo_labels: int = 0,
                 pseudo_label_pixels: int = 0, margin: int = 16 * 2**20) -> dict[str, int]:
    """Every file (or group of files) a run of the pipeline writes, with a generous size each: the checkpoint
    (``state_bytes``: model, optimizer, orchestrator) and the temporary copy of the one file being written at a
    time, ``source_only.pt`` and ``adapted.pt`` (``model_bytes``), ``source_best.pt`` (``stage1_best``), with
    round decisions ``round_start.pt`` (a state) and two ``best_scored-*.pt`` (two more
    ``control_best_scored-*.pt`` with the control), ``initial.pt`` (``initial``: ``train_daformer.py``'s
    initial weights, the control's start), each round's static labels as uint8 PNGs counted
    uncompressed (``rounds`` folders and the one being written), and ``margin`` for the log, metrics.json,
    data_check.json, figures and TensorBoard. The patterns name the files, as a test checks."""
    files = {"checkpoint.pt": state_bytes, "*.tmp": state_bytes, "source_only.pt": model_bytes,
             "adapted.pt": model_bytes, "pseudo_labels/*": (rounds + 1) * pseudo_labels * pseudo_label_pixels,
             "log.txt metrics.json data_check.json figures/* tensorboard/*": margin}
    if stage1_best:
        files["source_best.pt"] = model_bytes
    if initial:
        files["initial.pt"] = model_bytes
    if decisions:
        files.update({"round_start.pt": state_bytes, "best_scored-*.pt": 2 * model_bytes})
        if control:
            files["control_best_scored-*.pt"] = 2 * model_bytes
    return files


def tensor_bytes(*states) -> int:
    """Bytes of the tensors in (nested) state dicts, lists, tuples or parameter iterables."""
    total = 0
    stack = list(states)
    while stack:
        item = stack.pop()
        if isinstance(item, Tensor):
            total += item.numel() * item.element_size()
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, Iterable) and not isinstance(item, (str, bytes)):
            stack.extend(item)
    return total


def resolve_resume(resume: str | None, out: str | Path) -> Path | None:
    """``--resume``: ``None`` -> None (fresh start); ``"auto"`` -> ``<out>/checkpoint.pt`` if that file exists,
    else None (fresh start: the same command works for the first submission and every requeue); any other
    value -> that path (it must exist; checked by the loader). A ``checkpoint.pt.tmp`` left by an interrupted
    write is never considered: only a completed ``os.replace`` makes ``checkpoint.pt``."""
    if resume is None:
        return None
    if resume == "auto":
        path = Path(out) / "checkpoint.pt"
        return path if path.is_file() else None
    return Path(resume)


@contextlib.contextmanager
def sync_debug_error():
    """``--sync-debug``: inside the block, any CUDA host synchronisation raises (restored afterwards)."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@contextlib.contextmanager
def step_scope(args, device: torch.device, kind: str, first: bool, step_context=None):
    """Around one training step: protocl's value checks on a phase's or round's ``first`` step (``--value-checks
    always``: every step), ``--sync-debug`` (CUDA: any host sync raises) on the others, and the caller's
    ``step_context(kind, checked)`` (timing, tests)."""
    checked = first or args.value_checks == "always"
    protocl.set_value_checks(checked)
    debug = contextlib.nullcontext()
    if args.sync_debug and not checked and device.type == "cuda":
        debug = sync_debug_error()
    with debug, step_context(kind, checked) if step_context else contextlib.nullcontext():
        yield
