r"""Run the reference pipeline and "crash" after a number of training steps (a test helper, also under torchrun):

    python tests/examples_crash.py STEPS <train_gta2cs.py options>

Exits 1 after the STEPS-th step (nothing saved after the last periodic checkpoint), 0 if the run ended first.
Needs ``src``, ``examples`` and ``tests`` on PYTHONPATH (tests/test_examples_ddp.py sets it).
"""

import sys

from examples_helpers import crash_after, train_with

if __name__ == "__main__":
    sys.exit(train_with(sys.argv[2:], crash_after(int(sys.argv[1]))))
