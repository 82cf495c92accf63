"""examples/uda/schedule.py: DAFormer's AdamW groups (mmcv's custom_keys rule) and mmcv's poly lr with linear
warm-up, against values worked out by hand from mmcv's formulas."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from uda import schedule as S
from uda.daformer_head import DAFormerHead
from uda.mit import build_mit


class Segmentor(nn.Module):
    """DAFormer's names: ``backbone.*`` (MiT) and ``decode_head.*``, plus a top-level and a frozen parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = build_mit("mit-b0")
        self.decode_head = DAFormerHead(self.backbone.out_channels, 19)
        self.temperature = nn.Parameter(torch.ones(()))
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)


@pytest.fixture(scope="module")
def model():
    return Segmentor()


def _settings(groups) -> dict[int, tuple[float, float]]:
    out = {}
    for group in groups:
        for p in group["params"]:
            assert id(p) not in out, "a parameter in two groups"
            out[id(p)] = (group["lr"], group["weight_decay"])
    return out


def test_groups_follow_daformer_paramwise_cfg(model):
    groups = S.adamw_param_groups(model)
    settings = _settings(groups)
    names = dict(model.named_parameters())
    assert id(names["frozen"]) not in settings
    assert len(settings) == sum(p.requires_grad for p in model.parameters())
    for name, p in names.items():
        if not p.requires_grad:
            continue
        if "head" in name:  # custom key 'head': lr x 10, weight decay x 1 (its BatchNorms included)
            expected = (6e-4, 0.01)
        elif "norm" in name:  # custom key 'norm': every LayerNorm of the MiT, no weight decay
            expected = (6e-5, 0.0)
        else:  # everything else, biases included (DAFormer sets no bias rule)
            expected = (6e-5, 0.01)
        assert settings[id(p)] == pytest.approx(expected), name
    spot = {
        "backbone.block1.0.norm1.weight": (6e-5, 0.0),
        "backbone.block1.0.attn.norm.bias": (6e-5, 0.0),
        "backbone.patch_embed1.norm.weight": (6e-5, 0.0),
        "backbone.norm4.weight": (6e-5, 0.0),
        "backbone.block1.0.attn.q.bias": (6e-5, 0.01),
        "backbone.patch_embed1.proj.weight": (6e-5, 0.01),
        "decode_head.fuse_layer.bottleneck.bn.weight": (6e-4, 0.01),
        "decode_head.conv_seg.bias": (6e-4, 0.01),
        "temperature": (6e-5, 0.01),
    }
    for name, expected in spot.items():
        assert settings[id(names[name])] == pytest.approx(expected), name
    assert len(groups) == 3
    for group in groups:
        assert group["base_lr"] == group["lr"] and group["betas"] == (0.9, 0.999)


def test_longest_key_wins_then_alphabetical():
    model = nn.Module()
    model.decode_head = nn.Module()
    model.decode_head.norm = nn.LayerNorm(2)  # 'head' and 'norm' equally long: 'head' first (mmcv)
    model.decode_head.pos_block = nn.Linear(2, 2)  # 'pos_block' is longer than 'head': no decay, lr x 1
    model.norm = nn.LayerNorm(2)
    settings = _settings(S.adamw_param_groups(model, lr=1.0, weight_decay=0.5))
    named = dict(model.named_parameters())
    assert settings[id(named["decode_head.norm.weight"])] == (10.0, 0.5)
    assert settings[id(named["decode_head.pos_block.weight"])] == (1.0, 0.0)
    assert settings[id(named["norm.bias"])] == (1.0, 0.0)


def test_build_adamw_and_validation(model):
    optimizer = S.build_adamw(model)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert all(g["eps"] == 1e-8 and g["betas"] == (0.9, 0.999) for g in optimizer.param_groups)
    S.set_lr_(optimizer, 0)
    assert sorted(g["lr"] for g in optimizer.param_groups) == pytest.approx([6e-11, 6e-11, 6e-10])
    with pytest.raises(ValueError, match="optimizer: expected param groups with 'base_lr'"):
        S.set_lr_(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), 0)
    with pytest.raises(ValueError, match="no_decay_keys: expected keys not in head_keys"):
        S.adamw_param_groups(model, no_decay_keys=("head",))
    with pytest.raises(ValueError, match="head_keys: expected"):
        S.adamw_param_groups(model, head_keys="head")


# Hand-worked from mmcv 1.3's PolyLrUpdaterHook + LrUpdaterHook.get_warmup_lr('linear'), DAFormer's poly10warm:
# base 6e-5, N = 40000, W = 1500, rho = 1e-6, p = 1, min_lr = 0; i = runner.iter (0 for the first iteration).
#   regular(i) = 6e-5 (1 - i / 40000);  i < 1500: lr = regular(i) (1 - (1 - i / 1500)(1 - 1e-6))
# The values below are exact decimals; mmcv's double arithmetic (1 - 0.999999, 1 - 39999 / 40000) cancels, hence
# a relative tolerance of 1e-9.
HAND = [
    (0, 6e-5 * 1e-6),  # regular 6e-5, k = 0.999999 -> 6e-11
    (750, 5.8875e-5 * 0.5000005),  # regular 6e-5 * 0.98125, k = 0.5 * 0.999999 = 0.4999995
    (1499, 5.77515e-5 * (1 - 0.999999 / 1500)),  # regular 6e-5 * 0.962525, k = (1 / 1500) * 0.999999
    (1500, 5.775e-5),  # warm-up over: regular 6e-5 * 0.9625
    (20000, 3e-5),
    (39999, 1.5e-9),
    (40000, 0.0),
]


@pytest.mark.parametrize("iteration,expected", HAND)
def test_scheduled_lr_matches_hand_values(iteration, expected):
    assert S.scheduled_lr(6e-5, iteration) == pytest.approx(expected, rel=1e-9, abs=1e-20)
    assert S.lr_factor(iteration) * 6e-5 == pytest.approx(expected, rel=1e-9, abs=1e-20)
    assert S.lr_factor(iteration) * 6e-4 == pytest.approx(10 * expected, rel=1e-9, abs=1e-20)  # the head group


def test_scheduled_lr_power_and_min_lr():
    # p = 0.9, min_lr = 1e-6 (absolute, mmcv): i = 10000 -> (6e-5 - 1e-6) * 0.75 ** 0.9 + 1e-6
    assert S.scheduled_lr(6e-5, 10000, power=0.9, min_lr=1e-6) == pytest.approx(5.9e-5 * 0.75 ** 0.9 + 1e-6)
    # warm-up multiplies the poly lr, min_lr included: i = 100, W = 200, rho = 0.1 -> regular * (1 - 0.5 * 0.9)
    regular = 5.9e-5 * (1 - 100 / 40000) ** 0.9 + 1e-6
    got = S.scheduled_lr(6e-5, 100, warmup_iters=200, warmup_ratio=0.1, power=0.9, min_lr=1e-6)
    assert got == pytest.approx(regular * 0.55)
    assert S.lr_factor(100, warmup_iters=200, warmup_ratio=0.1, power=0.9, min_lr=1e-6,
                       base_lr=6e-5) == pytest.approx(regular * 0.55 / 6e-5)
    assert S.scheduled_lr(1.0, 0, warmup_iters=0) == 1.0  # no warm-up
    for bad in (-1, 40001, 1.5):
        with pytest.raises(ValueError, match="iteration: expected"):
            S.scheduled_lr(1.0, bad)
    with pytest.raises(ValueError, match="warmup_ratio: expected"):
        S.scheduled_lr(1.0, 3, warmup_ratio=0.0)


def test_set_lr_uses_each_group_base(model):
    optimizer = S.build_adamw(model)
    S.set_lr_(optimizer, 750)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(group["base_lr"] * 0.98125 * 0.5000005, rel=1e-12)
        assert group["base_lr"] == pytest.approx(6e-5) or group["base_lr"] == pytest.approx(6e-4)
