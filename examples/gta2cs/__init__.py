"""Helpers of the GTA5 -> Cityscapes reference pipeline (``examples/train_gta2cs.py``).

Modules: :mod:`model` (DeepLab-V2 ResNet-101 and a tiny CNN), :mod:`data` (GTA5 / Cityscapes readers and
transforms), :mod:`synthetic` (the embedded two-domain demo dataset), :mod:`evaluate` (confusion matrix and
mIoU), :mod:`figures` (pseudo-label panels and curves), :mod:`checkpoint` (atomic checkpoints and RNG
states), :mod:`dist` (torch.distributed helpers) and :mod:`trainer` (the two training stages).
"""
