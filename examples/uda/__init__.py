"""Modules of the GTA5 -> Cityscapes reference pipeline; its loop is ``examples/train_gta2cs.py``.

Modules: :mod:`options` (the command line: parsing only), :mod:`run` (``setup``: the one way to build a run;
the round's figure and diagnostics; ``finish``), :mod:`model` (DeepLab-V2 ResNet-101 and a tiny CNN),
:mod:`data` (GTA5 / SYNTHIA / Cityscapes readers and transforms), :mod:`synthetic` (the embedded two-domain demo
dataset and the GTA5 / Cityscapes-layout writers), :mod:`evaluate` (confusion matrix and mIoU),
:mod:`diagnostics` (per-class pseudo-label diagnostics), :mod:`figures` (pseudo-label panels and curves),
:mod:`checkpoint` (atomic checkpoints, safe loading and RNG states), :mod:`preflight` (the data check before
training), :mod:`runtime` (stop requests, the non-finite guard, the output folder, ``--resume auto``) and
:mod:`dist` (torch.distributed set-up).
"""
