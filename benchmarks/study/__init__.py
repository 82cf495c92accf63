r"""The adaptation study (issue 11) and its tooling, apart from the reference pipeline, which knows nothing of it:

- :mod:`.shifts`: two domain shifts built from scikit-image's bundled photographs (GTA5 / Cityscapes layouts);
- :mod:`.gates`: the ``gate`` variants' target-label rules, plugged into the pipeline's step through
  ``train_gta2cs.adapt_step(..., target_labels=...)``;
- :mod:`.adaptation_study`: source-only vs adapted vs the same-budget control per shift and seed, the
  ablations, the per-class label diagnostics (``uda.diagnostics``, the pipeline's own).
"""
