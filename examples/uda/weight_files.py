r"""What a weights file is, told from its structure: the reading half of :mod:`uda.weights` (style rule 21).

A file is recognised from its structure, never from a key prefix. After unwrapping ``{'state_dict': ...}``
(and the pipeline's own ``{'model': ...}``) and stripping any prefix every key shares (``module.`` of
``nn.DataParallel``, ``Scale.`` of the DeepLab init's ``MS_Deeplab`` wrapper), :func:`read_weights` tells apart:

=================  ==========================================================  ================================
kind               structure                                                   becomes
=================  ==========================================================  ================================
``torchvision``    ResNet + ``fc`` (the ImageNet classifier)                   backbone, torchvision layout
``res_deeplab``    ResNet + ``layer5.conv2d_list.{0..3}`` on 2048 channels     backbone, DeepLab layout; the
                   (AdaptSegNet/DASS ``Res_Deeplab``; the DeepLab init file)   ASPP head when asked
``deeplab_multi``  ResNet + ``layer5`` on 1024 (layer3 head) + ``layer6`` on   as ``res_deeplab``, with
                   2048 channels (AdaptSegNet ``DeeplabMulti``)                ``layer6`` as the head
``backbone``       ResNet only: torchvision and caffe backbones have the       refused unless ``--init-layout``
                   same keys and shapes                                        says which
``pipeline``       ``backbone.*`` / ``classifier.*`` (this pipeline's files)   the network its description says
``mit``            a Mix Transformer: SegFormer's ``mit_b*.pth`` or Hugging    the encoder of ``--arch mit-b*``
                   Face's ``nvidia/mit-b*`` (:mod:`uda.mit_weights`)           (refused by a ResNet)
=================  ==========================================================  ================================

The DeepLab layout is the one of the field's ``Res_Deeplab`` code: stride on each stage's first 1x1 conv, BGR
input minus the caffe mean, no std (AdaptSegNet's and DASS's input pipeline). Anything else is refused with
what it is: ProDA's DeepLab-V2 (its ``Classifier_Module2`` head: ``layer5.conv2d_list.N.0``, ``layer5.bottleneck``,
``layer5.head``; ``{'ResNet101': {'model_state': ...}}``), an unknown module, a DeeplabMulti without its layer4
head.

A trap no key shows: AdaptSegNet's ``Classifier_Module.forward`` returns inside its loop, so the classifiers it
trained sum only ASPP branches 0 and 1 (branches 2 and 3 stay at their random init), while DASS's and this
pipeline's sum all four. The file cannot tell which code trained it, so a peer's classifier is loaded only with
``peer_classifier`` (``--peer-classifier``): ``"all-branches"`` (DASS, protocl) loads the four branches;
``"first-two"`` (AdaptSegNet) loads branches 0-1 and zeroes the weights and biases of branches 2-3, so the
four-branch head computes exactly the two-branch sum (and branches 2-3 train from zero if training goes on).

The entry points that load what is read here into a network are :mod:`uda.weights`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from . import checkpoint
from .mit_weights import describe_mit
from .model import DeepLabV2
from .network import (
    LAYOUT_TEXT,
    describe_network,
    layout_of,
    legacy_network,
)

INIT_LAYOUTS = ("torchvision", "deeplab")
PEER_CLASSIFIERS = ("all-branches", "first-two")
# what a layout decides (the rest of a description is the run's choice: arch, features, K, classes)
LAYOUT_FIELDS = ("stride", "channels", "mean", "std")
_RESNET = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
_KNOWN_TOP = set(_RESNET) | {"layer5", "layer6", "fc", "backbone", "classifier", "projection", "pixel_mean",
                             "pixel_std", "bgr", "_extra_state"}
PEER_HINT = ("AdaptSegNet's Classifier_Module returns inside its loop, so classifiers it trained sum only ASPP "
              "branches 0-1, while DASS's and protocl's sum all four; the file cannot tell which code trained it")


class UnknownWeightsError(ValueError):
    """A file whose structure is none of the networks :func:`read_weights` knows."""


@dataclass
class Head:
    """An ASPP classifier of the field (``conv2d_list.{i}.weight/bias``)."""

    name: str
    weights: dict[int, Tensor]
    biases: dict[int, Tensor]

    @property
    def in_channels(self) -> int:
        return int(next(iter(self.weights.values())).shape[1])

    @property
    def num_classes(self) -> int:
        return int(next(iter(self.weights.values())).shape[0])

    @property
    def complete(self) -> bool:
        """Four 3x3 branches, each with its bias: what the pipeline's ASPP head has."""
        return (sorted(self.weights) == [0, 1, 2, 3] and sorted(self.biases) == [0, 1, 2, 3]
                and all(tuple(w.shape[2:]) == (3, 3) for w in self.weights.values()))


@dataclass
class Found:
    """What :func:`read_weights` recognised in a file."""

    source: str  # "--init 'path'" or the like
    kind: str  # torchvision | res_deeplab | deeplab_multi | backbone | pipeline | mit
    state: dict[str, Tensor]  # unwrapped, prefixes stripped
    backbone: dict[str, Tensor]  # ResNet keys (conv1.weight, layer1.0.conv1.weight, ...), no num_batches_tracked
    head: Head | None = None  # the layer4 ASPP classifier of a peer file
    network: dict | None = None  # pipeline: the saved (or inferred) description
    wrappers: list[str] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # what a backbone load leaves out
    fc_classes: int | None = None
    mit: str | None = None  # a MiT file: what it holds (uda.mit_weights.describe_mit)

    @property
    def text(self) -> str:
        if self.kind == "torchvision":
            what = f"torchvision ResNet (fc ImageNet classifier, {self.fc_classes} classes)"
        elif self.kind == "res_deeplab":
            what = ("DeepLab init layout (Scale. prefix), " if "Scale." in self.prefixes else "") + (
                f"Res_Deeplab (AdaptSegNet/DASS: layer5 = ASPP classifier on layer4, K={self.head.num_classes})")
        elif self.kind == "deeplab_multi":
            what = (f"DeeplabMulti (AdaptSegNet: layer5 = ASPP on layer3, layer6 = ASPP on layer4, "
                    f"K={self.head.num_classes})")
        elif self.kind == "backbone":
            what = "a bare ResNet backbone (no fc, no layer5 classifier)"
        elif self.kind == "mit":
            what = self.mit
        else:
            what = "a checkpoint of this pipeline: " + (describe_network(self.network) if self.network
                                                         else "no network description")
        extra = [f"in {{'{w}': ...}}" for w in self.wrappers] + [f"prefix {p!r} stripped" for p in self.prefixes]
        return what + (f" [{', '.join(extra)}]" if extra else "")


# ------------------------------------------------------------------------------------------------- reading
def _is_state(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(v, Tensor) or str(k).endswith("_extra_state") for k, v in obj.items())


def unwrap(obj, where: str) -> tuple[dict, list[str]]:
    wrappers = []
    while isinstance(obj, dict) and not _is_state(obj):
        if isinstance(obj.get("ResNet101"), dict):  # a file of another network family, not a wrong type
            raise ValueError(  # noqa: TRY004
                f"expected {where} to hold a DeepLab-V2 state dict, got a ProDA checkpoint "
                "({'ResNet101': {'model_state': ...}}): ProDA's DeepLab-V2 is another network family (its "
                "Classifier_Module2 head: 1x1 + four dilated 3x3 convolutions of 256 channels with GroupNorm, an SE "
                "bottleneck and a 1x1 classifier), which this pipeline does not build")
        for key in ("state_dict", "model", "model_state"):
            if isinstance(obj.get(key), dict):
                wrappers.append(key)
                obj = obj[key]
                break
        else:
            raise ValueError(f"expected {where} to hold {{'model': state_dict}} (a checkpoint of this pipeline), a "
                             f"state dict (name -> tensor) or one in {{'state_dict': ...}}, got a dict with keys "
                             f"{sorted(map(str, obj))[:8]}")
    if not _is_state(obj):
        raise ValueError(f"expected {where} to hold {{'model': state_dict}} (a checkpoint of this pipeline) or a "
                         f"state dict (name -> tensor), got {type(obj).__name__}"
                         + (" (empty)" if isinstance(obj, dict) else ""))
    return dict(obj), wrappers


def strip_prefixes(state: dict) -> tuple[dict, list[str]]:
    prefixes = []
    while all("." in k for k in state):
        heads = {k.split(".", 1)[0] for k in state}
        if len(heads) != 1 or next(iter(heads)) in _KNOWN_TOP:
            break
        prefix = next(iter(heads)) + "."
        state = {k[len(prefix):]: v for k, v in state.items()}
        prefixes.append(prefix)
    return state, prefixes


def _head(state: dict, name: str, where: str) -> Head | None:
    sub = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
    if not sub:
        return None
    weights, biases, other = {}, {}, []
    for key, value in sub.items():
        match = re.fullmatch(r"conv2d_list\.(\d+)\.(weight|bias)", key)
        if match is None:
            other.append(f"{name}.{key}")
        else:
            (weights if match.group(2) == "weight" else biases)[int(match.group(1))] = value
    if other or not weights or any(w.ndim != 4 for w in weights.values()):
        raise ValueError(f"expected {where}'s {name} to be a DeepLab-V2 ASPP classifier (conv2d_list.N.weight/bias), "
                         f"got {sorted(other)[:5] or 'no 4-d weights'}: another network family")
    shapes = {tuple(w.shape[:2]) for w in weights.values()}
    if len(shapes) != 1:
        raise ValueError(f"expected the branches of {where}'s {name} to share one shape, got {sorted(shapes)}")
    return Head(name, weights, biases)


def read_weights(source, option: str = "--init") -> Found:
    """Recognise a weights file (a path, or what ``torch.load`` returned) from its structure: see the module doc.

    ``ValueError`` naming ``option`` and the file for a file that is no state dict, a network of another family
    (ProDA, unknown modules) or an inconsistent DeepLab head.
    """
    if isinstance(source, (str, Path)):
        where = f"{option} {str(source)!r}"
        obj = checkpoint.load(source, option)  # weights_only=True; a refused or unreadable file is a ValueError
    else:
        where, obj = option, source
    state, wrappers = unwrap(obj, where)
    state, prefixes = strip_prefixes(state)
    keys = set(state)
    mit = describe_mit(state)  # before the pipeline's keys: Hugging Face's MiT files have a classifier.*
    if mit is not None:
        return Found(where, "mit", state, state, wrappers=wrappers, prefixes=prefixes, mit=mit)
    if any(k.startswith(("backbone.", "classifier.")) for k in keys):
        backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        extra = state.get("_extra_state")
        network = extra["network"] if isinstance(extra, dict) and isinstance(extra.get("network"), dict) else (
            legacy_network(state, arch="deeplabv2" if "backbone.conv1.weight" in keys else "tiny"))
        return Found(where, "pipeline", state, backbone, network=network, wrappers=wrappers, prefixes=prefixes)
    proda = sorted(k for k in keys if re.match(r"layer5\.(bottleneck|head)\.|layer5\.conv2d_list\.\d+\.\d+\.", k))
    if proda:
        raise ValueError(f"expected {where} to be a DeepLab-V2 of the AdaptSegNet family, got ProDA's DeepLab-V2 "
                         f"(its Classifier_Module2 head: {proda[:3]}): another network family, which this pipeline "
                         "does not build")
    if "conv1.weight" not in keys:
        raise UnknownWeightsError(
            f"expected {where} in torchvision ResNet-101 layout (conv1.weight, layer1.0.conv1.weight, ...), DeepLab "
            f"init layout (Scale.conv1.weight, ...), an AdaptSegNet/DASS Res_Deeplab or DeeplabMulti state dict or a "
            f"checkpoint of this pipeline, got keys like {sorted(keys)[:5]}")
    unknown = sorted({k.split(".", 1)[0] for k in keys} - set(_RESNET) - {"layer5", "layer6", "fc"})
    if unknown:
        raise UnknownWeightsError(f"expected {where} to hold a ResNet-101 (with an fc or a DeepLab-V2 ASPP head), got other "
                         f"modules too: {unknown} (another network family?)")
    backbone = {k: v for k, v in state.items()
                if k.split(".", 1)[0] in _RESNET and not k.endswith("num_batches_tracked")}
    layer5, layer6 = _head(state, "layer5", where), _head(state, "layer6", where)
    has_fc = any(k.startswith("fc.") for k in keys)
    found = Found(where, "backbone", state, backbone, wrappers=wrappers, prefixes=prefixes)
    if has_fc and (layer5 or layer6):
        raise ValueError(f"expected {where} to have either an fc (torchvision) or a DeepLab ASPP head, got both")
    if layer6 is not None:
        if layer5 is None or layer5.in_channels != 1024 or layer6.in_channels != 2048:
            raise ValueError(f"expected {where}'s layer6 to be DeeplabMulti's layer4 head (2048 channels in) next to "
                             f"its layer3 head layer5 (1024 in), got layer5 "
                             f"{'absent' if layer5 is None else f'on {layer5.in_channels}'}, layer6 on "
                             f"{layer6.in_channels} channels")
        found.kind, found.head = "deeplab_multi", layer6
        found.skipped = [f"layer5 (DeeplabMulti's layer3 head, K={layer5.num_classes})",
                         f"layer6 (the layer4 ASPP head, K={layer6.num_classes})"]
    elif layer5 is not None:
        if layer5.in_channels != 2048:
            raise ValueError(f"expected {where}'s layer5 to be an ASPP classifier on layer4 (2048 channels in), got "
                             f"{layer5.in_channels} channels in and no layer6 (a DeeplabMulti without its layer4 "
                             "head?)")
        found.kind, found.head = "res_deeplab", layer5
        found.skipped = [f"layer5 (the ASPP classifier, K={layer5.num_classes})"]
    elif has_fc:
        found.kind = "torchvision"
        found.fc_classes = int(state["fc.weight"].shape[0]) if "fc.weight" in state else None
        found.skipped = [f"fc (the ImageNet classifier, {found.fc_classes} classes)"]
    return found


def resolve_layout(found: Found, layout: str | None, option: str = "--init") -> str:
    """The layout to load ``found``'s backbone in: the one its structure implies, or ``layout`` (``--init-layout``)
    where the structure leaves it open; ``ValueError`` when neither decides or they contradict each other."""
    if layout is not None and layout not in INIT_LAYOUTS:
        raise ValueError(f"expected --init-layout 'torchvision' or 'deeplab', got {layout!r}")
    if found.kind in ("res_deeplab", "deeplab_multi"):
        if layout == "torchvision":
            raise ValueError(f"expected {found.source} in the --init-layout torchvision given, got {found.text}: that "
                             f"code builds the {LAYOUT_TEXT['deeplab']}; drop --init-layout")
        return "deeplab"
    if found.kind == "torchvision":
        return layout or "torchvision"  # a caffe-converted ImageNet ResNet with an fc: --init-layout deeplab
    if found.kind == "pipeline":
        implied = layout_of(found.network) if found.network else None
        if implied is None or (layout is not None and layout != implied):
            raise ValueError(f"expected {found.source} to be in the --init-layout given ({layout}), got "
                             f"{found.text}" if implied else
                             f"expected {found.source} to say its layout, got {found.text}; give --init-layout")
        return implied
    if layout is None:
        raise ValueError(
            f"expected --init-layout {{torchvision,deeplab}} for {found.source}: it holds {found.text}, and a "
            f"torchvision backbone and a caffe/DeepLab one have the same keys and shapes. torchvision: "
            f"{LAYOUT_TEXT['torchvision']}; deeplab: {LAYOUT_TEXT['deeplab']} (AdaptSegNet/DASS backbones)")
    return layout


def load_backbone_state(model: DeepLabV2, state: dict[str, Tensor], layout: str | None, *,
                        source: str = "init") -> int:
    """Switch ``model`` to ``layout`` (None: keep it) and load ``state`` into its backbone; the number of tensors
    loaded. ``ValueError`` naming missing, unexpected or mis-shaped keys (nothing is changed then)."""
    if not isinstance(model, DeepLabV2):
        raise TypeError(f"expected a DeepLabV2 to load ResNet weights into, got {type(model).__name__}")
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    own = model.backbone.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mis_shaped = sorted(f"{k}: expected {tuple(own[k].shape)}, got {tuple(state[k].shape)}"
                        for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mis_shaped:
        raise ValueError(
            f"expected {source!r} ({layout or model.layout} layout) to match the ResNet-{3 * sum(model.blocks) + 2} "
            f"backbone; missing keys ({len(missing)}): {missing[:10]}; unexpected keys ({len(unexpected)}): "
            f"{unexpected[:10]}; shape mismatches ({len(mis_shaped)}): {mis_shaped[:5]}")
    if layout is not None:
        model.set_layout(layout)
    model.backbone.load_state_dict(state)
    return len(state)
