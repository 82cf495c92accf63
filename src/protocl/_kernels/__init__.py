"""protocl's internal layer: the maths of the operators, without argument validation.

Each public function of ``protocl`` validates its arguments once and computes, itself or through the kernels of
this package; the orchestrator calls the kernels directly after validating the step's inputs. Kernels assume
valid arguments (shapes, dtypes, settings), never synchronise with the host, and import their types and
constants from :mod:`protocl._types` (never the validation layer):

- :mod:`.dtypes`: fp16/bf16 upcast, the compute dtype, autocast off;
- :mod:`.resize`: nearest index rule, label resizing (nearest, purity), per-cell label histograms;
- :mod:`.cosine`: the pixel-prototype cosine with its fused backward (a custom autograd Function), and the rule
  of which prototypes are valid;
- :mod:`.contrastive`: the contrastive loss terms (cosine logits, log-softmax, weights) and the release's overlap;
- :mod:`.reduction`: ``reduction`` ("none" | "mean" | "sum", empty mean = 0) and the release's mean over pairs;
- :mod:`.prototypes`: class sums (masked average pooling), the EMA blend, the domain-bias calibration;
- :mod:`.pseudo_labels`: dynamic labels, fusion, confidences, static labels, class-balanced thresholds.
"""
