"""DAFormer's network as a network of the reference pipeline (uda.daformer_net, issue 32): its interface, the
description its checkpoints carry, ``--init`` from SegFormer's and Hugging Face's MiT files, the refusals that name
both sides, ``predict.py`` and the ``--arch`` defaults. MiT-B0 at 64x64, K=5: a few seconds on a CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import SegformerConfig, SegformerForImageClassification
from uda import checkpoint, inference, options, weights
from uda.daformer_net import MIT_ARCHS, DAFormerNet
from uda.mit import MIT_VARIANTS, build_mit
from uda.mit_weights import convert_huggingface
from uda.model import DeepLabV2
from uda.network import NetworkMismatchError
from uda.schedule import adamw_param_groups

K = 5
BLOCKS = (1, 1, 1, 1)  # a small ResNet for the DeepLab side


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randint(0, 256, (2, 3, 64, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def net(arch: str = "mit-b0", num_classes: int = K, seed: int = 0, **kwargs) -> DAFormerNet:
    torch.manual_seed(seed)
    return weights.build_model(arch, num_classes, **kwargs).eval()


def segformer_file(path: Path, arch: str = "mit-b0", seed: int = 1) -> tuple[Path, dict]:
    """SegFormer's ``mit_b*.pth`` layout: a fresh encoder's state dict and an ImageNet head."""
    torch.manual_seed(seed)
    state = {**build_mit(arch).state_dict(), "head.weight": torch.randn(1000, MIT_VARIANTS[arch].dims[-1]),
             "head.bias": torch.randn(1000)}
    torch.save(state, path)
    return path, state


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = snapshot(model)
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


# ------------------------------------------------------------------------------------------------ interface
def test_forward_shapes_description_and_param_groups(images):
    model = net()
    assert isinstance(model, DAFormerNet) and model.feature_dim == 256 and model.num_classes == K
    with torch.no_grad():
        logits, features = model(images)
        float_logits, _ = model(images.float())
    assert logits.shape == (2, K, 16, 16) and features.shape == (2, 256, 16, 16)  # output stride 4
    assert logits.dtype == features.dtype == torch.float32 and torch.equal(logits, float_logits)
    config = model.network_config()
    assert {k: config[k] for k in ("arch", "decoder", "features", "feature_dim", "channels", "num_classes")} == {
        "arch": "mit-b0", "decoder": "daformer-sepaspp", "features": "fused", "feature_dim": 256, "channels": "rgb",
        "num_classes": K}
    assert config["mean"] == [123.675, 116.28, 103.53] and config["std"] == [58.395, 57.12, 57.375]
    groups = model.param_groups(1e-3)  # what uda.run.make_optimizer gives SGD
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    head = {id(p) for p in model.decode_head.parameters()}
    for group in groups:
        is_head = {id(p) in head for p in group["params"]}
        assert len(is_head) == 1 and group["base_lr"] == group["lr"] == (1e-2 if is_head == {True} else 1e-3)
        assert "betas" not in group and group.get("weight_decay", "optimizer's") in (0.0, "optimizer's")
    no_decay = next(g for g in groups if g.get("weight_decay") == 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" in names[id(p)] for p in no_decay["params"])
    torch.optim.SGD(groups, lr=1e-3, momentum=0.9, weight_decay=5e-4)
    adamw = model.param_groups(6e-5, weight_decay=0.01)
    reference = adamw_param_groups(model)
    assert [{k: v for k, v in g.items() if k != "params"} for g in adamw] == [
        {k: v for k, v in g.items() if k != "params"} for g in reference]


def test_options_and_build_model_arguments():
    assert set(MIT_ARCHS) == set(MIT_VARIANTS) and set(MIT_ARCHS) <= set(options.DEFAULTS)
    for arch in MIT_ARCHS:
        assert options.DEFAULTS[arch] == {**options.DEFAULTS["deeplabv2"], "crop": 512}
    args = options.parse_args(["--arch", "mit-b0"])
    assert args.arch == "mit-b0" and args.crop == 512
    with pytest.raises(ValueError, match="--features aspp and --proj-dim 256 for --arch mit-b0"):
        weights.build_model("mit-b0", K, features="layer4")
    with pytest.raises(ValueError, match="no --init-layout for --arch mit-b0"):
        weights.build_model("mit-b0", K, init="x.pth", init_layout="torchvision")
    with pytest.raises(ValueError, match="'mit-b0'"):
        weights.build_model("mit-b9", K)


# ------------------------------------------------------------------------------------------- the description
def test_checkpoint_rebuilds_its_network(tmp_path, images):
    model = net(class_names=("a", "b", "c", "d", "e"))
    checkpoint.save_atomic({"model": model.state_dict(), "config": {"arch": "mit-b0"}}, tmp_path / "c.pt")
    saved = checkpoint.load(tmp_path / "c.pt")  # weights_only
    rebuilt, message = weights.build_model_for(saved)
    assert isinstance(rebuilt, DAFormerNet) and rebuilt.network_config() == model.network_config()
    assert "MiT-B0 + daformer-sepaspp decoder" in message and "K=5" in message
    rebuilt.eval()
    with torch.no_grad():
        for got, expected in zip(rebuilt(images), model(images)):
            assert torch.equal(got, expected)
    # a description that does not name the encoder: its size comes from the backbone's shapes
    network = {k: v for k, v in saved["model"]["_extra_state"]["network"].items() if k != "arch"}
    again, _ = weights.build_model_for({"model": {**saved["model"], "_extra_state": {"network": network}}})
    assert again.arch == "mit-b0" and again.num_classes == K
    with torch.no_grad():
        assert torch.equal(again.eval()(images)[0], model(images)[0])
    # a plain load of weights written for another network is refused, naming both
    with pytest.raises(NetworkMismatchError, match=r"MiT-B1.*this model is MiT-B0"):
        net("mit-b0").load_state_dict({**saved["model"], "_extra_state": {
            "network": {**saved["model"]["_extra_state"]["network"], "arch": "mit-b1"}}})


def test_resume_refuses_the_other_family_naming_both(tmp_path):
    mit = {"model": net().state_dict(), "config": {"arch": "mit-b0"}}
    deeplab = {"model": DeepLabV2(K, blocks=BLOCKS).state_dict(), "config": {"arch": "deeplabv2"}}
    with pytest.raises(NetworkMismatchError, match=r"--resume.*differing: arch.*file's network is DeepLab-V2.*"
                                                   r"this model is MiT-B0 \+ daformer-sepaspp"):
        weights.resume_network(net(), deeplab)
    with pytest.raises(NetworkMismatchError, match=r"--resume.*differing: arch.*file's network is MiT-B0.*"
                                                   r"this model is DeepLab-V2"):
        weights.resume_network(DeepLabV2(K, blocks=BLOCKS), mit)
    with pytest.raises(NetworkMismatchError, match=r"MiT-B0.*this model is MiT-B1"):
        weights.resume_network(net("mit-b1"), mit)
    assert weights.resume_network(net(), mit).startswith("--resume: network MiT-B0")
    with pytest.raises(ValueError, match="no segmentation classifier; give it as --init"):
        weights.load_source_weights(net(), segformer_file(tmp_path / "mit_b0.pth")[0])


# ------------------------------------------------------------------------------------------------------ --init
@pytest.mark.parametrize("wrap", [False, True])
def test_init_from_segformer_layout(tmp_path, wrap):
    path, state = segformer_file(tmp_path / "mit_b0.pth")
    if wrap:  # {'state_dict': ...} with nn.DataParallel's prefix
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    model = net(init=str(path))
    loaded = model.backbone.state_dict()
    assert loaded.keys() == {k for k in state if not k.startswith("head.")}
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)
    assert "SegFormer layout" in model.init_message and "dropped head.bias, head.weight" in model.init_message
    assert "ImageNet classifier" in model.init_message


def test_init_from_huggingface_layout(tmp_path):
    spec = MIT_VARIANTS["mit-b0"]
    config = SegformerConfig(hidden_sizes=list(spec.dims), depths=list(spec.depths),
                             num_attention_heads=list(spec.heads), sr_ratios=list(spec.sr_ratios),
                             mlp_ratios=[spec.mlp_ratio] * 4, num_labels=10)
    torch.manual_seed(2)
    SegformerForImageClassification(config).save_pretrained(tmp_path / "hf")
    state = load_file(str(tmp_path / "hf" / "model.safetensors"))  # segformer.encoder.* + classifier.*
    assert any(k.startswith("classifier.") for k in state)
    torch.save(state, tmp_path / "nvidia_mit_b0.pth")
    model = net(init=str(tmp_path / "nvidia_mit_b0.pth"))
    expected = convert_huggingface(state)
    loaded = model.backbone.state_dict()
    assert all(torch.equal(loaded[k], expected[k]) for k in loaded)
    assert "Hugging Face layout" in model.init_message and "10 classes" in model.init_message


def test_init_refusals_name_the_file_and_load_nothing(tmp_path):
    path, _ = segformer_file(tmp_path / "mit_b0.pth")
    b1 = DAFormerNet("mit-b1", K)
    before = snapshot(b1)
    with pytest.raises(ValueError, match=r"--arch mit-b1: expected MiT-B1 weights .*got MiT-B0"):
        weights.init_mit(b1, path)
    assert unchanged(b1, before)
    with pytest.raises(ValueError, match="got MiT-B0"):
        weights.build_model("mit-b1", K, init=str(path))
    # ResNet files: a torchvision ResNet (fc), a DeepLab run's checkpoint
    resnet = {**DeepLabV2(K, blocks=BLOCKS).backbone.state_dict(), "fc.weight": torch.zeros(1000, 2048),
              "fc.bias": torch.zeros(1000)}
    torch.save(resnet, tmp_path / "resnet.pth")
    torch.save({"model": DeepLabV2(K, blocks=BLOCKS).state_dict()}, tmp_path / "deeplab.pt")
    b0 = DAFormerNet("mit-b0", K)
    before = snapshot(b0)
    with pytest.raises(ValueError, match=r"hold MiT-B0 .* weights .*got torchvision ResNet \(fc"):
        weights.init_mit(b0, tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match=r"got a checkpoint of this pipeline: DeepLab-V2"):
        weights.init_mit(b0, tmp_path / "deeplab.pt")
    torch.save({"model": net("mit-b1").state_dict()}, tmp_path / "b1_run.pt")
    with pytest.raises(ValueError, match=r"got a checkpoint of this pipeline: MiT-B1"):
        weights.init_mit(b0, tmp_path / "b1_run.pt")
    assert unchanged(b0, before)
    # and the reverse: a MiT file is no ResNet
    deeplab = DeepLabV2(K, blocks=BLOCKS)
    before = snapshot(deeplab)
    with pytest.raises(ValueError, match=r"ResNet-101 weights for a DeepLab-V2, got MiT-B0 .*SegFormer layout.*"
                                         r"initialise --arch mit-b0"):
        weights.init_weights(deeplab, path)
    assert unchanged(deeplab, before)


def test_init_from_a_run_of_the_same_arch(tmp_path):
    trained = net(seed=3)
    torch.save({"model": trained.state_dict()}, tmp_path / "run.pt")
    model = net(init=str(tmp_path / "run.pt"))
    assert "the backbone of a checkpoint of this pipeline" in model.init_message
    assert all(torch.equal(a, b) for a, b in zip(model.backbone.state_dict().values(),
                                                 trained.backbone.state_dict().values()))


# ------------------------------------------------------------------------------------------------- predict.py
def test_predict_command_takes_a_daformer_checkpoint(tmp_path, capsys):
    torch.save({"model": net(num_classes=19).state_dict(), "config": {"arch": "mit-b0"}}, tmp_path / "adapted.pt")
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 70, 3), dtype=np.uint8)).save(folder / "a.png")
    argv = ["--checkpoint", str(tmp_path / "adapted.pt"), "--images", str(folder), "--out", str(tmp_path / "out"),
            "--eval-size", "64x32"]
    assert inference.main(argv) == 0
    assert "MiT-B0 + daformer-sepaspp decoder" in capsys.readouterr().out
    written = np.asarray(Image.open(tmp_path / "out" / "trainids" / "a.png"))
    assert written.shape == (40, 70) and written.max() < 19
