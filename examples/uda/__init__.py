"""Modules of the GTA5 -> Cityscapes reference pipeline; its loop is ``examples/train_gta2cs.py``.

Modules: :mod:`options` (the command line: parsing only), :mod:`run` (``setup``: the one way to build a run;
the round's figure and diagnostics; ``finish``), :mod:`model` (DeepLab-V2 ResNet-101 and a tiny CNN),
:mod:`classes` (class tables and the palette), :mod:`labels` (label decoding, one path for every layout),
:mod:`datasets` (one lister per dataset and the registry), :mod:`loading` (torch datasets and transforms),
:mod:`stream` (the batch stream), :mod:`scenes` and :mod:`demo` (the demo's scenes and every demo-data writer),
:mod:`evaluate` (confusion matrix and mIoU),
:mod:`diagnostics` (per-class pseudo-label diagnostics), :mod:`figures` (pseudo-label panels and curves),
:mod:`checkpoint` (atomic checkpoints, safe loading and RNG states), :mod:`preflight` (the data check before
training), :mod:`runtime` (stop requests, the non-finite guard, the output folder, ``--resume auto``) and
:mod:`dist` (torch.distributed set-up).
"""
