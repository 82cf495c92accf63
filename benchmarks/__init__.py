r"""Benchmarks and studies of protocl and its reference pipeline (run from the repository root):

    python -m benchmarks.gpu_check --smoke
    python -m benchmarks.study.adaptation_study --cached-only
    python benchmarks/bench.py

The reference pipeline (``examples/train_gta2cs.py`` and its ``uda`` package) is a script folder, not an
installed package, and ``bench.py`` imports ``release_baseline`` as a top-level module (as when it runs as a
script): importing this package puts ``examples/`` and ``benchmarks/`` on ``sys.path``. This is the
repository's one ``sys.path`` edit; the tests get the same paths from pytest's ``pythonpath`` option.
"""

import sys
from pathlib import Path

sys.path[:0] = [p for p in (str(Path(__file__).resolve().parents[1] / "examples"), str(Path(__file__).resolve().parent))
                if p not in sys.path]
