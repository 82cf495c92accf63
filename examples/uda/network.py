r"""The description of a network that a checkpoint carries beside its weights (style rule 21).

What changes the computation without changing a parameter's shape: the stride placement in the ResNet's first
block of each stage (``"3x3"`` torchvision, ``"1x1"`` the DeepLab/caffe layout), the input channel order and
mean/std, the contrast-feature choice, K and the class names (for :class:`uda.daformer_net.DAFormerNet`: the MiT
size, the decoder, D). :class:`uda.model.DeepLabV2`, ``TinySegNet`` and ``DAFormerNet`` describe themselves
(``network_config()``), save the description as the state dict's ``_extra_state`` and refuse a state dict
written for another network (:class:`NetworkMismatchError`, naming both); :mod:`uda.weights` checks it wherever
weights are loaded. :func:`legacy_network` infers the description of a checkpoint written
before descriptions were saved.
"""

from __future__ import annotations

import torch
from torch import Tensor


IMAGENET_MEAN_RGB = (123.675, 116.28, 103.53)  # torchvision weights: (x / 255 - mean) / std
IMAGENET_STD_RGB = (58.395, 57.12, 57.375)
CAFFE_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)  # DeepLab init weights: BGR, mean only

# the two ResNet layouts: where a stage's stride sits and the input the weights were trained on
LAYOUTS = {
    "torchvision": {"stride": "3x3", "channels": "rgb", "mean": IMAGENET_MEAN_RGB, "std": IMAGENET_STD_RGB},
    "deeplab": {"stride": "1x1", "channels": "bgr", "mean": CAFFE_MEAN_BGR, "std": (1.0, 1.0, 1.0)},
}
LAYOUT_TEXT = {"torchvision": "torchvision layout (stride on the 3x3 conv2, RGB input, ImageNet mean/std)",
               "deeplab": "DeepLab layout (stride on the 1x1 conv1, BGR input, caffe mean, std 1)"}
NETWORK_VERSION = 1
# what a network description holds that changes the computation (compared on every load)
_COMPARED = ("arch", "blocks", "width", "decoder", "stride", "channels", "mean", "std", "features", "proj_dim",
             "feature_dim", "num_classes", "classes")


class NetworkMismatchError(ValueError):
    """Weights written for one network given to another (stride placement, input convention, features, K, ...)."""


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= 1e-4 * max(1.0, abs(b))
    return a == b


def network_differences(saved: dict, own: dict) -> list[str]:
    """The fields of :data:`_COMPARED` that both descriptions hold and that differ."""
    return [key for key in _COMPARED if key in saved and key in own and saved[key] is not None
            and own[key] is not None and not _same(saved[key], own[key])]


def layout_of(network: dict) -> str | None:
    """The named layout ("torchvision" / "deeplab") whose stride and input convention ``network`` has, else None."""
    for name, spec in LAYOUTS.items():
        if network.get("stride") == spec["stride"] and all(
                _same(network.get(k), spec[k]) for k in ("channels", "mean", "std")):
            return name
    return None


def describe_network(network: dict) -> str:
    """One line naming what a network description says (for logs and errors)."""
    def nums(values) -> str:
        return "(" + ", ".join(f"{v:g}" for v in values) + ")" if values is not None else "?"

    if network.get("arch") == "tiny":
        head = "tiny CNN"
    elif network.get("arch") == "deeplabv2":
        blocks = network.get("blocks")
        head = "DeepLab-V2 ResNet" + (f"-{3 * sum(blocks) + 2}" if blocks else "")
    elif str(network.get("arch", "")).startswith("mit-"):
        head = f"MiT-{network['arch'][4:].upper()} + {network.get('decoder', '?')} decoder (DAFormer)"
    else:
        head = f"network {network.get('arch', '?')!r}"
    parts = []
    if "stride" in network:
        parts.append(f"stride on the {'1x1 conv1' if network['stride'] == '1x1' else '3x3 conv2'}")
    if "channels" in network:
        parts.append(f"{network['channels'].upper()} input, mean {nums(network.get('mean'))}, "
                     f"std {nums(network.get('std'))}")
    if network.get("features"):
        dim = network.get("proj_dim") if network["features"] == "layer4" else network.get("feature_dim")
        parts.append(f"{network['features']} features" + (f" (D={dim})" if dim is not None else ""))
    if network.get("num_classes") is not None:
        parts.append(f"K={network['num_classes']}")
    if network.get("classes"):
        names = list(network["classes"])
        parts.append("classes " + ", ".join(names[:4]) + (", ..." if len(names) > 4 else ""))
    if network.get("inferred"):
        parts.append(f"inferred from {network['inferred']}")
    layout = layout_of(network) if "stride" in network else None
    return f"{head}" + (f" [{layout} layout]" if layout else "") + (f" ({'; '.join(parts)})" if parts else "")


def mismatch_error(where: str, saved: dict, own: dict, differing: list[str], *, hint: str = "") -> NetworkMismatchError:
    return NetworkMismatchError(
        f"expected {where} to hold weights for this network, got weights for another (differing: "
        f"{', '.join(differing)}): the file's network is {describe_network(saved)}; this model is "
        f"{describe_network(own)}" + (f". {hint}" if hint else ""))


def legacy_network(state: dict, prefix: str = "", *, arch: str | None = None) -> dict | None:
    """The description an older checkpoint (no ``network`` entry) implies, from its ``bgr`` flag and buffers.

    Until descriptions were saved, the pipeline built the stride on the 1x1 conv (DeepLab init layout) exactly when
    it switched to BGR input, so ``bgr`` settles the stride placement too. None when the state holds neither a
    ``bgr`` flag nor the normalisation buffers (nothing to infer from).
    """
    extra = state.get(prefix + "_extra_state")
    bgr = extra.get("bgr") if isinstance(extra, dict) else None
    if bgr is None and prefix + "bgr" in state:
        bgr = bool(torch.as_tensor(state[prefix + "bgr"]).reshape(-1)[0])
    mean, std = state.get(prefix + "pixel_mean"), state.get(prefix + "pixel_std")
    if bgr is None and std is None:
        return None
    if bgr is None:  # before the bgr flag: std 1 was the DeepLab (caffe) normalisation
        bgr = bool(torch.all(torch.as_tensor(std) == 1))
    network = {"channels": "bgr" if bgr else "rgb", "inferred": "an older checkpoint's bgr flag"}
    if isinstance(mean, Tensor) and isinstance(std, Tensor):
        network["mean"], network["std"] = mean.reshape(-1).tolist(), std.reshape(-1).tolist()
    if arch != "tiny" and prefix + "backbone.conv1.weight" in state:
        network["stride"] = "1x1" if bgr else "3x3"
    return network
