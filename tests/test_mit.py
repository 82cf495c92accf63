"""SegFormer's Mix Transformer (uda.mit), DAFormer's decoder (uda.daformer_head) and MiT weight files
(uda.mit_weights), checked against an implementation we did not write: Hugging Face transformers'
``SegformerModel`` (a test-only dependency).

Equivalence: on the same random weights (every parameter drawn, LayerNorm and bias terms included, so a transposed
or swapped tensor shows), our four stage maps equal transformers' hidden states for MiT-B0 and MiT-B1 (B1 has the
B2-B5 widths; B5 at full depth takes ~20 s here and was checked by hand), at an input size that is a multiple of
32 and one that is not. The weights reach our model through :func:`uda.mit_weights.load_mit`, from the file
``save_pretrained`` writes (the ``nvidia/mit-b*`` layout) and from transformers' own module names.

transformers' SegFormer uses LayerNorm eps 1e-5 everywhere; SegFormer's release (and DAFormer) uses 1e-6 in the
block and stage norms. The reference is set to SegFormer's values; the float64 test shows the comparison sees an
eps difference.
"""

from __future__ import annotations

import copy
import functools
import re
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import SegformerConfig, SegformerForImageClassification
from uda.daformer_head import DAFormerHead
from uda.mit import MIT_VARIANTS, MiTSpec, MixVisionTransformer, build_mit
from uda.mit_weights import convert_huggingface, detect_mit_layout, load_mit
from uda.model import ResNet101Dilated

SIZES = [(64, 96), (70, 90)]  # a multiple of 32, and not


# ------------------------------------------------------------------------------------------------- helpers
def randomize(module: nn.Module) -> None:
    """Every parameter random: weights ~ N(0, 1/fan_in), LayerNorm scales ~ N(1, 0.1), biases ~ N(0, 0.1)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5)
            else:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)


def segformer_eps(hf: nn.Module, eps: float = 1e-6) -> None:
    """Set transformers' block norms and stage norms to SegFormer's eps (patch-embedding and spatial-reduction
    norms keep 1e-5, as in SegFormer)."""
    for name, m in hf.named_modules():
        if isinstance(m, nn.LayerNorm) and re.search(r"\.(layernorm_before|layernorm_after)$|stages\.\d+\.layer_norm$",
                                                      name):
            m.eps = eps


def hf_config(spec: MiTSpec, num_labels: int = 10) -> SegformerConfig:
    return SegformerConfig(hidden_sizes=list(spec.dims), depths=list(spec.depths), num_attention_heads=list(spec.heads),
                           sr_ratios=list(spec.sr_ratios), mlp_ratios=[spec.mlp_ratio] * 4, drop_path_rate=0.1,
                           num_labels=num_labels, attn_implementation="eager")


@functools.cache
def reference(name: str) -> tuple[SegformerForImageClassification, dict[str, torch.Tensor]]:
    """transformers' classifier of MiT ``name`` with random weights and SegFormer's eps, and its weights: for
    mit-b0 the file ``save_pretrained`` writes (Hub layout: ``segformer.encoder...`` + ``classifier.*``), else its
    state dict (transformers >= 5 module names)."""
    torch.manual_seed(0)
    hf = SegformerForImageClassification(hf_config(MIT_VARIANTS[name])).eval()
    randomize(hf)
    segformer_eps(hf)
    if name != "mit-b0":
        return hf, hf.state_dict()
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        return hf, load_file(str(Path(folder) / "model.safetensors"))


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def compare(ours: MixVisionTransformer, hf: SegformerForImageClassification, size, dtype=torch.float32,
            batch: int = 2) -> list[float]:
    """Max relative error of each stage map (after checking that the shapes agree and are rounded up)."""
    x = torch.randn(batch, 3, *size, dtype=dtype)
    with torch.no_grad():
        ref = hf.segformer(x, output_hidden_states=True).hidden_states
        out = ours(x)
    assert len(out) == len(ref) == 4
    h, w = size
    for o, r, c, stride in zip(out, ref, ours.out_channels, (4, 8, 16, 32)):
        assert o.shape == r.shape == (batch, c, -(-h // stride), -(-w // stride))
    return [rel_err(o, r) for o, r in zip(out, ref)]


# --------------------------------------------------------------------------------------- (a) equivalence
@pytest.mark.parametrize("name", ["mit-b0", "mit-b1"])
def test_stage_maps_equal_transformers(name):
    hf, weights = reference(name)
    ours = build_mit(name).eval()
    message = load_mit(ours, weights)
    assert "huggingface layout" in message and "dropped head.bias, head.weight" in message
    for size in SIZES:
        errors = compare(ours, hf, size)
        assert max(errors) < 1e-4, errors


def test_both_huggingface_generations_convert_alike():
    hf, hub = reference("mit-b0")
    assert any(k.startswith("segformer.encoder.block.0.0.attention.self.key.") for k in hub)  # the Hub file
    assert any(".attention.k_proj." in k for k in hf.state_dict())  # transformers >= 5 module names
    a, b = convert_huggingface(hub), convert_huggingface(hf.state_dict())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    key, value = hub["segformer.encoder.block.0.0.attention.self.key.weight"], \
        hub["segformer.encoder.block.0.0.attention.self.value.weight"]
    assert torch.equal(a["block1.0.attn.kv.weight"], torch.cat([key, value]))  # keys first, as SegFormer's kv


def test_float64_sees_layer_norm_eps():
    """In float64 our maps equal the reference to rounding, and a 1e-5 instead of 1e-6 eps shows far above it.
    (transformers' eager attention takes its softmax in float32, so this one runs its SDPA path.)"""
    hf, weights = reference("mit-b0")
    hf = copy.deepcopy(hf).double()
    hf.set_attn_implementation("sdpa")
    ours = build_mit("mit-b0").eval()
    load_mit(ours, weights)
    ours.double()
    assert max(compare(ours, hf, (38, 50), torch.float64, batch=1)) < 1e-12
    segformer_eps(hf, 1e-5)  # transformers' own choice
    assert max(compare(ours, hf, (38, 50), torch.float64, batch=1)) > 1e-7


def test_drop_path_only_in_training():
    model = build_mit("mit-b0")
    rates = [b.drop_path.p for _, blocks, _ in model.stages() for b in blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.1, 8).tolist())
    x = torch.randn(12, 3, 32, 32)
    model.train()
    assert not torch.equal(model(x)[3], model(x)[3])
    model.eval()
    assert torch.equal(model(x)[3], model(x)[3])
    quiet = build_mit("mit-b0", drop_path=0.0)
    quiet.load_state_dict(model.state_dict())
    assert torch.equal(quiet.train()(x)[3], model(x)[3])  # no other randomness (no dropout) in training


def test_names_shapes_and_sizes():
    for name, spec in MIT_VARIANTS.items():
        with torch.device("meta"):
            model, hf = build_mit(name), SegformerForImageClassification(hf_config(spec)).segformer
        assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf.parameters())
        state = model.state_dict()
        for s, (dim, depth, sr) in enumerate(zip(spec.dims, spec.depths, spec.sr_ratios), 1):
            assert {int(k.split(".")[1]) for k in state if k.startswith(f"block{s}.")} == set(range(depth))
            assert state[f"block{s}.0.attn.kv.weight"].shape == (2 * dim, dim)
            assert state[f"block{s}.0.mlp.dwconv.dwconv.weight"].shape == (4 * dim, 1, 3, 3)
            assert (f"block{s}.0.attn.sr.weight" in state) == (sr > 1)
            if sr > 1:
                assert state[f"block{s}.0.attn.sr.weight"].shape == (dim, dim, sr, sr)
            assert state[f"norm{s}.weight"].shape == (dim,)
    model = build_mit("mit-b0")
    assert model.patch_embed1.proj.weight.shape == (32, 3, 7, 7) and model.patch_embed1.proj.stride == (4, 4)
    assert model.patch_embed2.proj.weight.shape == (64, 32, 3, 3) and model.patch_embed2.proj.stride == (2, 2)
    eps = {name: m.eps for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    assert eps["patch_embed1.norm"] == eps["block1.0.attn.norm"] == 1e-5
    assert eps["block1.0.norm1"] == eps["block1.0.norm2"] == eps["norm1"] == eps["norm4"] == 1e-6


# --------------------------------------------------------------------------------- (b) layouts and refusals
def segformer_file(name: str) -> dict:
    """What SegFormer's ``mit_b*.pth`` holds: the encoder and the ImageNet classifier ``head``."""
    state = build_mit(name).state_dict()
    dim = MIT_VARIANTS[name].dims[-1]
    return {**state, "head.weight": torch.randn(1000, dim), "head.bias": torch.randn(1000)}


def test_detects_both_layouts_plain_and_wrapped():
    hf, hub = reference("mit-b0")
    bare = {k[len("segformer."):]: v for k, v in hub.items() if k.startswith("segformer.")}
    segformer = segformer_file("mit-b0")
    for state, layout in [(hub, "huggingface"), (bare, "huggingface"), (hf.state_dict(), "huggingface"),
                          (hf.segformer.state_dict(), "huggingface"), (segformer, "segformer")]:
        assert detect_mit_layout(state) == (layout, "mit-b0")
        assert detect_mit_layout({"state_dict": state}) == (layout, "mit-b0")
        assert detect_mit_layout({f"module.{k}": v for k, v in state.items()}) == (layout, "mit-b0")
    for name in MIT_VARIANTS:  # the variant from the tensors' shapes and block counts
        with torch.device("meta"):
            state = build_mit(name).state_dict()
        assert detect_mit_layout(state) == ("segformer", name)


def test_segformer_file_loads_and_drops_head():
    state = segformer_file("mit-b0")
    model = build_mit("mit-b0")
    message = load_mit(model, {"state_dict": state})
    assert message.startswith("MiT-B0 weights, segformer layout [in {'state_dict': ...}]: loaded 176 tensors")
    assert "dropped head.bias, head.weight (the ImageNet classifier, 1000 classes" in message
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_refuses_other_sizes_and_networks():
    with torch.device("meta"):
        b1, b2, b5 = build_mit("mit-b1"), build_mit("mit-b2"), build_mit("mit-b5")
        b1_file = build_mit("mit-b1").state_dict()
    with pytest.raises(ValueError, match=r"expected MiT-B5 weights \(depths \(3,6,40,3\), dims \(64,128,320,512\)\), "
                                         r"got MiT-B0 \(depths \(2,2,2,2\), dims \(32,64,160,256\)\)"):
        load_mit(b5, reference("mit-b0")[1])
    with pytest.raises(ValueError, match=r"expected MiT-B2 .* got MiT-B1 \(depths \(2,2,2,2\)"):
        load_mit(b2, b1_file)  # same dims, other depths
    resnet = ResNet101Dilated(blocks=(1, 1, 1, 1)).state_dict()
    with pytest.raises(ValueError, match=r"got a DeepLab/ResNet state dict \(conv1/layer1\.\.\.\)"):
        load_mit(b1, resnet)
    with pytest.raises(ValueError, match=r"got a DeepLab/ResNet state dict"):
        detect_mit_layout({"state_dict": resnet})
    pipeline = {"model": {**{f"backbone.{k}": v for k, v in resnet.items()}, "classifier.branches.0.weight":
                          torch.zeros(5, 2048, 3, 3)}}
    with pytest.raises(ValueError, match=r"whole segmentation network .* backbone\.\* is a DeepLab/ResNet"):
        load_mit(b1, pipeline)
    segmentor = {"state_dict": {**{f"backbone.{k}": v for k, v in b1_file.items()},
                                "decode_head.conv_seg.weight": torch.zeros(19, 256, 1, 1)}}
    with pytest.raises(ValueError, match=r"backbone\.\* is a MiT: pass only its backbone\.\* entries"):
        load_mit(b1, segmentor)
    with pytest.raises(ValueError, match=r"unknown network"):
        detect_mit_layout({"fc.weight": torch.zeros(3, 3), "conv.weight": torch.zeros(3, 3)})


def test_refuses_unreleased_structures_and_partial_files():
    short = MixVisionTransformer(MiTSpec("MiT-short", (64, 128, 320, 512), (1, 1, 2, 1)))
    with pytest.raises(ValueError, match=r"no released size \(depths \(1,1,2,1\)"):
        detect_mit_layout(short.state_dict())
    load_mit(short, short.state_dict())  # a model of the same structure takes it
    model = build_mit("mit-b0")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    extra = {**segformer_file("mit-b0"), "block1.0.attn.extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected \['block1\.0\.attn\.extra\.weight'\].*nothing loaded"):
        load_mit(model, extra)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    hub = dict(reference("mit-b0")[1])
    hub.pop("segformer.encoder.block.0.0.attention.self.value.weight")
    with pytest.raises(ValueError, match=r"expected a value projection"):
        convert_huggingface(hub)
    hub = {**reference("mit-b0")[1], "segformer.encoder.block.0.0.attention.self.extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"maps to no SegFormer parameter"):
        convert_huggingface(hub)


# ------------------------------------------------------------------------------------------------ (c) head
def test_head_shapes_and_names():
    encoder = build_mit("mit-b0").eval()
    head = DAFormerHead(encoder.out_channels, num_classes=5).eval()
    for h, w in SIZES:
        logits, features = head(encoder(torch.randn(2, 3, h, w)))
        assert logits.shape == (2, 5, -(-h // 4), -(-w // 4)) and features.shape == (2, 256, -(-h // 4), -(-w // 4))
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes["embed_layers.0.proj.weight"] == (256, 32) and shapes["embed_layers.3.proj.weight"] == (256, 256)
    assert shapes["fuse_layer.aspp_modules.0.conv.weight"] == (256, 1024, 1, 1)
    for i, d in zip((1, 2, 3), (6, 12, 18)):
        branch = head.fuse_layer.aspp_modules[i]
        assert shapes[f"fuse_layer.aspp_modules.{i}.depthwise_conv.conv.weight"] == (1024, 1, 3, 3)
        assert branch.depthwise_conv.conv.dilation == (d, d) and branch.depthwise_conv.conv.padding == (d, d)
        assert shapes[f"fuse_layer.aspp_modules.{i}.pointwise_conv.conv.weight"] == (256, 1024, 1, 1)
    assert shapes["fuse_layer.bottleneck.conv.weight"] == (256, 1024, 3, 3)
    assert shapes["conv_seg.weight"] == (5, 256, 1, 1) and "conv_seg.bias" in shapes
    assert not any(k.endswith("conv.bias") for k in shapes)  # convolutions followed by BN have no bias


def test_encoder_and_head_train():
    torch.manual_seed(0)
    encoder, head = build_mit("mit-b0"), DAFormerHead((32, 64, 160, 256), num_classes=4)
    params = list(encoder.parameters()) + list(head.parameters())
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2, 8, 8))
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    losses = []
    for step in range(4):
        optimizer.zero_grad()
        logits, features = head(encoder(images))
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        if step == 0:
            assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.any() for p in params)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    head.eval()
    stages = [s.detach() for s in encoder.eval()(images)]
    assert torch.equal(head(stages)[0], head(stages)[0])  # no dropout in eval
