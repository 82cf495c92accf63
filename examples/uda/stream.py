r"""The batch stream: endless, resumable and sharded batches over epochs, and the DataLoader workers' signals.

Every sample of a batch comes with its augmentation seed (:func:`sample_seed`), a pure function of its place in
the stream (seed, stream, epoch, position), so a batch is the same whatever the number of workers and after a
resume. :class:`BatchStream` serves the pipeline's training sets (:mod:`loading`, ``dataset[(index, seed)]``);
:func:`ignore_stop_signals` is the ``worker_init_fn`` of every DataLoader of the pipeline.
"""

from __future__ import annotations

import signal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

WORKER_GRACE_S = 30  # a DataLoader worker lives this long after SIGTERM (see ignore_stop_signals)


def _worker_sigterm(signum, frame) -> None:
    remaining = signal.alarm(WORKER_GRACE_S)  # SIGALRM's default action ends the worker then
    if remaining:
        signal.alarm(remaining)  # a second SIGTERM does not postpone it


def ignore_stop_signals(worker_id: int = 0) -> None:
    """``worker_init_fn`` of every DataLoader of the pipeline. A scheduler (SLURM) sends SIGTERM to every process
    of the job: the main process turns it into a checkpoint (after the current step, which may still need a
    batch) and shuts its workers down itself, so a worker must not die first. In a worker, SIGUSR1 is ignored and
    SIGTERM ends it only :data:`WORKER_GRACE_S` seconds later: long enough for the batches of the steps before
    the stop (at most ``min(10, --log-every)`` under torchrun), short enough that a worker which its parent
    terminates at exit still goes (after an error raised in a worker, torch's DataLoader terminates its workers
    at exit: such an exit takes about half a minute). Workers also exit when their parent dies."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_sigterm)


def sample_seed(seed: int, stream: int, epoch: int, position: int) -> int:
    """The augmentation seed of one sample, a pure function of its place in the stream."""
    return int(np.random.SeedSequence([seed, stream, epoch, position]).generate_state(1)[0])


def epoch_batches(n: int, batch_size: int, *, seed: int, stream: int, epoch: int, rank: int, world: int
                  ) -> list[list[tuple[int, int]]]:
    """This rank's batches of one epoch: ``DistributedSampler`` order (seeded by seed + epoch), full batches only."""
    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed * 1000 + stream)
    sampler.set_epoch(epoch)
    indices = list(sampler)
    batches = []
    for b in range(len(indices) // batch_size):
        chunk = indices[b * batch_size:(b + 1) * batch_size]
        batches.append([(i, sample_seed(seed, stream, epoch, (b * batch_size + j) * world + rank))
                        for j, i in enumerate(chunk)])
    return batches


class _EndlessBatches:
    """A batch sampler over all epochs from ``(epoch, position)`` on; never exhausted (one DataLoader, whose
    workers stay alive across epochs)."""

    def __init__(self, stream: BatchStream) -> None:
        self.stream = stream

    def __iter__(self):
        s = self.stream
        epoch, position = s.epoch, s.position
        while True:
            batches = epoch_batches(len(s.dataset), s.batch_size, seed=s.seed, stream=s.stream, epoch=epoch,
                                    rank=s.rank, world=s.world)
            yield from batches[position:]
            epoch, position = epoch + 1, 0


class BatchStream:
    r"""An endless, resumable stream of training batches over epochs.

    The state is ``(epoch, position)`` in consumed batches; :meth:`state_dict` / :meth:`load_state_dict`
    restore it exactly (prefetched batches are simply produced again). Sharded like ``DistributedSampler``
    when ``world > 1``.

    One ``DataLoader`` serves every epoch (its batch sampler is endless), so worker processes start once and
    stay alive across epochs (``persistent_workers`` also keeps them over a :meth:`restart` that does not
    change the dataset). ``pin_memory=True`` (use it for CUDA) returns page-locked batches, which the trainer
    copies to the GPU with ``non_blocking=True``. Workers ignore SIGTERM/SIGUSR1 (:func:`ignore_stop_signals`).
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, seed: int, stream: int, rank: int = 0, world: int = 1,
                 workers: int = 0, pin_memory: bool = False) -> None:
        if len(dataset) < batch_size * world:
            raise ValueError(
                f"expected at least batch_size x world_size = {batch_size * world} images, got {len(dataset)}"
            )
        self.dataset, self.batch_size, self.seed, self.stream = dataset, batch_size, seed, stream
        self.rank, self.world, self.workers, self.pin_memory = rank, world, workers, pin_memory
        self.epoch, self.position = 0, 0
        self.per_epoch = len(epoch_batches(len(dataset), batch_size, seed=seed, stream=stream, epoch=0, rank=rank,
                                           world=world))
        self._loader: DataLoader | None = None
        self._iter = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if self.position >= self.per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        self._iter = None  # same dataset: the (persistent) workers are kept

    def restart(self) -> None:
        """Drop prefetched batches and the workers, which hold a copy of the dataset, e.g. after
        ``dataset.pseudo_dir`` changed (once per round); continue at the same position."""
        self._iter, self._loader = None, None

    def close(self) -> None:
        """Shut the worker processes down now (as :meth:`restart`): call it when a run ends on an error, so that
        no worker outlives the main process's own shutdown (the iterator and this stream refer to each other:
        a garbage collection frees the iterator, whose ``__del__`` stops the workers)."""
        import gc

        self.restart()
        gc.collect()

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._loader is None:
            # its own generator: creating an iterator draws the workers' base seed from it, not from the global
            # RNG that dropout and stochastic depth use (a resume creates the iterator at another step)
            self._loader = DataLoader(self.dataset, batch_sampler=_EndlessBatches(self), num_workers=self.workers,
                                      generator=torch.Generator().manual_seed(self.seed * 1000 + self.stream),
                                      persistent_workers=self.workers > 0, pin_memory=self.pin_memory,
                                      worker_init_fn=ignore_stop_signals if self.workers > 0 else None)
        if self._iter is None:
            self._iter = iter(self._loader)
        batch = next(self._iter)
        self.position += 1
        if self.position == self.per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return batch

    def __iter__(self):
        return self
