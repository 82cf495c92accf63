"""Constants, shared defaults and setting types of protocl, written once.

Imported by the public modules, the argument validation (:mod:`protocl._validation`) and the kernels
(:mod:`protocl._kernels`) alike, so that neither of the last two imports the other. String settings are
``typing.Literal`` types (IDEs and type checkers list the choices) and tuples of their choices (validation).
"""

from __future__ import annotations

from typing import Literal, Tuple, Union, get_args

import torch

IGNORE_INDEX = 255
"""The label id that marks pixels to ignore (Cityscapes/GTA5 convention)."""

EPS = 1e-6
"""Floor of the norms in every cosine, representable in fp16/bf16 (the protocl method spec, §2)."""

MIN_PURITY = 0.75
"""Default ``min_purity`` of the ``"purity"`` label resize (the protocl method spec, §2)."""

TEMPERATURE = 0.1
"""Default temperature :math:`\\tau` of the contrastive losses (the paper's)."""

THRESHOLD = 0.7
"""Default cosine threshold of the dynamic pseudo labels."""

MOMENTUM = 0.999
"""Default momentum :math:`\\lambda` of the prototype EMA."""

Reduction = Literal["none", "mean", "sum"]
Absent = Literal["mask", "min_similarity"]
At = Literal["feature", "label"]
ResizeMode = Literal["nearest", "purity"]
FuseMode = Literal["fill", "agree", "dynamic_first"]
REDUCTIONS: Tuple[Reduction, ...] = get_args(Reduction)
ABSENT_MODES: Tuple[Absent, ...] = get_args(Absent)
AT_MODES: Tuple[At, ...] = get_args(At)
RESIZE_MODES: Tuple[ResizeMode, ...] = get_args(ResizeMode)
FUSE_MODES: Tuple[FuseMode, ...] = get_args(FuseMode)

DeviceLike = Union[torch.device, str, int, None]
"""What ``device=`` of a tensor factory takes."""
