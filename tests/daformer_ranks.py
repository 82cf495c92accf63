r"""``examples/train_daformer.py``'s ``main`` with two test hooks (a test helper, run under torchrun):

    python tests/daformer_ranks.py STEPS <train_daformer.py options>

STEPS > 0: the run "crashes" after its STEPS-th training step (:func:`examples_helpers.crash_after`: nothing
is saved after the last periodic checkpoint) and the process exits 1. Otherwise the run goes to its end as
``main`` runs it, then EVERY rank writes its own teacher's and student's state (``<out>/rank{rank}.pt``:
``teacher`` and ``model`` with their parameters, ``teacher_buffers`` and ``model_buffers`` with their
buffers; ``contrast``: the prototype EMAs of ``--contrast``), which the script itself never writes (it saves rank 0's only). Needs ``src``, ``examples`` and
``tests`` on PYTHONPATH (tests/test_daformer_ddp.py sets it).
"""

from __future__ import annotations

import sys

import torch
import train_daformer
from examples_helpers import Crash, crash_after
from uda import dist
from uda.daformer_options import parse_args
from uda.state import run_guarded


def save_rank(run) -> None:
    """This rank's teacher and student, parameters and buffers apart (CPU copies)."""

    def cpu(pairs) -> dict:
        return {name: value.detach().cpu().clone() for name, value in pairs}

    torch.save({"rank": run.rank, "world": run.world,
                "teacher": cpu(run.teacher.named_parameters()), "model": cpu(run.model.named_parameters()),
                "teacher_buffers": cpu(run.teacher.named_buffers()),
                "model_buffers": cpu(run.model.named_buffers()),
                "contrast": cpu(run.contrast.named_buffers()) if run.contrast is not None else {}},
               run.out / f"rank{run.rank}.pt")


def main(steps: int, argv: list[str]) -> int:
    """``train_daformer.main``, with a ``step_context`` that crashes after ``steps`` steps (``steps > 0``)."""
    args = parse_args(argv)
    context = crash_after(steps) if steps > 0 else None
    try:
        try:
            run = train_daformer.setup(args)
            state = train_daformer.start(run)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        try:
            status = run_guarded(run, state, lambda: (train_daformer.train(run, state, step_context=context),
                                                      train_daformer.finish(run, state)))
        except Crash:
            return 1
        if status == 0:
            save_rank(run)
        return status
    finally:
        dist.cleanup()


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), sys.argv[2:]))
