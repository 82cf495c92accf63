r"""protocl: prototype-based bi-directional contrastive domain adaptation for semantic segmentation.

Losses and pseudo-label operators of Lee et al., "Bi-directional Contrastive Learning for Domain Adaptive
Semantic Segmentation" (ECCV 2022, arXiv 2207.10892), exact to the protocl method spec, batched, sync-free and
``torch.compile``-able. Shapes: B batch, K classes, D channels, h×w feature grid, H×W label grid.
"""

from ._types import IGNORE_INDEX
from ._validation import flush_value_checks, set_value_checks, value_checks_enabled
from .adaptation import BidirectionalContrast, PrototypeSimilarities, StepOutput
from .calibration import domain_bias_calibrate
from .contrastive import (
    PixelPrototypeContrastiveLoss,
    bcl_loss,
    cosine_similarity_map,
    fcl_loss,
    overlap_class_weight,
    pixel_prototype_contrastive_loss,
)
from .losses import EntropyLoss, entropy_loss
from .prototypes import PooledPrototypes, PrototypeEMA, masked_average_pool
from .pseudo_labels import ClassBalancedThresholds, dynamic_pseudo_label, hybrid_fuse, static_pseudo_label
from .resize import label_histogram, nearest_source_index, resize_labels

__version__ = "0.1.0.dev0"

__all__ = [
    # prototypes
    "masked_average_pool",
    "PooledPrototypes",
    "PrototypeEMA",
    "domain_bias_calibrate",
    # contrastive losses
    "pixel_prototype_contrastive_loss",
    "fcl_loss",
    "bcl_loss",
    "overlap_class_weight",
    "cosine_similarity_map",
    "PixelPrototypeContrastiveLoss",
    # pseudo labels
    "dynamic_pseudo_label",
    "hybrid_fuse",
    "static_pseudo_label",
    "ClassBalancedThresholds",
    # other losses
    "entropy_loss",
    "EntropyLoss",
    # orchestrator
    "BidirectionalContrast",
    "StepOutput",
    "PrototypeSimilarities",
    # label resizing
    "resize_labels",
    "nearest_source_index",
    "label_histogram",
    # conventions
    "IGNORE_INDEX",
    "set_value_checks",
    "value_checks_enabled",
    "flush_value_checks",
]
