r"""Mix Transformer weights in the two public layouts, told apart and checked by their structure.

After unwrapping ``{'state_dict': ...}`` (or ``{'model': ...}``) and removing any prefix every key shares
(``module.`` of ``nn.DataParallel``, say), the layout is one of:

- ``segformer`` -- SegFormer's ``mit_b*.pth`` (and DAFormer's copies): ``patch_embed{s}.{proj,norm}``,
  ``block{s}.{i}.{norm1,attn.{q,kv,sr,norm,proj},norm2,mlp.{fc1,dwconv.dwconv,fc2}}``, ``norm{s}`` for stages
  ``s`` = 1..4; ``head.*`` is the ImageNet classifier.
- ``huggingface`` -- ``nvidia/mit-b*`` (the file ``save_pretrained`` writes, ``segformer.`` prefix optional):
  ``encoder.patch_embeddings.{s-1}.{proj,layer_norm}``, ``encoder.block.{s-1}.{i}.{layer_norm_1,
  attention.self.{query,key,value,sr,layer_norm},attention.output.dense,layer_norm_2,mlp.{dense1,dwconv.dwconv,
  dense2}}``, ``encoder.layer_norm.{s-1}``, ``classifier.*``; or the module names of transformers >= 5
  (``stages.{s-1}.patch_embeddings``, ``stages.{s-1}.blocks.{i}.attention.{q,k,v,o}_proj``,
  ``attention.sequence_reduction.{sequence_reduction,layer_norm}``, ``layernorm_{before,after}``,
  ``mlp.{fc1,fc2}``, ``stages.{s-1}.layer_norm``).

The variant comes from the tensors, never from a name: embed dims from the patch-embedding convolutions, depths
from the number of blocks per stage (B1-B5 share their dims and differ in depths); spatial-reduction kernels and
Mix-FFN widths are checked too. :func:`convert_huggingface` maps the Hugging Face layout to SegFormer's names
(Hugging Face splits the key/value projection into ``key`` and ``value``; SegFormer's ``kv`` is the two stacked,
keys first). :func:`load_mit` loads either into :class:`uda.mit.MixVisionTransformer`, drops the classifier and
says so, and refuses weights of another MiT size or another network, naming what the file holds;
:func:`describe_mit` says what a file holds, or None for a file that is no MiT.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from .mit import MIT_VARIANTS, MiTSpec, MixVisionTransformer, structure_text

_HF = r"(?:segformer\.)?"  # SegformerForImageClassification's files prefix the encoder, not the classifier
_HUB = re.compile(_HF + r"encoder\.(?:patch_embeddings|block|layer_norm)\.\d")
_HF5 = re.compile(_HF + r"stages\.\d+\.(?:patch_embeddings|blocks|layer_norm)\.")
_SEGFORMER = re.compile(r"(?:patch_embed[1-4]|block[1-4]|norm[1-4])\.")

# Hugging Face names inside one block (both generations) -> SegFormer's; "key"/"value" are merged into attn.kv
_BLOCK_NAMES = {
    "layer_norm_1": "norm1", "layernorm_before": "norm1",
    "attention.self.query": "attn.q", "attention.q_proj": "attn.q",
    "attention.self.key": "attn.k", "attention.k_proj": "attn.k",
    "attention.self.value": "attn.v", "attention.v_proj": "attn.v",
    "attention.self.sr": "attn.sr", "attention.sequence_reduction.sequence_reduction": "attn.sr",
    "attention.self.layer_norm": "attn.norm", "attention.sequence_reduction.layer_norm": "attn.norm",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "layer_norm_2": "norm2", "layernorm_after": "norm2",
    "mlp.dense1": "mlp.fc1", "mlp.fc1": "mlp.fc1",
    "mlp.dwconv.dwconv": "mlp.dwconv.dwconv",
    "mlp.dense2": "mlp.fc2", "mlp.fc2": "mlp.fc2",
}
# Hugging Face key -> what it is; groups: stage (0-based, Hub or transformers >= 5 form), [block, module], param
_PATTERNS = [
    (re.compile(_HF + r"(?:encoder\.patch_embeddings\.(\d+)|stages\.(\d+)\.patch_embeddings)\.(proj|layer_norm)"
                r"\.(\w+)"), "patch_embed"),
    (re.compile(_HF + r"(?:encoder\.block\.(\d+)|stages\.(\d+)\.blocks)\.(\d+)\.(.+)\.(\w+)"), "block"),
    (re.compile(_HF + r"(?:encoder\.layer_norm\.(\d+)|stages\.(\d+)\.layer_norm)\.(\w+)"), "norm"),
    (re.compile(r"classifier\.(\w+)"), "head"),
]


def _is_state(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(v, Tensor) or str(k).endswith("_extra_state") for k, v in obj.items())


def _unwrap(obj) -> tuple[dict[str, Tensor], list[str]]:
    notes = []
    while isinstance(obj, dict) and not _is_state(obj):
        key = next((k for k in ("state_dict", "model") if isinstance(obj.get(k), dict)), None)
        if key is None:
            raise ValueError(f"expected a MiT state dict (name -> tensor), plain or in {{'state_dict': ...}}, got "
                             f"{'an empty dict' if not obj else f'a dict with keys {sorted(map(str, obj))[:8]}'}")
        notes.append(f"in {{'{key}': ...}}")
        obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"expected a MiT state dict (name -> tensor), got {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}, notes


def _layout(state: dict[str, Tensor]) -> str | None:
    if "patch_embed1.proj.weight" in state and any(_SEGFORMER.match(k) for k in state):
        return "segformer"
    if any(_HUB.match(k) or _HF5.match(k) for k in state):
        return "huggingface"
    return None


def _what_else(state: dict[str, Tensor]) -> str:
    """What a state dict that is no MiT holds, in words."""
    keys = set(state)
    tops = sorted({k.split(".", 1)[0] for k in keys})
    if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
        return "a DeepLab/ResNet state dict (conv1/layer1...)"
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    if backbone and len(tops) > 1:
        inner = "a MiT" if _layout(backbone) else _what_else(backbone)
        hint = ": pass only its backbone.* entries, prefix removed" if _layout(backbone) else ""
        return f"a whole segmentation network (top-level keys {tops[:6]}) whose backbone.* is {inner}{hint}"
    return f"an unknown network (top-level keys {tops[:8]})"


def _read(obj) -> tuple[str, dict[str, Tensor], list[str]]:
    """(layout, state dict with the shared prefix removed, notes): a ValueError for anything but a MiT."""
    state, notes = _unwrap(obj)
    while _layout(state) is None and all("." in k for k in state) and len({k.split(".", 1)[0] for k in state}) == 1:
        prefix = next(iter(state)).split(".", 1)[0] + "."
        state = {k[len(prefix):]: v for k, v in state.items()}
        notes.append(f"prefix {prefix!r} removed")
    layout = _layout(state)
    if layout is None:
        raise ValueError(f"expected Mix Transformer (MiT) weights, got {_what_else(state)}")
    return layout, state, notes


def convert_huggingface(state_dict) -> dict[str, Tensor]:
    """Hugging Face's layout (``nvidia/mit-b*`` files with or without the ``segformer.`` prefix, or a
    transformers >= 5 state dict) in SegFormer's names; ``key``/``value`` concatenated into ``kv`` (keys first);
    ``classifier.*`` becomes ``head.*``. A SegFormer-layout dict comes back as it is (prefix removed).
    A key that maps to nothing raises: nothing is dropped silently."""
    layout, state, _ = _read(state_dict)
    if layout == "segformer":
        return state
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        for pattern, kind in _PATTERNS:
            m = pattern.fullmatch(key)
            if m is None:
                continue
            groups = m.groups()
            if kind == "head":
                out[f"head.{groups[0]}"] = value
                break
            stage = int(groups[0] if groups[0] is not None else groups[1]) + 1
            if kind == "patch_embed":
                out[f"patch_embed{stage}.{'proj' if groups[2] == 'proj' else 'norm'}.{groups[3]}"] = value
            elif kind == "norm":
                out[f"norm{stage}.{groups[2]}"] = value
            elif groups[3] in _BLOCK_NAMES:
                out[f"block{stage}.{groups[2]}.{_BLOCK_NAMES[groups[3]]}.{groups[4]}"] = value
            else:
                continue
            break
        else:
            raise ValueError(f"expected Hugging Face SegFormer encoder keys, got {key!r}, which maps to no "
                             "SegFormer parameter")
    for key in [k for k in out if ".attn.k." in k]:
        value_key = key.replace(".attn.k.", ".attn.v.")
        if value_key not in out:
            raise ValueError(f"expected a value projection next to {key!r}, found none")
        out[key.replace(".attn.k.", ".attn.kv.")] = torch.cat([out.pop(key), out.pop(value_key)], dim=0)
    if any(".attn.v." in k for k in out):
        raise ValueError(f"expected a key projection next to each value projection, got {sorted(out)[:4]}")
    return out


def _structure(state: dict[str, Tensor]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(dims, depths, sr ratios, MLP ratios) of a SegFormer-layout state dict, read from the tensors."""
    dims, depths, srs, mlps = [], [], [], []
    for s in range(1, 5):
        proj = state.get(f"patch_embed{s}.proj.weight")
        if proj is None or proj.ndim != 4:
            raise ValueError(f"expected Mix Transformer weights with 4 stages, got no 4-d patch_embed{s}.proj.weight")
        dims.append(int(proj.shape[0]))
        blocks = {int(k.split(".")[1]) for k in state if k.startswith(f"block{s}.")}
        if blocks != set(range(len(blocks))) or not blocks:
            raise ValueError(f"expected blocks 0..n-1 in stage {s}, got {sorted(blocks)}")
        depths.append(len(blocks))
        sr = state.get(f"block{s}.0.attn.sr.weight")
        srs.append(1 if sr is None else int(sr.shape[-1]))
        fc1 = state.get(f"block{s}.0.mlp.fc1.weight")
        mlps.append(0 if fc1 is None else int(fc1.shape[0]) // dims[-1])
    return tuple(dims), tuple(depths), tuple(srs), tuple(mlps)


def _variant(structure) -> MiTSpec | None:
    dims, depths, srs, mlps = structure
    return next((spec for spec in MIT_VARIANTS.values() if (spec.dims, spec.depths, spec.sr_ratios)
                 == (dims, depths, srs) and set(mlps) == {spec.mlp_ratio}), None)


def _describe(structure) -> str:
    spec = _variant(structure)
    if spec is not None:
        return spec.text
    dims, depths, srs, mlps = structure
    return (f"a Mix Transformer of no released size ({structure_text(depths, dims)}, sr ratios {srs}, "
            f"MLP ratios {mlps})")


def detect_mit_layout(state_dict) -> tuple[str, str]:
    """``(layout, variant)``, e.g. ``("huggingface", "mit-b0")``, from the structure of ``state_dict`` (plain or in
    ``{'state_dict': ...}``): see the module doc. ValueError for another network or a MiT of no released size."""
    layout, state, _ = _read(state_dict)
    structure = _structure(state if layout == "segformer" else convert_huggingface(state))
    spec = _variant(structure)
    if spec is None:
        raise ValueError(f"expected MiT-B0...B5 weights, got {_describe(structure)}")
    return layout, next(name for name, s in MIT_VARIANTS.items() if s == spec)


def describe_mit(state_dict) -> str | None:
    """What ``state_dict`` (plain or wrapped, any shared prefix) holds when it is Mix Transformer weights, in words
    (``"MiT-B0 (depths (2,2,2,2), dims (32,64,160,256)) weights, SegFormer layout (mit_b*.pth), with an ImageNet
    classifier (1000 classes)"``); None when it is no MiT (another network, no state dict)."""
    try:
        layout, state, notes = _read(state_dict)
    except ValueError:
        return None
    where = "SegFormer layout (mit_b*.pth)" if layout == "segformer" else "Hugging Face layout (nvidia/mit-b*)"
    try:
        state = state if layout == "segformer" else convert_huggingface(state)
        what = f"{_describe(_structure(state))} weights"
    except ValueError as error:
        return f"Mix Transformer weights of no readable structure ({error}), {where}"
    weight = state.get("head.weight")
    head = f", with an ImageNet classifier ({weight.shape[0]} classes)" if weight is not None and weight.ndim == 2 \
        else ""
    return f"{what}, {where}{head}" + (f" [{', '.join(notes)}]" if notes else "")


def load_mit(model: MixVisionTransformer, state_dict) -> str:
    """Load ``state_dict`` (either layout, plain or wrapped) into ``model`` (a
    :class:`uda.mit.MixVisionTransformer`) and return the line to log. The ImageNet classifier (``head.*``, Hugging
    Face's ``classifier.*``) is dropped and named in the line. ValueError, naming both sides, for a MiT of another
    size, another network, or entries the model does not have; nothing is loaded then."""
    layout, state, notes = _read(state_dict)
    state = state if layout == "segformer" else convert_huggingface(state)
    spec = model.spec
    structure = _structure(state)
    if structure != (spec.dims, spec.depths, spec.sr_ratios, (spec.mlp_ratio,) * 4):
        raise ValueError(f"expected {spec.name} weights ({structure_text(spec.depths, spec.dims)}), got "
                         f"{_describe(structure)}")
    head = {k: state.pop(k) for k in sorted(state) if k.startswith("head.")}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(set(own) & set(state))
              if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"expected exactly the parameters of {spec.text}, got missing {missing[:6]}, unexpected "
                         f"{unexpected[:6]}, other shapes {shapes[:4]} (nothing loaded)")
    model.load_state_dict(state)
    where = f" [{', '.join(notes)}]" if notes else ""
    dropped = ""
    if head:
        weight = head.get("head.weight")
        classes = f", {weight.shape[0]} classes" if weight is not None and weight.ndim == 2 else ""
        dropped = f"; dropped {', '.join(head)} (the ImageNet classifier{classes}, not part of the encoder)"
    return f"{spec.name} weights, {layout} layout{where}: loaded {len(state)} tensors{dropped}"
