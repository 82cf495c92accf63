r"""Dress rehearsal of the real DeepLab-V2 preset on the CPU: every phase of ``examples/train_gta2cs.py`` and
``examples/predict.py`` on a few images at the REAL sizes in the REAL layouts, with wall time, host memory and
disk per phase. A script to run by hand, not a test (a full-size run takes about 25 minutes on a 2-core CPU):

    python -m benchmarks.dress_rehearsal                          # full size: GTA5 1914x1052, Cityscapes 2048x1024
    python -m benchmarks.dress_rehearsal --size-scale 0.25 --report /tmp/smoke.md   # a smoke run, minutes
    python -m benchmarks.dress_rehearsal --root /data/rehearsal --keep --threads 2

What it does:

1. writes ``--images`` images per split at the real sizes (times ``--size-scale``) under ``<root>/data``: GTA5
   (``gta5/images/*.png`` RGB, ``gta5/labels/*.png`` 8-bit Cityscapes label ids) and Cityscapes
   (``cityscapes/leftImg8bit/{train,val}/<city>/<city>_<seq>_000019_leftImg8bit.png`` and
   ``cityscapes/gtFine/{train,val}/<city>/..._gtFine_labelIds.png``; train spread over :data:`TRAIN_CITIES`).
   Smooth random colours with a little noise, label ids drawn from the Cityscapes ids of the 19 classes plus
   "unlabeled" (0): the content does not matter, the sizes and the layouts do;
2. runs :data:`TRAIN_ARGS` (DeepLab-V2 from random weights, a few iterations of every stage, round decisions
   scored, the same-budget control) as a subprocess with ``--out <root>/out``; at ``--size-scale 1`` the
   preset's own crop 730, resize 850 and eval size 1460x730 (not passed: the defaults are what is rehearsed),
   otherwise those three scaled and passed;
3. runs ``examples/predict.py`` on ``<root>/out/adapted.pt`` over the val split (``--out <root>/out/predictions``);
4. while each subprocess runs, a sampling thread records every ``--interval`` seconds the resident memory of
   its process tree (VmRSS of ``/proc/<pid>/status``, children included) and the size of ``<root>/out`` (sum
   of file sizes), and tails the run's ``<out>/log.txt`` (predict.py: its stdout) for the lines of
   :data:`PHASE_MARKERS`;
5. prints and writes (``--report``, markdown) a table per phase (wall seconds, peak RSS, disk at the phase's
   end), whether every phase boundary was passed (:func:`boundaries`), the exit codes, the files of the output
   folder with their sizes and the machine.

Phase attribution: the pipeline logs a line when a piece of work ENDS (``pre-flight data check: ...`` after the
check, ``[k/N] ... | stage 1 it k`` after step k, ``eval ...`` after an evaluation, ``round r: static labels
...`` after the pass). So a phase row spans from the previous marker line to its own marker line, and the work
between two marker lines that logs nothing of its own (checkpoint writes, ``round_start.pt`` /
``best_scored.pt`` snapshots, the start of a DataLoader) is counted in the row of the next marker; the rows'
notes say what each one includes. Lines are seen when the file is polled, so boundaries are exact to one
``--interval``; a phase shorter than that may hold no sample (peak RSS "-"). The patterns are prefix / regular
expression matches collected in :data:`PHASE_MARKERS` (and :data:`PREDICT_MARKERS`), the one place to adjust
when the log's wording changes.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from uda.classes import CITYSCAPES_LABEL_IDS  # examples/ is on the path: run as python -m benchmarks.dress_rehearsal

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------ the one table to adjust
# key -> (regex searched in a log.txt line, the phase that the line ENDS ("{r}": the regex's group r), the unlogged
# work that happens before the line and so is counted in its row). First match wins: specific patterns first.
PHASE_MARKERS: dict[str, tuple[str, str, str]] = {
    "preflight": (r"^pre-flight data check:", "pre-flight data check", "interpreter start, imports, dataset listing"),
    "setup": (r"^\d+ process\(es\) on ", "set-up", "model build (random init), data streams"),
    "stage1_step": (r"\|\s*stage 1 it (?P<it>\d+)", "stage 1 steps", "first step: the stream's start"),
    "source_eval": (r"^eval source-only", "source-only evaluation", "source_only.pt"),
    "static_labels": (r"^round (?P<r>\d+): static labels", "static labels round {r}",
                      "the checkpoint before (stage 2's start / the round before)"),
    "deliver_control": (r"^round decisions:.*deliver.*control", "control: restore its best-scored model",
                        "the last control round's scoring"),
    "deliver": (r"^round decisions:.*deliver", "round decisions: restore the best-scored model", ""),
    "score_source": (r"^round decisions:", "round-decision scoring: source model", ""),
    "fallback_step": (r"\|\s*stage 2 round (?P<r>\d+) \(.*fallback\) it", "fallback round {r} steps",
                      "first step: the checkpoint of the undone round"),
    "adapt_step": (r"\|\s*stage 2 round (?P<r>\d+) it", "stage 2 round {r} steps",
                   "first step: round_start.pt, best_scored-*.pt snapshots"),
    "round_eval": (r"^eval adapted round (?P<r>\d+)", "round {r} end: evaluation", ""),
    "round_signals": (r"^round (?P<r>\d+): label-free reliability signals", "round {r} end: signals", ""),
    "round_decision": (r"^round (?P<r>\d+):\s*(kept|undone)", "round-decision scoring: round {r}",
                       "the round's figure, best_scored-*.pt / restore"),
    "fallback_eval": (r"^eval fallback round (?P<r>\d+)", "fallback round {r} evaluation", ""),
    "fallback_done": (r"^round (?P<r>\d+): .*fallback done", "round-decision scoring: fallback round {r}",
                      "best_scored-*.pt"),
    "final_eval": (r"^eval adapted \(", "final evaluation (best-scored model)", ""),
    "control_step": (r"\|\s*control round (?P<r>\d+) it", "control round {r} steps",
                     "first step: adapted.pt, the control's start (checkpoint, scoring) / the previous control "
                     "round's scoring and checkpoint"),
    "control_eval": (r"^eval control round (?P<r>\d+)", "control round {r} evaluation", ""),
    "control_score": (r"^control round (?P<r>\d+): label-free score", "control round {r} scoring",
                      "control_best_scored-*.pt"),
    "control_final_eval": (r"^eval control \(", "control: evaluation of its best-scored model", ""),
    "finish_table": (r"^per-class IoU on target val", "finish: metrics.json, curves, tables",
                     "the last control round's scoring, the last checkpoint"),
    "finish": (r"^target mIoU:", "finish: metrics.json, curves, tables", ""),
}
TRAIN_TAIL = "teardown (after the last log line)"
# predict.py prints to stdout (no log.txt): the same scheme on its stdout
PREDICT_MARKERS: dict[str, tuple[str, str, str]] = {
    "predict_start": (r"^predicting (?P<n>\d+) images at (?P<w>\d+)x(?P<h>\d+)", "predictions: start-up",
                      "interpreter start, imports, loading adapted.pt"),
    "predict_images": (r"^predicted \d+/\d+ images", "predictions: images", "forward, 4 PNGs per image"),
    "predict_miou": (r"^mIoU:", "predictions: IoU table, metrics.json", ""),
}
PREDICT_TAIL = "predictions: teardown"

# ------------------------------------------------------------------------------------------ data and command
GTA5_SIZE, CITYSCAPES_SIZE = (1914, 1052), (2048, 1024)  # (W, H) of the releases
TRAIN_CITIES, VAL_CITIES = ("aachen", "bochum", "bremen"), ("frankfurt", "lindau", "munster")
PRESET = {"crop": 730, "resize": 850, "eval_size": (1460, 730)}  # the deeplabv2 defaults (uda.options.DEFAULTS)
SOURCE_ITERS, ROUNDS, ROUND_ITERS = 2, 2, 2
TRAIN_ARGS = ["--arch", "deeplabv2", "--source-iters", str(SOURCE_ITERS), "--rounds", str(ROUNDS),
              "--round-iters", str(ROUND_ITERS), "--round-decisions", "score", "--score-images", "2", "--control",
              "--ckpt-every", "1000", "--log-every", "1", "--workers", "0"]
GIB, MIB = 2**30, 2**20


def scaled(size: tuple[int, int], scale: float) -> tuple[int, int]:
    return max(8, round(size[0] * scale)), max(8, round(size[1] * scale))


def smooth_image(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8: random colours on a coarse grid, bicubically upsampled, plus a little noise."""
    w, h = size
    coarse = rng.integers(0, 256, (max(2, h // 96), max(2, w // 96), 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
    image = image + rng.integers(-6, 7, image.shape, dtype=np.int16)
    return np.clip(image, 0, 255).astype(np.uint8)


def label_ids(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 Cityscapes label ids: blocks of the 19 classes' ids and some "unlabeled" (0)."""
    w, h = size
    ids = np.array((0,) + tuple(CITYSCAPES_LABEL_IDS), dtype=np.uint8)
    p = np.full(len(ids), 0.95 / (len(ids) - 1))
    p[0] = 0.05
    coarse = rng.choice(ids, size=(max(2, h // 64), max(2, w // 64)), p=p)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.NEAREST))


def write_data(root: Path, images: int, scale: float, seed: int = 0) -> tuple[Path, Path]:
    """The GTA5 and Cityscapes layouts under ``root``: ``(gta5 root, cityscapes root)``."""
    rng = np.random.default_rng(seed)
    gta, cs = root / "gta5", root / "cityscapes"
    gta_size, cs_size = scaled(GTA5_SIZE, scale), scaled(CITYSCAPES_SIZE, scale)
    for d in ("images", "labels"):
        (gta / d).mkdir(parents=True, exist_ok=True)
    for i in range(images):  # GTA5 names its frames 00001.png, ...
        Image.fromarray(smooth_image(rng, gta_size)).save(gta / "images" / f"{i + 1:05d}.png")
        Image.fromarray(label_ids(rng, gta_size)).save(gta / "labels" / f"{i + 1:05d}.png")
    for split, cities in (("train", TRAIN_CITIES), ("val", VAL_CITIES)):
        for i in range(images):  # round-robin over the cities
            city = cities[i % len(cities)]
            stem = f"{city}_{i // len(cities):06d}_000019"
            for d in ("leftImg8bit", "gtFine"):
                (cs / d / split / city).mkdir(parents=True, exist_ok=True)
            Image.fromarray(smooth_image(rng, cs_size)).save(cs / "leftImg8bit" / split / city
                                                             / f"{stem}_leftImg8bit.png")
            Image.fromarray(label_ids(rng, cs_size)).save(cs / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
    return gta, cs


# ------------------------------------------------------------------------------------------ sampling
def children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return kids


def tree_rss(pid: int) -> tuple[int, int]:
    """``(sum of VmRSS in bytes, processes)`` of ``pid`` and its descendants (shared pages counted per process)."""
    todo, total, count = [pid], 0, 0
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        count += 1
                        break
        except OSError:
            continue
        todo += children(p)
    return total, count


def folder_files(folder: Path) -> dict[str, int]:
    sizes = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = Path(dirpath) / name
            try:
                sizes[str(path.relative_to(folder))] = path.lstat().st_size
            except OSError:  # renamed or removed meanwhile (atomic saves)
                pass
    return sizes


def folder_bytes(folder: Path) -> int:
    return sum(folder_files(folder).values())


class Tail:
    """New complete lines of a growing text file (absent at first is fine)."""

    def __init__(self, path: Path):
        self.path, self.pos, self.buf = path, 0, ""

    def read(self, final: bool = False) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except OSError:
            data = b""
        self.pos += len(data)
        self.buf += data.decode("utf-8", "replace")
        *lines, self.buf = self.buf.split("\n")
        if final and self.buf:
            lines, self.buf = lines + [self.buf], ""
        return lines


@dataclass
class Monitored:
    """One monitored subprocess: its command, exit code, times (monotonic), samples ``(t, rss, disk, procs)``,
    log lines ``(t seen, line)`` and the kernel's peak RSS of one process of it (``wait4``'s ru_maxrss)."""

    name: str
    cmd: list[str]
    rc: int | None = None
    start: float = 0.0
    end: float = 0.0
    samples: list[tuple[float, int, int, int]] = field(default_factory=list)
    lines: list[tuple[float, str]] = field(default_factory=list)
    maxrss: int = 0
    final_disk: int = 0
    stdout: Path | None = None
    stderr: Path | None = None


def monitor(name: str, cmd: list[str], *, log: Path, out: Path, logs: Path, env: dict, interval: float,
            markers: dict[str, tuple[str, str]], t0: float) -> Monitored:
    """Run ``cmd`` (in the repository) and sample it until it exits; marker lines are echoed as they come."""
    run = Monitored(name, cmd, stdout=logs / f"{name}.stdout.txt", stderr=logs / f"{name}.stderr.txt")
    print(f"$ {' '.join(cmd)}", flush=True)
    with open(run.stdout, "wb") as so, open(run.stderr, "wb") as se:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=so, stderr=se, env=env)
    run.start = time.monotonic()
    tail, stop = Tail(log), threading.Event()

    def loop() -> None:
        while True:
            t = time.monotonic()
            for line in tail.read():
                run.lines.append((t, line))
                hit = match(line, markers)
                if hit is not None:
                    rss = run.samples[-1][1] if run.samples else 0
                    print(f"  [{t - t0:8.1f} s | {rss / GIB:5.2f} GiB] {hit[1]:<58} <- {line[:90]}", flush=True)
            s = time.monotonic()
            rss, procs = tree_rss(proc.pid)
            if procs:
                run.samples.append((s, rss, folder_bytes(out), procs))
            if stop.wait(interval):
                return

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:  # Ctrl-C: the run stops too (SIGTERM: it writes its checkpoint and exits 75)
        proc.terminate()
        proc.wait()
        stop.set()
        raise
    run.end = time.monotonic()
    proc.returncode = run.rc = os.waitstatus_to_exitcode(status)
    run.maxrss = usage.ru_maxrss * 1024  # KiB on Linux
    stop.set()
    thread.join()
    run.lines += [(run.end, line) for line in tail.read(final=True)]  # written before the exit
    run.final_disk = folder_bytes(out)
    print(f"  exit code {run.rc} after {run.end - run.start:.1f} s", flush=True)
    return run


# ------------------------------------------------------------------------------------------ attribution
def match(line: str, markers: dict[str, tuple[str, str]]) -> tuple[str, str, re.Match] | None:
    """``(key, phase name, match)`` of the first marker ``line`` matches, else None."""
    for key, (pattern, phase, _) in markers.items():
        m = re.search(pattern, line)
        if m:
            return key, phase.format(**m.groupdict()), m
    return None


@dataclass
class Row:
    phase: str
    start: float
    end: float
    lines: int = 0
    peak: int | None = None
    disk: int | None = None
    samples: int = 0
    procs: int = 0
    includes: str = ""


def phase_rows(run: Monitored, markers: dict[str, tuple[str, str]], tail_name: str) -> list[Row]:
    """One row per stretch between marker lines (named by the line that ends it), consecutive rows of the same
    phase merged; samples attributed to the stretch they fall in."""
    rows, prev = [], run.start
    for t, line in run.lines:
        hit = match(line, markers)
        if hit is not None:
            rows.append(Row(hit[1], prev, t, 1, includes=markers[hit[0]][2]))
            prev = t
    rows.append(Row(tail_name, prev, run.end, 0))
    ends = [r.end for r in rows]
    for t, rss, disk, procs in run.samples:
        i = min(bisect.bisect_right(ends, t), len(rows) - 1)
        # a sample exactly at a marker's poll time is taken after the line was read: the next row
        row = rows[i]
        row.peak = rss if row.peak is None else max(row.peak, rss)
        row.disk, row.samples, row.procs = disk, row.samples + 1, max(row.procs, procs)
    rows[-1].disk = run.final_disk
    merged: list[Row] = []
    for row in rows:
        if merged and merged[-1].phase == row.phase:
            m = merged[-1]
            m.end, m.lines, m.samples = row.end, m.lines + row.lines, m.samples + row.samples
            m.procs = max(m.procs, row.procs)
            m.includes = "; ".join(dict.fromkeys(x for x in (m.includes, row.includes) if x))
            m.peak = row.peak if m.peak is None else m.peak if row.peak is None else max(m.peak, row.peak)
            m.disk = row.disk if row.disk is not None else m.disk
        else:
            merged.append(row)
    last_disk = 0
    for row in merged:  # a row without a sample: the disk of the last one before it
        row.disk = last_disk if row.disk is None else row.disk
        last_disk = row.disk
    return [r for r in merged if r.end > r.start or r.lines]


# ------------------------------------------------------------------------------------------ boundaries
def boundaries(train: Monitored, predict: Monitored | None, out: Path, eval_size: tuple[int, int], images: int
               ) -> list[tuple[str, bool | None, str]]:
    """``(boundary, passed (None: not applicable), evidence)`` for every phase the rehearsal must pass."""
    hits: dict[str, list[re.Match]] = {}
    for _, line in train.lines:
        hit = match(line, PHASE_MARKERS)
        if hit is not None:
            hits.setdefault(hit[0], []).append(hit[2])

    def rounds(key: str) -> set[int]:
        return {int(m.group("r")) for m in hits.get(key, [])}

    want = set(range(ROUNDS))
    undone = {int(m.group("r")) for m in hits.get("round_decision", []) if m.group(2) == "undone"}
    metrics_path = out / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    config_size = tuple(metrics.get("config", {}).get("eval_size") or ())
    stage1 = {int(m.group("it")) for m in hits.get("stage1_step", [])}
    checks = [
        ("pre-flight data check", "preflight" in hits, "log: pre-flight data check: ..."),
        ("stage 1", SOURCE_ITERS in stage1, f"stage 1 iterations logged: {sorted(stage1)} of {SOURCE_ITERS}"),
        ("source-only evaluation", "source_eval" in hits, "log: eval source-only ..."),
        ("static labels, every round", rounds("static_labels") >= want,
         f"rounds {sorted(rounds('static_labels'))} of {sorted(want)}"),
        ("round-decision scoring", "score_source" in hits and rounds("round_decision") >= want,
         f"source model scored: {'score_source' in hits}; rounds decided {sorted(rounds('round_decision'))}"
         + (f" (undone: {sorted(undone)})" if undone else " (all kept)")),
        ("round ends (evaluation)", rounds("round_eval") >= want, f"eval adapted round {sorted(rounds('round_eval'))}"),
        ("fallback", (rounds("fallback_eval") >= undone and rounds("fallback_done") >= undone) if undone else None,
         f"undone rounds {sorted(undone)}, fallbacks evaluated {sorted(rounds('fallback_eval'))}" if undone
         else "no round undone: no fallback ran"),
        ("control", rounds("control_eval") >= want, f"eval control round {sorted(rounds('control_eval'))}"),
        ("final line (target mIoU)", "finish" in hits, "log: target mIoU: ..."),
        (f"evaluation at {eval_size[0]}x{eval_size[1]}", config_size == tuple(eval_size),
         f"metrics.json config eval_size {list(config_size) or 'missing'}"),
        ("adapted.pt written", (out / "adapted.pt").is_file(), str(out / "adapted.pt")),
    ]
    if predict is None:
        checks.append(("predictions", False, "predict.py not run (no adapted.pt)"))
    else:
        start = [m for _, line in predict.lines if (m := re.search(PREDICT_MARKERS["predict_start"][0], line))]
        size = (int(start[0]["w"]), int(start[0]["h"])) if start else None
        written = len(list((out / "predictions" / "trainids").glob("*.png")))
        ok = predict.rc == 0 and size == tuple(eval_size) and written == images
        checks.append(("predictions", ok, f"predict.py exit {predict.rc}, at {size}, {written}/{images} train-id PNGs"))
    checks.append(("exit codes", train.rc == 0 and (predict is not None and predict.rc == 0),
                   f"train {train.rc}, predict {None if predict is None else predict.rc}"))
    return checks


# ------------------------------------------------------------------------------------------ machine and report
def machine(threads: int | None) -> dict:
    import torch

    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "cpu": cpu,
            "memory_gib": round(mem / GIB, 1), "torch": torch.__version__, "torch_default_threads":
            torch.get_num_threads(), "threads": threads or f"torch's choice ({torch.get_num_threads()})",
            "python": platform.python_version()}


def fmt_gib(value: int | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def report(args, info: dict, train: Monitored, predict: Monitored | None, rows: list[Row],
           checks: list[tuple[str, bool | None, str]], files: dict[str, int], sizes: dict, seconds: dict,
           t0: float) -> str:
    mark = {True: "yes", False: "**NO**", None: "n/a"}
    lines = [
        "# Dress rehearsal: DeepLab-V2 preset on the CPU", "",
        f"Written by `benchmarks/dress_rehearsal.py` on {time.strftime('%Y-%m-%d %H:%M:%S')}; size scale "
        f"{args.size_scale:g} ({'the real sizes' if args.size_scale == 1 else 'a SMOKE run, not the real sizes'}), "
        f"{args.images} images per split.", "",
        f"- data: GTA5 {sizes['gta5'][0]}x{sizes['gta5'][1]}, Cityscapes {sizes['cityscapes'][0]}x"
        f"{sizes['cityscapes'][1]} (train cities {', '.join(TRAIN_CITIES[:args.images])}); crop {sizes['crop']}, "
        f"resize {sizes['resize']}, eval size {sizes['eval'][0]}x{sizes['eval'][1]}"
        f"{' (the preset defaults, not passed)' if args.size_scale == 1 else ' (scaled, passed)'}; "
        f"writing the data took {seconds['data']:.1f} s",
        f"- machine: nproc {info['nproc']} (affinity {info['affinity']}), {info['cpu']}, {info['memory_gib']} GiB, "
        f"torch {info['torch']} (default threads {info['torch_default_threads']}), threads used "
        f"{info['threads']}, Python {info['python']}",
        f"- train: `{' '.join(train.cmd)}`",
        f"- predict: `{' '.join(predict.cmd) if predict else 'not run'}`",
        f"- exit codes: train {train.rc}, predict {None if predict is None else predict.rc}; total wall "
        f"{time.monotonic() - t0:.1f} s (train {train.end - train.start:.1f} s"
        + (f", predict {predict.end - predict.start:.1f} s" if predict else "") + ")",
        f"- peak RSS (kernel high-water mark of one process, wait4): train {fmt_gib(train.maxrss)} GiB"
        + (f", predict {fmt_gib(predict.maxrss)} GiB" if predict else ""), "",
        "## Phases", "",
        "| phase | wall s | peak host RSS GiB | disk at end MiB | marker lines | samples | max procs | also counts "
        "(unlogged work before its line) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    lines += [f"| {r.phase} | {r.end - r.start:.1f} | {fmt_gib(r.peak)} | {(r.disk or 0) / MIB:.1f} | {r.lines} | "
              f"{r.samples} | {r.procs} | {r.includes} |" for r in rows]
    lines += [
        "", "Attribution: a row spans from the previous marker line of `<out>/log.txt` (predict.py: its stdout) "
        "to its own; the pipeline logs when work ENDS, so work that logs nothing (checkpoint writes, snapshots, the "
        "control's scoring) counts in the row of the next line (last column; coarse where the pipeline logs "
        f"nothing). Boundaries exact to one poll ({args.interval:g} s); a row with "
        "no sample shows RSS '-'. RSS: VmRSS summed over the process tree (the pre-flight worker processes "
        "included; shared pages counted per process), sampled. Disk: sum of file sizes under `<out>`.", "",
        "## Phase boundaries", "", "| boundary | passed | evidence |", "|---|---|---|"]
    lines += [f"| {name} | {mark[ok]} | {evidence} |" for name, ok, evidence in checks]
    lines += ["", f"## Files in the output folder at the end ({sum(files.values()) / MIB:.1f} MiB)", "",
              "| file | MiB |", "|---|---:|"]
    lines += [f"| {name} | {size / MIB:.2f} |" for name, size in sorted(files.items())]
    for run in (train, predict):
        if run is not None and run.rc != 0:
            err = run.stderr.read_text(errors="replace")[-4000:] if run.stderr and run.stderr.is_file() else ""
            lines += ["", f"## {run.name} failed (exit {run.rc}): end of stderr", "", "```", err.rstrip(), "```"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--root", help="folder for data/, out/ and logs/ (default: a new temporary folder)")
    p.add_argument("--images", type=int, default=4, help="images per split (GTA5, Cityscapes train, val)")
    p.add_argument("--size-scale", type=float, default=1.0,
                   help="scale of every image size, and of crop/resize/eval size (0.25: a quick smoke run)")
    p.add_argument("--keep", action="store_true", help="keep data/, out/ and logs/ (default: removed at the end)")
    p.add_argument("--threads", type=int, help="torch CPU threads of both subprocesses (default: torch's choice)")
    p.add_argument("--interval", type=float, default=0.2, help="sampling interval, seconds")
    p.add_argument("--report", default=str(REPO / "benchmarks" / "results" / "issue34" / "dress_rehearsal.md"),
                   help="markdown report")
    args = p.parse_args(argv)
    if args.images < 1 or args.size_scale <= 0:
        p.error("expected --images >= 1 and --size-scale > 0")
    t0 = time.monotonic()
    temporary = args.root is None
    root = Path(tempfile.mkdtemp(prefix="dress_rehearsal_") if temporary else args.root).resolve()
    data, out, logs = root / "data", root / "out", root / "logs"
    if out.exists() and any(out.iterdir()):
        p.error(f"{out} exists and is not empty: remove it (the run's log.txt would be appended to)")
    logs.mkdir(parents=True, exist_ok=True)
    info = machine(args.threads)
    s = args.size_scale
    sizes = {"gta5": scaled(GTA5_SIZE, s), "cityscapes": scaled(CITYSCAPES_SIZE, s),
             "crop": max(8, round(PRESET["crop"] * s)), "resize": max(8, round(PRESET["resize"] * s)),
             "eval": scaled(PRESET["eval_size"], s)}
    print(f"machine: {info}\nwriting {args.images} images per split at scale {s:g} under {data}", flush=True)
    gta, cs = write_data(data, args.images, s)
    seconds = {"data": time.monotonic() - t0}
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, "examples/train_gta2cs.py", "--gta5-root", str(gta), "--cityscapes-root", str(cs),
           "--out", str(out), *TRAIN_ARGS]
    if s != 1:
        cmd += ["--crop", str(sizes["crop"]), "--resize", str(sizes["resize"]),
                "--eval-size", f"{sizes['eval'][0]}x{sizes['eval'][1]}"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    train = monitor("train", cmd, log=out / "log.txt", out=out, logs=logs, env=env, interval=args.interval,
                    markers=PHASE_MARKERS, t0=t0)
    rows = phase_rows(train, PHASE_MARKERS, TRAIN_TAIL)
    predict = None
    if (out / "adapted.pt").is_file():
        cmd = [sys.executable, "examples/predict.py", "--checkpoint", str(out / "adapted.pt"), "--dataset",
               "cityscapes", "--root", str(cs), "--split", "val", "--out", str(out / "predictions")]
        stdout = logs / "predict.stdout.txt"
        predict = monitor("predict", cmd, log=stdout, out=out, logs=logs, env=env, interval=args.interval,
                          markers=PREDICT_MARKERS, t0=t0)
        rows += phase_rows(predict, PREDICT_MARKERS, PREDICT_TAIL)
    checks = boundaries(train, predict, out, sizes["eval"], args.images)
    files = folder_files(out)
    text = report(args, info, train, predict, rows, checks, files, sizes, seconds, t0)
    path = Path(args.report)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print("\n" + text + f"\nreport: {path}", flush=True)
    if args.keep:
        print(f"kept {root}")
    else:
        for d in (data, out, logs):
            shutil.rmtree(d, ignore_errors=True)
        if temporary:
            shutil.rmtree(root, ignore_errors=True)
    return 0 if all(ok is not False for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
