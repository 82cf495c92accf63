"""The reference pipeline's package (unsupervised domain adaptation, every benchmark); its loops are
``examples/train_gta2cs.py`` (the paper's method) and ``examples/train_daformer.py`` (DAFormer's mean-teacher
recipe). One module per job, no module imports back one that imports it:

- :mod:`options` — the command line: parsing only, per-architecture defaults, the one size parser
- :mod:`daformer_options` — ``train_daformer.py``'s command line: the shared groups, DAFormer's schedule and recipe
- :mod:`run` — ``setup``: the one way to build a :class:`~uda.run.Run` (data, model, orchestrator, optimizer, log)
- :mod:`state` — the checkpoint dict, start/resume/``--source-checkpoint``, phases, the loop's reliability points
- :mod:`report` — evaluation, the log point, the end of a round, ``finish`` (metrics.json, the last line)
- :mod:`static_labels` — a round's static pseudo labels over the whole target train split
- :mod:`signals` — label-free reliability signals of the target labels (from the orchestrator's own output)
- :mod:`target_ce` — ``--target-ce``: which labels the target cross-entropy trains on
- :mod:`decisions` — ``--round-decisions score``: keep a round only if a label-free score says it helped
- :mod:`scoring` — what the decisions score on: a subset spread over the target's folders, memory-sized batches
- :mod:`reliability` — per-class reliability weights in the step, the fallbacks' class weights, ``--rectify``
- :mod:`score` — label-free scores of a whole model on the target (flip agreement, entropy, SND, prototypes)
- :mod:`diagnostics` — per-class pseudo-label diagnostics against ground truth (``--diagnostics``)
- :mod:`evaluate` — confusion matrix, per-class IoU, mIoU, the IoU table
- :mod:`figures` — pseudo-label panels and training curves
- :mod:`model` — DeepLab-V2 ResNet-101 and the tiny CNN
- :mod:`mit` — SegFormer's Mix Transformer encoder MiT-B0…B5 (DAFormer's settings), for the DAFormer-class trainer
- :mod:`daformer_head` — DAFormer's decoder (stages embedded to 256, separable ASPP fusion, classifier)
- :mod:`daformer_net` — DAFormer's network in the pipeline: MiT encoder + DAFormer decoder, its description, its parameter groups
- :mod:`mit_weights` — MiT weight files (SegFormer ``mit_b*.pth``, Hugging Face ``nvidia/mit-b*``), told by structure
- :mod:`teacher` — the mean teacher's parts: EMA update, pseudo labels and their weight, ImageNet feature distance, MIC's mask
- :mod:`schedule` — DAFormer's AdamW parameter groups and mmcv's poly learning rate with linear warm-up
- :mod:`mix` — ClassMix masks, mixing, DAFormer's strong transform (colour jitter, blur), sync-free
- :mod:`rare_class` — rare-class sampling: source class statistics, sampling probabilities, class crops
- :mod:`mean_teacher` — the recipe's run parts: source crops with RCS (statistics cached), per-step draws, mmseg's CE
- :mod:`network` — the network description a checkpoint carries beside its weights
- :mod:`weight_files` — what a weights file is, told from its structure (torchvision, DeepLab init, peers)
- :mod:`weights` — loading weights into a network: ``--init``, ``--source-checkpoint``, ``--resume``, predict
- :mod:`inference` — predictions of a checkpoint on a folder or a split (``examples/predict.py``)
- :mod:`classes` — class tables (one per label space) and the one palette
- :mod:`labels` — decoding images and labels, one path for every layout
- :mod:`datasets` — one lister per dataset (``datasets/<name>.py``) and the registry of sources and targets
- :mod:`loading` — the torch datasets (train, eval, pseudo-label pass) and their transforms
- :mod:`stream` — the resumable, sharded batch stream and the DataLoader workers' signal handling
- :mod:`scenes` — the demo's street scenes and the renderings of its two domains
- :mod:`demo` — every writer of demo data (``python -m uda.demo`` from ``examples/``)
- :mod:`preflight` — the data check before training
- :mod:`checkpoint` — atomic checkpoint files, safe loading, RNG states
- :mod:`runtime` — stop requests, the non-finite guard, the output folder, ``--resume auto``
- :mod:`dist` — torch.distributed set-up
"""
