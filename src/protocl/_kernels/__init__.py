"""protocl's internal layer: the maths of every operator, without argument validation.

Each public function of ``protocl`` validates its arguments once and calls one kernel of this package; the
orchestrator calls the kernels directly after validating the step's inputs. Kernels assume valid arguments
(shapes, dtypes, settings) and never synchronise with the host. The modules mirror the public ones:

- :mod:`.dtypes`: fp16/bf16 upcast, the compute dtype, autocast off;
- :mod:`.resize`: nearest index rule, label resizing (nearest, purity), per-cell label histograms;
- :mod:`.prototypes`: masked average pooling, the EMA blend, the domain-bias calibration;
- :mod:`.cosine`: the pixel-prototype cosine with its fused backward (a custom autograd Function);
- :mod:`.contrastive`: the contrastive loss terms and the release's overlap weight;
- :mod:`.reduction`: ``reduction`` ("none" | "mean" | "sum", empty mean = 0) and the release's mean over pairs;
- :mod:`.pseudo_labels`: dynamic labels, fusion, confidences, static labels, class-balanced thresholds;
- :mod:`.losses`: entropy.
"""
