r"""Weights from the field and from our own runs, loaded into the pipeline's networks: never a silently
different network (style rule 21).

What a file is comes from :mod:`uda.weight_files` (detected from its structure, never from a prefix: torchvision,
the DeepLab init, AdaptSegNet/DASS ``Res_Deeplab`` and ``DeeplabMulti``, a bare backbone, this pipeline's own
files, SegFormer / Hugging Face MiT files); what a network is, from :mod:`uda.network`. Entry points, each
returning the line to log: :func:`init_weights` (``--init``; :func:`init_mit` for a DAFormer network),
:func:`load_source_weights` (``--source-checkpoint``), :func:`build_model_for` (``predict.py``),
:func:`resume_network` (``--resume``), :func:`check_network` (any other load), and :func:`build_model` (a run's
network, its ``--init`` loaded).

A trap no key shows: AdaptSegNet's ``Classifier_Module.forward`` returns inside its loop, so the classifiers it
trained sum only ASPP branches 0 and 1, while DASS's and this pipeline's sum all four. A peer's classifier is
loaded only with ``peer_classifier`` (``--peer-classifier``): ``"all-branches"`` (DASS, protocl) loads the four
branches; ``"first-two"`` (AdaptSegNet) loads branches 0-1 and zeroes branches 2-3, so the four-branch head
computes exactly the two-branch sum.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .daformer_net import MIT_ARCHS, DAFormerNet
from .mit_weights import load_mit
from .model import DeepLabV2, TinySegNet
from .network import (
    LAYOUT_TEXT,
    NetworkMismatchError,
    describe_network,
    legacy_network,
    mismatch_error,
    network_differences,
)
from .weight_files import (
    LAYOUT_FIELDS,
    PEER_CLASSIFIERS,
    PEER_HINT,
    Found,
    UnknownWeightsError,
    load_backbone_state,
    read_weights,
    resolve_layout,
    strip_prefixes,
    unwrap,
)


# ------------------------------------------------------------------------------------------------ entry points
def network_config(model: nn.Module, class_names=None) -> dict:
    """The model's network description (:meth:`model.DeepLabV2.network_config`), with ``class_names`` when given:
    what a checkpoint carries next to the weights (``ckpt["network"]``; the state dict's ``_extra_state`` too)."""
    config = model.network_config()
    if class_names is not None:
        config["classes"] = [str(n) for n in class_names]
    return config


def saved_network(saved) -> dict | None:
    """The network description in a checkpoint (``{"network": ...}`` or ``{"model": state}``), a state dict or a
    description itself; an older checkpoint's is inferred (:func:`uda.network.legacy_network`); None if it says nothing.
    The class names come from the checkpoint's ``classes`` entry (or ``config.classes``) when it has one."""
    if not isinstance(saved, dict):
        raise TypeError(f"expected a checkpoint, state dict or network description, got {type(saved).__name__}")
    if "arch" in saved and "channels" in saved:
        return dict(saved)
    if isinstance(saved.get("network"), dict):
        network = dict(saved["network"])
    else:
        state, _ = strip_prefixes(unwrap(saved, "the checkpoint")[0])
        extra = state.get("_extra_state")
        network = dict(extra["network"]) if isinstance(extra, dict) and isinstance(extra.get("network"), dict) else \
            legacy_network(state, arch="deeplabv2" if "backbone.conv1.weight" in state else "tiny")
    config = saved.get("config") if isinstance(saved.get("config"), dict) else {}
    table = saved.get("classes") if isinstance(saved.get("classes"), dict) else config.get("classes")
    if network is not None and isinstance(table, dict) and table.get("names") and "classes" not in network:
        network["classes"] = list(table["names"])
    return network


def check_network(saved, model: nn.Module, where: str, *, class_names=None) -> None:
    """Raise :class:`uda.network.NetworkMismatchError` naming both networks when ``saved`` (a checkpoint, state dict or
    description) was written for another network than ``model`` (with ``class_names``: its class table)."""
    network = saved_network(saved)
    if network is None:
        return
    own = network_config(model, class_names)
    differing = network_differences(network, own)
    if differing:
        raise mismatch_error(where, network, own, differing)


def resume_network(model: nn.Module, ckpt: dict, *, source_checkpoint: str | None = None,
                   class_names=None) -> str:
    """``--resume``: the checkpoint must be for the network this command builds; the line to log.

    The one exception is a run that started from ``--source-checkpoint``: its network came from that file (see
    :func:`load_source_weights`), so when the checkpoint records the same ``source_checkpoint`` its stride
    placement and input convention are taken. Any other difference raises, naming both networks.
    """
    network = saved_network(ckpt)
    if network is None:
        return "--resume: the checkpoint has no network description (nothing to check)"
    own = network_config(model, class_names)
    differing = network_differences(network, own)
    recorded = (ckpt.get("config") or {}).get("source_checkpoint") if isinstance(ckpt.get("config"), dict) else None
    if differing and set(differing) <= set(LAYOUT_FIELDS) and source_checkpoint and recorded == source_checkpoint:
        model.apply_network(network)
        return f"--resume: network as recorded (it came from --source-checkpoint {source_checkpoint}): " \
               f"{describe_network(model.network_config())}"
    if differing:
        raise mismatch_error("--resume", network, own, differing, hint=(
            "Resume with the options the run started with (--arch, --init, --init-layout, --features, --proj-dim, "
            "the class table)"))
    return f"--resume: network {describe_network(own)}"


def init_weights(model: DeepLabV2, path: str | Path, layout: str | None = None) -> str:
    """``--init``: load the backbone of ``path`` (a file, or what ``torch.load`` returned) into ``model``, switched
    in place to the file's layout (see the module doc; ``layout`` settles a bare backbone), and return the line to
    log: what was detected, the layout used, what was loaded and skipped. A classifier is never loaded."""
    found = read_weights(path, "--init")
    label = str(path) if isinstance(path, (str, Path)) else "--init"
    if found.kind == "mit":
        raise ValueError(f"expected {found.source} to hold ResNet-101 weights for a DeepLab-V2, got {found.text}: "
                         f"Mix Transformer weights initialise --arch {'/'.join(MIT_ARCHS)}")
    if found.kind == "pipeline" and (found.network or {}).get("arch", "deeplabv2") != "deeplabv2":
        raise ValueError(f"expected {found.source} to hold a DeepLab-V2 (a ResNet-101 backbone), got {found.text}")
    if found.kind == "pipeline" and found.network is None:
        raise ValueError(f"expected {found.source} to describe its network, got {found.text}")
    use = resolve_layout(found, layout, "--init")
    if found.kind == "pipeline":
        model.apply_network({k: found.network[k] for k in LAYOUT_FIELDS if k in found.network})
        n = load_backbone_state(model, found.backbone, None, source=label)
        skipped = ["classifier" + (" and projection" if any(k.startswith("projection.") for k in found.state)
                                   else "") + " (--init loads the backbone only)"]
    else:
        n = load_backbone_state(model, found.backbone, use, source=label)
        skipped = found.skipped[:]
        if found.head is not None:
            skipped = [s + " (--init loads the backbone only)" if s.startswith(found.head.name) else s for s in skipped]
    note = " (--init-layout deeplab over the fc's torchvision)" if found.kind == "torchvision" and use == "deeplab" \
        else ""
    return (f"init: {label}: detected {found.text} -> {LAYOUT_TEXT[use]}{note}; backbone {n} tensors loaded"
            + (f"; skipped: {', '.join(skipped)}" if skipped else ""))


def _load_peer(model: DeepLabV2, found: Found, option: str, peer_classifier: str | None) -> str:
    head = found.head
    if peer_classifier not in PEER_CLASSIFIERS:
        raise ValueError(f"expected --peer-classifier {{{','.join(PEER_CLASSIFIERS)}}} to load the classifier of "
                         f"{found.source} ({found.text}), got {peer_classifier!r}: {PEER_HINT}")
    if not head.complete:
        raise ValueError(f"expected {found.source}'s {head.name} to have four 3x3 ASPP branches with biases (the "
                         f"pipeline's head), got branches {sorted(head.weights)} with biases {sorted(head.biases)}")
    if head.num_classes != model.num_classes:
        raise NetworkMismatchError(f"expected {found.source} to classify the run's K={model.num_classes} classes, "
                                   f"got a K={head.num_classes} classifier ({found.text})")
    n = load_backbone_state(model, found.backbone, "deeplab", source=found.source)
    with torch.no_grad():
        for i, conv in enumerate(model.classifier.branches):
            if peer_classifier == "first-two" and i >= 2:
                conv.weight.zero_()
                conv.bias.zero_()
            else:
                conv.weight.copy_(head.weights[i])
                conv.bias.copy_(head.biases[i])
    rule = ("first-two: branches 0-1 loaded, 2-3 zeroed (AdaptSegNet's sum)" if peer_classifier == "first-two"
            else "all-branches: the four branches summed (DASS, protocl)")
    skipped = [s for s in found.skipped if not s.startswith(head.name)]
    if model.projection is not None:
        skipped.append("(the layer4 projection is new: the file has none)")
    return (f"{found.source}: detected {found.text} -> {LAYOUT_TEXT['deeplab']}; backbone {n} tensors and the "
            f"{head.name} ASPP classifier loaded ({rule})" + (f"; skipped: {', '.join(skipped)}" if skipped else ""))


def load_source_weights(model: nn.Module, source, *, option: str = "--source-checkpoint",
                        peer_classifier: str | None = None) -> tuple[nn.Module, str]:
    """``--source-checkpoint``: load a trained segmentation model into ``model``; ``(model, line to log)``.

    ``source`` is a path or what ``torch.load`` returned. A checkpoint of this pipeline loads whole: when its stride
    placement or input convention differ from ``model``'s (a source model trained from the DeepLab init, a second
    command without ``--init``), ``model`` is switched in place to the file's network (parameters keep their
    shapes, so an optimizer or a DDP wrapper stays valid); its architecture, features and K must be the run's.
    A peer's ``Res_Deeplab`` / ``DeeplabMulti`` state dict loads its backbone and its layer4 ASPP classifier
    (``peer_classifier`` required, K must match). A file without a segmentation classifier is refused.
    """
    try:
        found = read_weights(source, option)
    except UnknownWeightsError as error:
        arch = model.network_config().get("arch")
        raise UnknownWeightsError(f"expected {option} to match --arch {arch}: {error}") from None
    if found.kind == "pipeline":
        if found.network is None:
            raise ValueError(f"expected {found.source} to describe its network (or carry the older bgr flag), got "
                             f"{found.text}")
        own = network_config(model)
        differing = network_differences(found.network, own)
        choices = [k for k in differing if k not in LAYOUT_FIELDS]
        if choices:
            raise mismatch_error(found.source, found.network, own, choices, hint=(
                "The source model must have the run's --arch, --features, --proj-dim and class table"))
        if differing:
            model.apply_network(found.network)
        try:
            model.load_state_dict(found.state)
        except RuntimeError as error:
            raise ValueError(f"expected {found.source} to match the run's network: {error}") from None
        switched = (f"; the run's network was switched to the file's ({', '.join(differing)} differed: it was "
                    f"{describe_network(own)})" if differing else "")
        return model, f"{found.source}: {found.text}{switched}"
    if found.kind in ("res_deeplab", "deeplab_multi"):
        if not isinstance(model, DeepLabV2):
            raise ValueError(f"expected --arch deeplabv2 for {found.source} ({found.text}), got a "
                             f"{type(model).__name__}")
        return model, _load_peer(model, found, option, peer_classifier)
    raise ValueError(f"expected {found.source} to hold a segmentation model (this pipeline's checkpoint, a "
                     f"Res_Deeplab or DeeplabMulti state dict), got {found.text}: it has no segmentation "
                     "classifier; give it as --init")


def _blocks(backbone: dict[str, Tensor]) -> tuple[int, ...]:
    return tuple(1 + max((int(k.split(".")[1]) for k in backbone if k.startswith(f"layer{i}.")), default=-1)
                 for i in range(1, 5))


def build_model_for(source, *, option: str = "--checkpoint", peer_classifier: str | None = None
                    ) -> tuple[nn.Module, str]:
    """The network a weights file needs, with its weights loaded: ``(model, line to log)`` (for ``predict.py``).

    A checkpoint of this pipeline is rebuilt from its description (or, for an older one, from its keys, shapes and
    ``bgr`` flag); a peer's Res_Deeplab / DeeplabMulti becomes a DeepLab-V2 in the DeepLab layout with its K
    (``peer_classifier`` required). Anything else is a ``ValueError`` naming the file and what it holds.
    """
    found = read_weights(source, option)
    if found.kind in ("res_deeplab", "deeplab_multi"):
        model = DeepLabV2(found.head.num_classes, blocks=_blocks(found.backbone))
        return model, _load_peer(model, found, option, peer_classifier)
    if found.kind != "pipeline":
        raise ValueError(f"expected {found.source} to hold a segmentation model (this pipeline's checkpoint, a "
                         f"Res_Deeplab or DeeplabMulti state dict), got {found.text}: it has no segmentation "
                         "classifier")
    state, network = found.state, found.network or {}
    if "decode_head.conv_seg.weight" in state:  # DAFormer: the MiT size from the description, else from the shapes
        try:
            model = DAFormerNet.for_state(state, network)
        except ValueError as error:
            raise ValueError(f"{found.source}: {error}") from None
    elif "classifier.branches.0.weight" not in state:
        raise ValueError(f"expected {found.source} to hold the pipeline's network (classifier.branches.0.weight, "
                         f"decode_head.conv_seg.weight, ...), got keys like {sorted(state)[:5]}")
    elif "backbone.conv1.weight" not in state:
        width = state.get("backbone.0.0.weight")
        model = TinySegNet(int(state["classifier.branches.0.weight"].shape[0]),
                           **({"width": int(width.shape[0])} if width is not None else {}))
    else:
        proj = state.get("projection.weight")
        model = DeepLabV2(int(state["classifier.branches.0.weight"].shape[0]),
                          features="aspp" if proj is None else "layer4",
                          proj_dim=256 if proj is None else int(proj.shape[0]), blocks=_blocks(found.backbone))
    if network.get("classes"):
        model.class_names = tuple(network["classes"])
    if network:
        model.apply_network({k: network[k] for k in LAYOUT_FIELDS if k in network})
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"expected {found.source} to hold the pipeline's network: {error}") from None
    return model, f"{found.source}: {found.text}"


def init_mit(model: DAFormerNet, path) -> str:
    """``--init`` of a DAFormer network: SegFormer's ``mit_b*.pth`` or Hugging Face's ``nvidia/mit-b*`` weights
    (or the ``backbone.*`` of a run of the same arch) into ``model.backbone`` (:func:`uda.mit_weights.load_mit`:
    the ImageNet classifier is dropped and named); the line to log. Anything else, a MiT of another size included,
    is a ``ValueError`` naming what the file holds, raised before anything is loaded."""
    label = f"--init {str(path)!r}" if isinstance(path, (str, Path)) else "--init"
    want = f"{model.backbone.spec.text} weights (SegFormer's mit_b*.pth or Hugging Face's nvidia/mit-b*)"
    try:
        found = read_weights(path, "--init")
    except UnknownWeightsError as error:
        raise UnknownWeightsError(f"expected {label} to hold {want}, got none of the networks known here: "
                                  f"{error}") from None
    if found.kind == "pipeline" and (found.network or {}).get("arch", model.arch) == model.arch and any(
            k.startswith("backbone.patch_embed1.") for k in found.state):
        state, what = found.backbone, f"the backbone of {found.text}"
    elif found.kind != "mit":
        raise ValueError(f"expected {label} to hold {want}, got {found.text}")
    else:
        state, what = found.state, found.text
    try:
        line = load_mit(model.backbone, state)
    except ValueError as error:
        raise ValueError(f"expected {label} to fit --arch {model.arch}: {error}") from None
    return f"init: {label}: detected {what} -> {line} (the decoder starts from its random init)"


# ---------------------------------------------------------------------------------------------- building
def build_model(arch: str, num_classes: int, *, features: str = "aspp", proj_dim: int = 256,
                init: str | None = None, init_layout: str | None = None,
                class_names: tuple[str, ...] | None = None) -> nn.Module:
    """Build ``arch`` ("deeplabv2", "tiny" or "mit-b0" ... "mit-b5") and load ``init`` weights when given
    (:func:`uda.weights.init_weights`: the file's layout is detected from its structure; ``init_layout`` settles a
    bare backbone). A MiT arch is a :class:`uda.daformer_net.DAFormerNet` (its features are the decoder's fused
    256-d map: ``features`` "aspp", the default, with ``proj_dim`` 256; or ``features="projection"``, SePiCo's
    projection of the encoder's stages to ``proj_dim``); its ``init`` is SegFormer's
    ``mit_b*.pth`` or Hugging Face's ``nvidia/mit-b*`` of that size (:func:`init_mit`).

    ``model.init_message`` says what was loaded (or that nothing was): log it. ``class_names``, when given, go
    into the network description that every checkpoint carries.
    """
    if arch == "tiny":
        if init is not None:
            raise ValueError(f"expected no --init for arch 'tiny' (it trains from scratch), got {init!r}")
        model = TinySegNet(num_classes)
        model.init_message = "init: none (the tiny CNN trains from scratch; RGB input, ImageNet mean/std)"
    elif arch in MIT_ARCHS:
        if features not in ("aspp", "projection") or (features == "aspp" and proj_dim != 256):
            raise ValueError(f"expected the default --features aspp and --proj-dim 256 for --arch {arch} (its "
                             f"features are the DAFormer decoder's fused 256-d map; train_daformer.py's "
                             f"--contrast-features projection adds SePiCo's projection), got --features {features} "
                             f"--proj-dim {proj_dim}")
        if init_layout is not None:
            raise ValueError(f"expected no --init-layout for --arch {arch} (MiT files say their layout; "
                             f"--init-layout is for ResNet backbones), got {init_layout!r}")
        model = (DAFormerNet(arch, num_classes, features="projection", proj_dim=proj_dim) if features == "projection"
                 else DAFormerNet(arch, num_classes))
        model.init_message = (init_mit(model, init) if init is not None else
                              f"init: none (random {model.backbone.spec.text} and DAFormer decoder; RGB input, "
                              "ImageNet mean/std)")
    elif arch != "deeplabv2":
        raise ValueError(f"expected arch 'deeplabv2', 'tiny' or {', '.join(map(repr, MIT_ARCHS))}, got {arch!r}")
    else:
        model = DeepLabV2(num_classes, features=features, proj_dim=proj_dim)
        if init is None:
            model.init_message = f"init: none (random weights; {LAYOUT_TEXT['torchvision']})"
        else:
            model.init_message = init_weights(model, init, layout=init_layout)
    if class_names is not None:
        if len(class_names) != num_classes:
            raise ValueError(f"expected {num_classes} class names, got {len(class_names)}")
        model.class_names = tuple(str(n) for n in class_names)
    return model


def read_init(path: str | Path, layout: str | None = None) -> tuple[dict[str, Tensor], str]:
    """``(backbone state, layout)`` of an initial-weights file: :func:`uda.weights.read_weights` (the layout is
    detected from the file's structure; ``layout`` settles what the structure leaves open)."""
    found = read_weights(path, "--init")
    return found.backbone, resolve_layout(found, layout, "--init")


def load_backbone(model: DeepLabV2, state: dict[str, Tensor], layout: str, *, source: str = "init") -> None:
    """Switch ``model`` to ``layout`` and load backbone weights (head keys ``fc.*``, ``layer5.*``, ``layer6.*`` are
    skipped); ``ValueError`` naming missing, unexpected or mis-shaped keys."""
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "layer5.", "layer6."))}
    load_backbone_state(model, state, layout, source=source)
