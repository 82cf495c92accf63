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
    python examples/predict.py --checkpoint GTA2Cityscapes_dass.pth --peer-classifier all-branches \
        --dataset cityscapes --root /data/cityscapes --split val --eval-size 1024x512 --out preds/peer
    python examples/predict.py --score preds/cs_val/trainids --dataset cityscapes --root /data/cityscapes \
        --split val

The code is ``uda/inference.py`` (Python puts this script's folder, ``examples/``, on ``sys.path``). See
docs/datasets.md and, for the files accepted, docs/reproduce.md ("Initial weights").
"""

from __future__ import annotations

import sys

from uda.inference import main

if __name__ == "__main__":
    sys.exit(main())
