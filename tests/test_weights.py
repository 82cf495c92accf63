"""Weights from the field and from our own runs (issue 26, style rule 21): every file either loads the network
that computes what its author's network computed (layer4 and logits equal in float64 to the peer's network,
tests/peer_deeplab.py, on the same input in the peer's own input convention) or is refused, naming both sides.

Paths: ``--init`` (weights.init_weights, model.build_model), ``--source-checkpoint``
(weights.load_source_weights), ``predict.py`` (inference.load_model / weights.build_model_for), ``--resume``
(weights.resume_network) and a plain ``load_state_dict``. Small ResNets (blocks 1-1-2-1) keep CPU time low; one
test runs the full ResNet-101.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from peer_deeplab import PeerDeepLab, caffe_input, randomize, torchvision_input
from PIL import Image
from uda import checkpoint, inference, model, options, weights
from uda.network import NetworkMismatchError

BLOCKS = (1, 1, 2, 1)
K = 5


@pytest.fixture(autouse=True)
def float64():
    """Float64 everywhere, so that a different network shows as a difference far above rounding."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randint(0, 256, (1, 3, 33, 33), generator=torch.Generator().manual_seed(0)).to(torch.uint8)


def peer(num_classes: int = K, seed: int = 1, blocks=BLOCKS, **kwargs) -> PeerDeepLab:
    return randomize(PeerDeepLab(num_classes, blocks=blocks, **kwargs), seed)


def ours(num_classes: int = K, **kwargs) -> model.DeepLabV2:
    return model.DeepLabV2(num_classes, blocks=kwargs.pop("blocks", BLOCKS), **kwargs).eval()


def save(state: dict, path, *, prefix: str = "", wrapper: str | None = None):
    state = {prefix + k: v for k, v in state.items()}
    torch.save({wrapper: state} if wrapper else state, path)
    return path


@torch.no_grad()
def layer4(net: model.DeepLabV2, image: torch.Tensor) -> torch.Tensor:
    return net.backbone(net.normalize(image))


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float64 rounding (a different stride placement or input differs by O(1) relative)."""
    assert actual.dtype == torch.float64 and expected.dtype == torch.float64
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9 * scale)


def peer_out(net: PeerDeepLab, image: torch.Tensor, convention=caffe_input):
    with torch.no_grad():
        return net(convention(image))


# ----------------------------------------------------------------------------------------------------- --init
@pytest.mark.parametrize("prefix,wrapper", [("", None), ("Scale.", None), ("module.", None), ("", "state_dict"),
                                            ("module.Scale.", "state_dict")])
def test_res_deeplab_and_deeplab_init_as_init(tmp_path, image, prefix, wrapper):
    net = peer(21)  # the DeepLab init file's layer5 has another K than the run: skipped anyway
    path = save(net.state_dict(), tmp_path / "init.pth", prefix=prefix, wrapper=wrapper)
    mine = ours(K)
    message = weights.init_weights(mine, path)
    assert mine.layout == "deeplab" and mine.backbone.layer2[0].conv1.stride == (2, 2)
    assert_same(layer4(mine, image), peer_out(net, image)[0])
    assert "Res_Deeplab" in message and "DeepLab layout" in message and "layer5" in message
    assert "skipped" in message.split("loaded")[-1]
    if "Scale." in prefix:
        assert "DeepLab init layout (Scale. prefix)" in message


def test_deeplab_multi_as_init(tmp_path, image):
    net = peer(K, multi=True)
    mine = ours(K)
    message = weights.init_weights(mine, save(net.state_dict(), tmp_path / "multi.pth"))
    assert_same(layer4(mine, image), peer_out(net, image)[0])
    assert "DeeplabMulti" in message and "layer5 (DeeplabMulti's layer3 head" in message and "layer6" in message


@pytest.mark.parametrize("prefix,wrapper", [("module.", None), ("", None), ("module.", "state_dict")])
def test_torchvision_resnet_as_init(tmp_path, image, prefix, wrapper):
    """Case 2 of the issue: a torchvision ResNet saved from nn.DataParallel is the torchvision layout."""
    net = peer(stride_in_1x1=False, head=False)
    state = dict(net.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 2048), torch.randn(1000)
    mine = ours(K)
    message = weights.init_weights(mine, save(state, tmp_path / "tv.pth", prefix=prefix, wrapper=wrapper))
    assert mine.layout == "torchvision" and mine.backbone.layer2[0].conv2.stride == (2, 2)
    assert_same(layer4(mine, image), peer_out(net, image, torchvision_input)[0])
    assert "torchvision ResNet (fc ImageNet classifier, 1000 classes)" in message and "fc" in message


def test_bare_backbone_needs_init_layout(tmp_path, image):
    """Case 1 of the issue: a peer backbone without prefix and classifier cannot be told from torchvision's."""
    net = peer()
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("layer5.")}
    path = save(state, tmp_path / "backbone.pth")
    with pytest.raises(ValueError, match=r"--init-layout \{torchvision,deeplab\}.*bare ResNet backbone"):
        weights.init_weights(ours(K), path)
    mine = ours(K)
    message = weights.init_weights(mine, path, layout="deeplab")
    assert_same(layer4(mine, image), peer_out(net, image)[0])
    assert "DeepLab layout" in message
    # the other answer builds the other network: the torchvision one with these weights
    other = ours(K)
    weights.init_weights(other, path, layout="torchvision")
    tv = randomize(PeerDeepLab(K, blocks=BLOCKS, stride_in_1x1=False, head=False), 1)
    tv.load_state_dict(state, strict=False)
    assert_same(layer4(other, image), peer_out(tv, image, torchvision_input)[0])


def test_init_layout_contradicting_the_structure_is_refused(tmp_path):
    path = save(peer().state_dict(), tmp_path / "peer.pth")
    with pytest.raises(ValueError, match="Res_Deeplab.*DeepLab layout"):
        weights.init_weights(ours(K), path, layout="torchvision")
    with pytest.raises(ValueError, match="expected --init-layout 'torchvision' or 'deeplab'"):
        weights.init_weights(ours(K), path, layout="caffe")


def test_build_model_names_the_init_it_used(tmp_path):
    none = weights.build_model("deeplabv2", K)
    assert none.init_message.startswith("init: none") and "torchvision layout" in none.init_message
    assert weights.build_model("tiny", K).init_message.startswith("init: none")
    state = {k: v for k, v in peer(blocks=(3, 4, 23, 3)).state_dict().items() if not k.startswith("layer5.")}
    path = save(state, tmp_path / "r101.pth", prefix="Scale.")
    with pytest.raises(ValueError, match="--init-layout"):
        weights.build_model("deeplabv2", K, init=str(path))
    built = weights.build_model("deeplabv2", K, init=str(path), init_layout="deeplab")
    assert built.layout == "deeplab" and "DeepLab layout" in built.init_message
    assert "backbone 520 tensors loaded" in built.init_message  # 104 convolutions + 104 BN x 4 (no counters)


# ------------------------------------------------------------------------------------------ --source-checkpoint
@pytest.mark.parametrize("multi", [False, True])
@pytest.mark.parametrize("rule", ["all-branches", "first-two"])
def test_peer_checkpoint_as_source(tmp_path, image, multi, rule):
    net = peer(K, multi=multi, first_two=rule == "first-two")
    path = save(net.state_dict(), tmp_path / "peer.pth", prefix="module.", wrapper="state_dict")
    mine = ours(K)  # built without --init: the torchvision layout until the file says otherwise
    same, message = weights.load_source_weights(mine, path, peer_classifier=rule)
    assert same is mine and mine.layout == "deeplab"
    x4, logits = peer_out(net, image)
    assert_same(layer4(mine, image), x4)
    with torch.no_grad():
        assert_same(mine(image)[0], logits)
    assert rule in message and ("layer6" if multi else "layer5") in message


def test_first_two_is_not_all_branches(tmp_path, image):
    """The option matters: AdaptSegNet's classifier loaded as all-branches computes other logits."""
    net = peer(K, first_two=True)
    mine = ours(K)
    weights.load_source_weights(mine, save(net.state_dict(), tmp_path / "a.pth"), peer_classifier="all-branches")
    with torch.no_grad():
        wrong = mine(image)[0]
    expected = peer_out(net, image)[1]
    assert (wrong - expected).abs().max() > 1e-3 * expected.abs().max()


def test_peer_classifier_option_and_k_are_checked(tmp_path):
    path = save(peer(K).state_dict(), tmp_path / "peer.pth")
    with pytest.raises(ValueError, match=r"--peer-classifier \{all-branches,first-two\}.*branches 0-1"):
        weights.load_source_weights(ours(K), path)
    with pytest.raises(NetworkMismatchError, match="K=7 classes.*K=5 classifier"):
        weights.load_source_weights(ours(7), path, peer_classifier="all-branches")
    tv = peer(stride_in_1x1=False, head=False).state_dict()
    with pytest.raises(ValueError, match="no segmentation classifier; give it as --init"):
        weights.load_source_weights(ours(K), save(tv, tmp_path / "tv.pth"), peer_classifier="all-branches")


def deeplab_run_checkpoint(tmp_path, **config) -> tuple[model.DeepLabV2, dict]:
    """A pipeline model trained from the DeepLab init (stride on the 1x1 conv, BGR), as a run saves it."""
    net = ours(K)
    weights.init_weights(net, save(peer(K, seed=3).state_dict(), tmp_path / "init.pth"))
    with torch.no_grad():
        for conv in net.classifier.branches:
            conv.weight.normal_(0, 0.01)
            conv.bias.normal_(0, 0.1)
    ckpt = {"model": net.state_dict(), "config": {"arch": "deeplabv2", **config}}
    checkpoint.save_atomic(ckpt, tmp_path / "source_only.pt")
    return net, checkpoint.load(tmp_path / "source_only.pt")


def test_own_checkpoint_carries_its_network(tmp_path, image):
    """Case 3 of the issue: a second command without --init loads the source model's own network."""
    trained, ckpt = deeplab_run_checkpoint(tmp_path)
    with torch.no_grad():
        expected = trained(image)
    plain = ours(K)
    with pytest.raises(NetworkMismatchError, match=r"differing: stride, channels, mean, std.*deeplab layout.*"
                                                   r"this model is.*torchvision layout"):
        plain.load_state_dict(ckpt["model"])
    mine = ours(K)
    _, message = weights.load_source_weights(mine, tmp_path / "source_only.pt")
    assert mine.layout == "deeplab" and "switched to the file's" in message
    with torch.no_grad():
        got = mine(image)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    rebuilt, _ = weights.build_model_for(ckpt)
    with torch.no_grad():
        assert torch.equal(rebuilt(image)[0], expected[0])
    with pytest.raises(NetworkMismatchError, match="features"):
        weights.load_source_weights(ours(K, features="layer4", proj_dim=8), ckpt)
    with pytest.raises(NetworkMismatchError, match="num_classes"):
        weights.load_source_weights(ours(K + 1), ckpt)


def test_own_checkpoint_as_init(tmp_path, image):
    trained, _ = deeplab_run_checkpoint(tmp_path)
    mine = ours(K)
    message = weights.init_weights(mine, tmp_path / "source_only.pt")
    assert mine.layout == "deeplab" and "a checkpoint of this pipeline" in message and "classifier" in message
    assert torch.equal(layer4(mine, image), layer4(trained, image))
    with pytest.raises(ValueError, match="in the --init-layout given"):
        weights.init_weights(ours(K), tmp_path / "source_only.pt", layout="torchvision")
    torch.save({"model": weights.build_model("tiny", K).state_dict()}, tmp_path / "tiny.pt")
    with pytest.raises(ValueError, match="expected --init .* to hold a DeepLab-V2.*tiny CNN"):
        weights.init_weights(ours(K), tmp_path / "tiny.pt")


def test_resume_refuses_another_network(tmp_path):
    _, ckpt = deeplab_run_checkpoint(tmp_path, source_checkpoint="peer.pth")
    with pytest.raises(NetworkMismatchError, match=r"--resume.*deeplab layout.*torchvision layout.*--init"):
        weights.resume_network(ours(K), ckpt)
    with pytest.raises(NetworkMismatchError):  # another source file than the one the run started from
        weights.resume_network(ours(K), ckpt, source_checkpoint="other.pth")
    # the run that started from --source-checkpoint peer.pth: its network came from that file
    mine = ours(K)
    message = weights.resume_network(mine, ckpt, source_checkpoint="peer.pth")
    assert mine.layout == "deeplab" and "as recorded" in message
    mine.load_state_dict(ckpt["model"])
    same = ours(K)
    same.set_layout("deeplab")
    assert weights.resume_network(same, ckpt).startswith("--resume: network DeepLab-V2")
    with pytest.raises(NetworkMismatchError, match="num_classes"):
        weights.resume_network(ours(K + 1), ckpt)


def test_legacy_checkpoints_are_read_with_their_stride(tmp_path, image):
    """Case 4 of the issue: checkpoints with a ``bgr`` buffer (or extra state) and no description."""
    trained, ckpt = deeplab_run_checkpoint(tmp_path)
    with torch.no_grad():
        expected = trained(image)[0]
    state = {k: v for k, v in ckpt["model"].items() if k != "_extra_state"}
    for legacy in ({**state, "bgr": torch.tensor(True)}, {**state, "_extra_state": {"bgr": True}}):
        rebuilt, message = weights.build_model_for({"model": legacy})
        assert rebuilt.layout == "deeplab" and "inferred" in message
        with torch.no_grad():
            assert torch.equal(rebuilt(image)[0], expected)
        with pytest.raises(NetworkMismatchError, match="stride"):
            ours(K).load_state_dict(legacy)
        deeplab = ours(K)
        deeplab.set_layout("deeplab")
        deeplab.load_state_dict(legacy)
        with torch.no_grad():
            assert torch.equal(deeplab(image)[0], expected)


def test_class_names_travel_and_are_checked():
    net = weights.build_model("tiny", 3, class_names=("a", "b", "c"))
    state = net.state_dict()
    assert state["_extra_state"]["network"]["classes"] == ["a", "b", "c"]
    other = weights.build_model("tiny", 3, class_names=("a", "b", "x"))
    with pytest.raises(NetworkMismatchError, match="classes"):
        other.load_state_dict(state)
    weights.build_model("tiny", 3).load_state_dict(state)  # a model that names no classes takes the weights
    with pytest.raises(ValueError, match="expected 3 class names"):
        weights.build_model("tiny", 3, class_names=("a",))


def test_every_state_dict_carries_its_network(tmp_path):
    tiny = weights.build_model("tiny", 4)
    deeplab = ours(K, features="layer4", proj_dim=8)
    deeplab.set_layout("deeplab")
    for net, expected in ((tiny, {"arch": "tiny", "channels": "rgb", "num_classes": 4}),
                          (deeplab, {"arch": "deeplabv2", "stride": "1x1", "channels": "bgr", "layout": "deeplab",
                                     "features": "layer4", "proj_dim": 8, "num_classes": K,
                                     "blocks": list(BLOCKS)})):
        checkpoint.save_atomic({"model": net.state_dict()}, tmp_path / "c.pt")
        network = checkpoint.load(tmp_path / "c.pt")["model"]["_extra_state"]["network"]  # weights_only
        assert {k: network[k] for k in expected} == expected
        assert weights.network_config(net, ["x"] * net.num_classes)["classes"] == ["x"] * net.num_classes
        weights.check_network({"model": net.state_dict()}, net, "the test")


# ------------------------------------------------------------------------------------------------- predict.py
def test_predict_loads_a_peer_checkpoint(tmp_path, image):
    net = peer(K, multi=True, first_two=True)
    path = save(net.state_dict(), tmp_path / "GTA2Cityscapes_multi.pth")
    with pytest.raises(ValueError, match="--peer-classifier"):
        inference.load_model(path)
    lines = []
    mine, config = inference.load_model(path, peer_classifier="first-two", log=lines.append)
    assert config == {} and mine.num_classes == K and "DeeplabMulti" in lines[0]
    with torch.no_grad():
        assert_same(mine(image)[0], peer_out(net, image)[1])


def test_predict_command_takes_a_peer_checkpoint(tmp_path, capsys):
    path = save(peer(19).state_dict(), tmp_path / "dass.pth", prefix="module.")
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(images / "a.png")
    argv = ["--checkpoint", str(path), "--images", str(images), "--out", str(tmp_path / "out"), "--eval-size", "30x20"]
    assert inference.main(argv) == 2
    assert "--peer-classifier {all-branches,first-two}" in capsys.readouterr().err
    assert inference.main([*argv, "--peer-classifier", "all-branches"]) == 0
    assert "Res_Deeplab" in capsys.readouterr().out
    written = np.asarray(Image.open(tmp_path / "out" / "trainids" / "a.png"))
    assert written.shape == (20, 30) and written.max() < 19


# ------------------------------------------------------------------------------------------- refused families
def test_other_families_are_refused(tmp_path):
    backbone = {k: v for k, v in peer().state_dict().items() if not k.startswith("layer5.")}
    proda = {**backbone, "layer5.conv2d_list.0.0.weight": torch.zeros(256, 2048, 1, 1),
             "layer5.bottleneck.1.weight": torch.zeros(256, 1280, 3, 3), "layer5.head.1.weight": torch.zeros(K, 256, 1, 1)}
    with pytest.raises(ValueError, match="ProDA's DeepLab-V2.*another network family"):
        weights.init_weights(ours(K), save(proda, tmp_path / "proda.pth"))
    with pytest.raises(ValueError, match="ProDA checkpoint"):
        weights.build_model_for({"ResNet101": {"model_state": proda}}, peer_classifier="all-branches")
    with pytest.raises(ValueError, match=r"other modules too: \['aux'\]"):
        weights.init_weights(ours(K), save({**backbone, "aux.weight": torch.zeros(1)}, tmp_path / "aux.pth"))
    multi = peer(K, multi=True).state_dict()
    no_layer6 = {k: v for k, v in multi.items() if not k.startswith("layer6.")}
    with pytest.raises(ValueError, match="a DeeplabMulti without its layer4 head"):
        weights.init_weights(ours(K), save(no_layer6, tmp_path / "multi.pth"))
    with pytest.raises(ValueError, match="torchvision ResNet-101 layout"):
        weights.init_weights(ours(K), save({"w": torch.zeros(1)}, tmp_path / "w.pth"))
    with pytest.raises(ValueError, match="to match --arch deeplabv2"):
        weights.load_source_weights(ours(K), {"model": {"w": torch.zeros(1)}})


def test_size_option_and_init_layout_option():
    assert options.parse_size("1460x730") == (1460, 730) and options.parse_size("8,4") == (8, 4)
    for bad in ("0x730", "1460x0", "1460", "axb"):
        with pytest.raises(argparse.ArgumentTypeError, match="both > 0"):
            options.parse_size(bad)
    assert inference.build_parser().parse_args(["--eval-size", "4x2"]).eval_size == (4, 2)
    with pytest.raises(SystemExit):
        options.parse_args(["--init-layout", "deeplab"])
    with pytest.raises(SystemExit):
        options.parse_args(["--peer-classifier", "first-two"])


# ----------------------------------------------------------------------------------------------- ResNet-101
def test_full_resnet101_res_deeplab_through_every_path(image):
    """The real depth (3-4-23-3), K = 19, DataParallel prefix in a state_dict wrapper: --init, --source-checkpoint
    and predict's loader give the peer's layer4 and logits."""
    net = peer(19, blocks=(3, 4, 23, 3))
    obj = {"state_dict": {"module." + k: v for k, v in net.state_dict().items()}}
    x4, logits = peer_out(net, image)
    mine = weights.build_model("deeplabv2", 19)
    weights.init_weights(mine, obj)
    assert_same(layer4(mine.eval(), image), x4)
    weights.load_source_weights(mine, obj, peer_classifier="all-branches")
    with torch.no_grad():
        assert_same(mine(image)[0], logits)
    del mine
    rebuilt, _ = weights.build_model_for(obj, peer_classifier="all-branches")
    with torch.no_grad():
        assert_same(rebuilt.eval()(image)[0], logits)
