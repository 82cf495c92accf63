r"""Predict a checkpoint of the reference pipeline on images, in the evaluation servers' formats.

Writes per-image train-id PNGs (``trainids/``: the ACDC and Dark Zurich servers), label-id PNGs (``labelids/``:
the Cityscapes server), colour renderings (``colour/``) and overlays (``overlay/``), with the evaluation's
resize/upsampling rule (input resized to ``--eval-size``, logits bilinearly upsampled to the full image) and
an optional horizontal-flip average; on a labelled split it prints the IoU table (and writes metrics.json):

    python examples/predict.py --checkpoint runs/cs2acdc/adapted.pt --dataset acdc --root /data/acdc \
        --split test --acdc-conditions all --out preds/acdc_test --device cuda
    python examples/predict.py --checkpoint runs/gta2cs/adapted.pt --dataset cityscapes --root /data/cityscapes \
        --split val --out preds/cs_val
    python examples/predict.py --checkpoint runs/mine/adapted.pt --images my_photos/ --class-table classes.json \
        --eval-size 1024x512 --out preds/mine
    python examples/predict.py --score preds/cs_val/trainids --dataset cityscapes --root /data/cityscapes \
        --split val

See docs/datasets.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from uda.predict import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
