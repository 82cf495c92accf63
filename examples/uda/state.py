r"""The state of a run that survives a restart, its checkpoints, and the reliability points of the loop.

Everything a restart needs is ONE checkpoint dict (:func:`save`): the state of :func:`new_state` (phase, round,
iteration, step, thresholds, results, counts), the modules' own state dicts (model, optimizer, scaler,
orchestrator), the RNG states and the data streams' positions. :func:`start` builds the state of a run: new,
resumed exactly from ``--resume``, or at stage 2 from ``--source-checkpoint``. :func:`begin_phase` moves between
the phases "source" (stage 1) -> "adapt" (stage 2) -> "control" (the same-budget control, ``--control``) ->
"done", writing the checkpoint at each change.

The loop calls one function at each reliability point: :func:`next_batch` before a step (``--on-bad-sample
skip`` counts the files a batch passed over), :func:`watch` after it (the non-finite guard, no host read) and
:func:`stop_point` at the end of an iteration (SIGTERM/SIGUSR1: write the checkpoint, raise
:class:`uda.runtime.Stopped`). Stopping, skipping and the non-finite guard are :mod:`uda.runtime`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

import protocl
from protocl.distributed import all_reduce_sum_

from . import checkpoint, decisions, dist, options, runtime, signals, weights
from .labels import BadSampleError
from .loading import skip_records
from .report import bad_samples, evaluate, finish, log_point, record_skips
from .run import Run, new_optimizer, read_resume, setup

__all__ = ["new_state", "start", "save", "save_model", "check_finite", "begin_phase", "load_source_model",
           "next_batch", "watch", "end_iteration", "accumulate", "stop_point", "run_script", "run_guarded"]

PHASES = ("source", "adapt", "control", "done")
CONTROL_START = {"gta2cs": "source_only.pt", "daformer": "initial.pt"}  # the same-budget control starts from


def new_state(run: Run) -> dict:
    """The state that survives a restart, besides the modules' own: phase (:data:`PHASES`), round and iteration
    within the phase, ``step`` (iterations since the start of stage 1, the x axis of logs and curves), results so
    far and this round's per-class label counts (``--diagnostics``) and signal sums (:mod:`uda.signals`)."""
    return {"phase": "source", "round": 0, "iteration": 0, "step": 0, "thresholds": None, "metrics": {},
            "fallback": False,  # --round-decisions: this round was undone, its budget goes to source-only steps
            "decisions": decisions.new_record(run.args.round_score),  # --round-decisions (uda.decisions)
            "bad_samples": {"skipped": 0, "files": []},  # --on-bad-sample skip: this rank's skips
            "history": {"eval_iter": [], "eval_miou": [], "log_iter": [], "coverage_static": [],
                        "coverage_dynamic": [], "coverage_hybrid": []},
            "label_counts": torch.zeros(3, 4, run.num_classes, dtype=torch.int64, device=run.device),
            "signal_counts": signals.zeros(run.num_classes, run.device)}


def save(run: Run, state: dict, name: str = "checkpoint.pt") -> None:
    """Write the ONE checkpoint dict (rank 0, atomically; every rank calls it: it sums the counts over ranks).

    Never a non-finite state: the non-finite guard is read first (:func:`check_finite`), so a diverged run stops
    with the last good checkpoint on disk."""
    check_finite(run, state)
    counts = all_reduce_sum_(state["label_counts"].clone())
    skipped = bad_samples(run, state)
    signal_counts = all_reduce_sum_(state["signal_counts"].clone())  # a collective: every rank sums
    if run.rank == 0:
        checkpoint.save_atomic({
            **state, "label_counts": counts.cpu(), "bad_samples": skipped, "model": run.model.state_dict(),
            "signal_counts": signal_counts.cpu(),
            "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
            **({"contrast": run.contrast.state_dict()} if run.contrast is not None else {}),
            "rng": checkpoint.rng_state(), "config": run.config,
            "streams": {"source": run.source_stream.state_dict(), "target": run.target_stream.state_dict()},
            "world_size": run.world,
            **({"teacher": run.teacher.state_dict()} if run.teacher is not None else {})}, run.out / name)
    dist.barrier()


def save_model(run: Run, name: str, **extra) -> None:
    """The model's weights and the run's configuration as ``<out>/<name>`` (``source_only.pt``, ``adapted.pt``;
    rank 0, atomically; every rank calls it)."""
    if run.rank == 0:
        checkpoint.save_atomic({"model": run.model.state_dict(), "config": run.config, **extra}, run.out / name)
    dist.barrier()


def check_finite(run: Run, state: dict) -> None:
    """Raise :class:`uda.runtime.NonFiniteError` if a loss term or the gradients went non-finite since the start
    (a collective under torch.distributed: every rank calls it, at log points and before every save)."""
    if run.guard is not None:
        run.guard.check(state["step"])


def start(run: Run) -> dict:
    """The run's state: new, resumed from ``--resume`` (exactly; ``auto``: ``<out>/checkpoint.pt`` if it exists),
    or at stage 2 from ``--source-checkpoint`` (the loaded model is evaluated: the source-only result)."""
    a, state = run.args, new_state(run)
    path = runtime.resolve_resume(a.resume, run.out)
    if a.resume == "auto" and path is None:
        run.log(f"--resume auto: no {run.out / 'checkpoint.pt'} yet, starting from the beginning")
    if path is not None:
        resume(run, state, path)
    elif a.source_checkpoint:
        load_source_model(run, a.source_checkpoint)
        state["step"] = a.source_iters
        state["metrics"]["source_only"] = evaluate(run, state, "source-only (loaded with --source-checkpoint)")
        begin_phase(run, state, "adapt")
    run.started = (time.time(), state["step"])
    if run.guard is not None:
        run.guard.window_start = state["step"] + 1
    return state


def resume(run: Run, state: dict, path: Path) -> None:
    """Restore ``state`` and the modules exactly from the checkpoint ``path`` (``--resume``)."""
    ckpt, run.resumed = run.resumed, None  # read and checked by uda.run.setup (the recipe, the network)
    if ckpt is None:  # a run built otherwise: the same read and checks
        ckpt = read_resume(run.args, run.out, run.model)
    state.update({k: ckpt[k] for k in ("phase", "round", "iteration", "step", "thresholds", "metrics", "history")})
    state.update({k: ckpt[k] for k in ("fallback", "decisions", "stage2_source_stream") if k in ckpt})
    resume_decisions(run, state, ckpt.get("config", {}))
    if run.rank == 0:  # the counts were summed over ranks when saved
        state["label_counts"].copy_(ckpt["label_counts"])
        state["bad_samples"] = ckpt.get("bad_samples", state["bad_samples"])
        if "signal_counts" in ckpt:
            state["signal_counts"].copy_(ckpt["signal_counts"])
    run.log(ckpt["network_check"])  # the checkpoint's network is the one this command builds
    run.model.load_state_dict(ckpt["model"])
    if state["phase"] != "source":
        new_optimizer(run, run.args.lr)
    run.optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    elif run.scaler.is_enabled():
        run.log("note: the checkpoint has no fp16 GradScaler state (it was trained without --amp fp16): "
                "starting a fresh scaler")
    if run.contrast is not None:
        run.contrast.load_state_dict(ckpt["contrast"])
    if run.teacher is not None and "teacher" in ckpt:  # --rectify: the round's static-label model
        run.teacher.load_state_dict(ckpt["teacher"])
    streams = ckpt["streams"]
    if ckpt.get("world_size", 1) != run.world:  # another world size shards differently: next epoch
        streams = {k: {"epoch": v["epoch"] + 1, "position": 0} for k, v in streams.items()}
        run.log(f"note: checkpoint from {ckpt.get('world_size')} ranks resumed on {run.world}: data streams "
                "restart at the next epoch (model, optimizer, EMA, thresholds restored exactly)")
    run.source_stream.load_state_dict(streams["source"])
    run.target_stream.load_state_dict(streams["target"])
    checkpoint.set_rng_state(ckpt["rng"])
    run.log(f"resumed {path}: {state['phase']}, round {state['round']}, iteration {state['iteration']}")


def resume_decisions(run: Run, state: dict, config: dict) -> None:
    """A resumed run keeps the decision mode it was started with (:data:`uda.options.DECISION_OPTIONS`; a run
    made before round decisions existed: off) unless the command line gives it; a changed ``--round-score``
    after the run has scored is refused (its scores would be compared with another score's)."""
    a = run.args
    adopted = {k: config.get(k, "off" if k == "round_decisions" else getattr(a, k))
               for k in options.DECISION_OPTIONS if k not in getattr(a, "given", options.DECISION_OPTIONS)}
    adopted = {k: v for k, v in adopted.items() if v != getattr(a, k)}
    if adopted:
        for key, value in adopted.items():
            setattr(a, key, value)
            run.config[key] = value
        run.log("resumed with the checkpoint's round-decision settings (give them to change them): "
                + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in adopted.items()))
    record = state["decisions"] = {**decisions.new_record(state["decisions"]["score"]), **state["decisions"]}
    if record["score"] != a.round_score:
        if record["reference"] is not None:
            raise ValueError(f"expected --round-score {record['score']} (the score this run has compared its "
                             f"rounds with), got --round-score {a.round_score}: a changed score would compare two "
                             f"different scores; resume with --round-score {record['score']}")
        record["score"] = a.round_score


def load_source_model(run: Run, path: str) -> None:
    """``--source-checkpoint``: model weights of a ``source_only.pt`` / ``adapted.pt`` / ``checkpoint.pt``, copied
    to ``<out>/source_only.pt`` (the same-budget control starts from them)."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"expected --source-checkpoint to be a checkpoint file, got {str(file)!r} (not a file)")
    ckpt = checkpoint.load(file, "--source-checkpoint")
    # a run's checkpoint or a peer's Res_Deeplab / DeeplabMulti; the model takes the file's network (uda.weights)
    _, message = weights.load_source_weights(run.model, ckpt, option=f"--source-checkpoint {str(file)!r}",
                                             peer_classifier=getattr(run.args, "peer_classifier", None))
    bad = runtime.non_finite_tensors(run.model.state_dict().items())
    if bad:
        raise ValueError(f"expected --source-checkpoint {str(file)!r} to hold finite weights, got NaN or inf in "
                         f"{len(bad)} tensor(s): {', '.join(bad[:5])}")
    save_model(run, "source_only.pt", **{"from": str(file)})
    run.log(message)
    run.log(f"stage 1 skipped: source model loaded from {file}")


def begin_phase(run: Run, state: dict, phase: str) -> None:
    """Start stage 2 ("adapt"), the same-budget control ("control", from ``source_only.pt``) or end ("done"):
    round and iteration back to 0, a fresh optimizer at ``--lr``, the checkpoint written."""
    if phase not in PHASES:
        raise ValueError(f"expected phase to be one of {PHASES}, got {phase!r}")
    if phase == "adapt":  # the control's source batches start where stage 2's would end without fallbacks
        state["stage2_source_stream"] = run.source_stream.state_dict()
    if phase == "control":  # from stage 1's model; train_daformer.py: from the initial weights
        start = CONTROL_START[run.args.recipe]
        run.model.load_state_dict(checkpoint.load(run.out / start, start)["model"])
        control_stream(run, state)
    state.update(phase=phase, round=0, iteration=0)
    if phase != "done":
        new_optimizer(run, run.args.lr)
    save(run, state)
    decisions.tidy(run, state)  # the files of round decisions the checkpoint no longer names


def control_stream(run: Run, state: dict) -> None:
    """The same-budget control's source stream: from stage 2's start, ``rounds x round_iters`` batches on (where
    the adapted run's stage 2 ends when no round is undone), whatever the fallbacks drew; a checkpoint made
    before issue 34 has no stage-2 start: the stream goes on from where it is. ``train_daformer.py``: the adapted
    run's own source batches, from its start (the two runs differ by the target side only)."""
    start = state.get("stage2_source_stream")
    if start is None:
        run.log("note: the checkpoint has no stage-2 start of the source stream (made before issue 34): the "
                "control's source batches go on from where the adapted run left them")
        return
    stream, a = run.source_stream, run.args
    offset = 0 if a.recipe == "daformer" else a.rounds * a.round_iters
    absolute = start["epoch"] * stream.per_epoch + start["position"] + offset
    stream.load_state_dict({"epoch": absolute // stream.per_epoch, "position": absolute % stream.per_epoch})


# ---------------------------------------------------------------------------------------------- reliability points
def next_batch(run: Run, state: dict, stream) -> dict:
    """The next batch of ``stream`` (host-side loading, before the step); ``--on-bad-sample skip``: the bad files
    it passed over are logged and counted."""
    batch = next(stream)
    record_skips(run, state, skip_records(batch), "replaced by the next sample")
    return batch


def watch(run: Run, state: dict, stats: dict[str, Tensor]) -> None:
    """After a step: record non-finite loss terms and gradients (device-side, no host read; read at the log
    point and before every save)."""
    if run.guard is not None:
        run.guard.update(state["step"] + 1, {k: v for k, v in stats.items() if not k.startswith("cov_")},
                         run.model.parameters())


def end_iteration(run: Run, state: dict, total: int, sums: dict[str, Tensor], kind: str | None = None, *,
                  before_save: Callable[[], None] | None = None) -> None:
    """After a step, both scripts: the counters, the log point (every ``--log-every`` iterations and at
    ``total``), the periodic checkpoint (every ``--ckpt-every``, not at ``total``: the phase's end writes it;
    ``before_save`` runs first) and the stop point."""
    a = run.args
    state["iteration"] += 1
    state["step"] += 1
    if state["iteration"] % a.log_every == 0 or state["iteration"] == total:
        log_point(run, state, kind or state["phase"], sums)
    if state["iteration"] % a.ckpt_every == 0 and state["iteration"] < total:
        if before_save is not None:
            before_save()
        save(run, state)
    stop_point(run, state)


def accumulate(sums: dict[str, Tensor], stats: dict[str, Tensor]) -> None:
    """Add a step's statistics (device tensors) to the sums the log point reads."""
    for k, v in stats.items():
        sums[k] = sums.get(k, 0) + v


def stop_point(run: Run, state: dict) -> None:
    """At the end of an iteration: if SIGTERM/SIGUSR1 was received (on any rank), write the checkpoint (all
    ranks, atomically) and raise :class:`uda.runtime.Stopped` (``main`` exits with status 75)."""
    if run.stop is None or not run.stop.requested():
        return
    save(run, state)
    raise runtime.Stopped(run.stop.signal_name if run.stop.signum is not None else "a signal on another rank")


def run_script(argv: list[str] | None, parse_args: Callable, start: Callable[[Run], dict],
               train: Callable[[Run, dict], None]) -> int:
    """A script's ``main``: parse, :func:`uda.run.setup`, ``start``, then ``train`` and :func:`uda.report.finish`
    under :func:`run_guarded`. A set-up error (dataset roots, ``--init`` / ``--resume`` files, class tables) is one
    line on stderr and exit status 2; the process group is torn down whatever happens."""
    args = parse_args(argv)
    try:
        try:
            run = setup(args)
            state = start(run)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        return run_guarded(run, state, lambda: (train(run, state), finish(run, state)))
    finally:
        dist.cleanup()


def run_guarded(run: Run, state: dict, body: Callable[[], object]) -> int:
    """Run ``body`` (training and :func:`uda.report.finish`) under a stop request and return the exit status:

    - 0: done;
    - :data:`uda.runtime.EXIT_STOPPED` (75): SIGTERM/SIGUSR1, the checkpoint was written (:func:`stop_point`);
      the ranks leave together (one barrier after the teardown), so torchrun sees one clean stop;
    - 1: a non-finite loss or gradient (the last good checkpoint is kept), a bad file met during training, a
      checkpoint that failed to write; the message goes to stderr.

    Whatever ends the run, protocl's value-check setting is restored, the data streams' workers and TensorBoard
    are closed."""
    checks_before = protocl.value_checks_enabled()
    every = 1 if run.world == 1 else min(10, run.args.log_every)  # ranks agree on a stop every N steps
    stopped = False
    try:
        with runtime.StopRequest(every=every) as stop:
            run.stop = stop
            body()
        return 0
    except runtime.Stopped as request:
        run.log(f"stop requested ({request}) at step {state['step']}: checkpoint written to "
                f"{run.out / 'checkpoint.pt'}; run the same command with --resume auto to continue "
                f"(exit status {runtime.EXIT_STOPPED})")
        stopped = True  # StopRequest now ignores SIGTERM/SIGUSR1: the exit status stays 75
        return runtime.EXIT_STOPPED
    except runtime.NonFiniteError as error:
        kept = run.out / "checkpoint.pt"
        print(f"error: {error}; stopped, the last good checkpoint {str(kept)!r} is kept"
              + ("" if kept.is_file() else " (none written yet)"), file=sys.stderr)
        return 1
    except (BadSampleError, OSError) as error:  # a bad file during training, a checkpoint that failed to write
        print(f"error: {runtime.last_line(error)}", file=sys.stderr)
        return 1
    finally:
        protocl.set_value_checks(checks_before)
        run.source_stream.close()  # the DataLoader workers go now, whatever ended the run
        run.target_stream.close()
        if run.tb is not None:
            run.tb.close()
        if stopped:
            dist.barrier()
