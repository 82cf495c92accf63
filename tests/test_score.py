"""The label-free model scores (examples/uda/score.py, issue 27) against float64 loops, edge cases, and the
score-validation study's analysis (benchmarks/study/round_scores.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from uda import score


def _softmax_rows(seed: int, n: int, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, k, generator=g, dtype=torch.float64) * 2, -1)


def _snd_loop(p: torch.Tensor, temperature: float, exclude_self: bool) -> float:
    n = p.shape[0]
    rows = [[float(v) for v in r] for r in p]
    unit = []
    for r in rows:
        norm = math.sqrt(sum(v * v for v in r))
        unit.append([v / norm for v in r])
    total = 0.0
    for i in range(n):
        js = [j for j in range(n) if not (exclude_self and j == i)]
        s = [sum(a * b for a, b in zip(unit[i], unit[j])) / temperature for j in js]
        m = max(s)
        e = [math.exp(v - m) for v in s]
        z = sum(e)
        total += -sum((v / z) * math.log(v / z) for v in e if v > 0)
    return total / n


@pytest.mark.parametrize("exclude_self", [True, False])
def test_snd_matches_loop(exclude_self):
    p = _softmax_rows(0, 6, 4)
    got = score.snd(p, temperature=0.05, exclude_self=exclude_self)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(_snd_loop(p, 0.05, exclude_self), rel=1e-10)
    # another temperature, and several sets at once: each set scored on its own
    batch = torch.stack([_softmax_rows(s, 5, 3) for s in range(3)])
    got = score.snd(batch, temperature=0.5, exclude_self=exclude_self)
    assert got.shape == (3,)
    for b in range(3):
        assert float(got[b]) == pytest.approx(_snd_loop(batch[b], 0.5, exclude_self), rel=1e-10)


def test_snd_fp32_close_to_fp64():
    p = _softmax_rows(1, 7, 5)
    assert float(score.snd(p.float())) == pytest.approx(float(score.snd(p)), rel=1e-4)


def test_snd_edge_cases():
    # one class: every normalised vector is the same, so each pixel's neighbours are uniform: log(N - 1)
    assert float(score.snd(torch.ones(5, 1, dtype=torch.float64))) == pytest.approx(math.log(4))
    assert float(score.snd(torch.ones(5, 1, dtype=torch.float64), exclude_self=False)) == pytest.approx(math.log(5))
    assert math.isnan(float(score.snd(torch.ones(1, 3))))  # no neighbour
    assert math.isnan(float(score.snd(torch.ones(0, 3))))  # empty
    # 12 confident predictions in 3 classes: each pixel's weight goes to the 3 others of its class
    confident = torch.eye(3).repeat(4, 1) * 0.98 + 0.01
    assert float(score.snd(confident)) == pytest.approx(math.log(3), abs=0.05)


def test_snd_rejects_bad_input():
    with pytest.raises(ValueError, match=r"expected shape \(N, K\) or \(B, N, K\), got \(3,\)"):
        score.snd(torch.ones(3))
    with pytest.raises(ValueError, match="temperature: expected > 0, got 0"):
        score.snd(torch.ones(3, 2), temperature=0)
    with pytest.raises(TypeError, match="probs: expected a Tensor, got list"):
        score.snd([[0.5, 0.5]])


def test_prediction_entropy_matches_loop():
    p = _softmax_rows(3, 6, 4)
    got = score.prediction_entropy(p, dim=1)
    for i in range(6):
        h = -sum(float(v) * math.log(float(v)) for v in p[i])
        assert float(got[i]) == pytest.approx(h / math.log(4), rel=1e-12)
    raw = score.prediction_entropy(p, dim=1, normalize=False)
    assert float(raw[0]) == pytest.approx(float(got[0]) * math.log(4))
    # one-hot: 0 (0 log 0 = 0, no NaN); one class: 0; uniform: 1
    assert score.prediction_entropy(torch.eye(3)).tolist() == [0.0, 0.0, 0.0]
    assert score.prediction_entropy(torch.ones(2, 1, 3, 3)).abs().max() == 0
    assert torch.allclose(score.prediction_entropy(torch.full((1, 5, 2, 2), 0.2)), torch.ones(1, 2, 2))


def _cos(a, b):
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(x * x for x in b))
    return sum(x * y for x, y in zip(a, b)) / (na * nb)


def test_prototype_scores_and_separation_match_loops():
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(20, 3, generator=g, dtype=torch.float64)
    protos = torch.randn(4, 3, generator=g, dtype=torch.float64)
    valid = torch.tensor([True, False, True, True])
    preds = torch.randint(0, 4, (20,), generator=g)
    agreement, margin = score.prototype_scores(feats, preds, protos, valid)
    agree, margins = 0, []
    for f, y in zip(feats.tolist(), preds.tolist()):
        cs = sorted(((_cos(f, protos[k].tolist()), k) for k in range(4) if valid[k]), reverse=True)
        agree += cs[0][1] == y
        margins.append(cs[0][0] - cs[1][0])
    assert float(agreement) == pytest.approx(agree / 20)
    assert float(margin) == pytest.approx(sum(margins) / 20, rel=1e-10)
    seps = []
    for k in range(4):
        if valid[k]:
            seps.append(1 - max(_cos(protos[k].tolist(), protos[j].tolist()) for j in range(4) if valid[j] and j != k))
    assert float(score.separation(protos, valid)) == pytest.approx(sum(seps) / len(seps), rel=1e-10)


def test_prototype_scores_edge_cases():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # one valid prototype: the missing second counts as cosine -1
    agreement, margin = score.prototype_scores(f, torch.tensor([0, 0]), torch.tensor([[1.0, 0.0]]))
    assert float(agreement) == 1.0 and float(margin) == pytest.approx((2.0 + 1.0) / 2)
    # nothing valid, or no cell: NaN
    a, m = score.prototype_scores(f, torch.tensor([0, 1]), torch.eye(2), torch.tensor([False, False]))
    assert math.isnan(float(a)) and math.isnan(float(m))
    a, m = score.prototype_scores(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), torch.eye(2))
    assert math.isnan(float(a)) and math.isnan(float(m))
    assert math.isnan(float(score.separation(torch.eye(2), torch.tensor([True, False]))))
    assert float(score.separation(torch.eye(2))) == pytest.approx(1.0)  # orthogonal prototypes
    with pytest.raises(ValueError, match=r"predictions: expected shape \(2,\), got \(3,\)"):
        score.prototype_scores(f, torch.zeros(3, dtype=torch.long), torch.eye(2))


def test_class_means_matches_loop():
    g = torch.Generator().manual_seed(5)
    feats, labels = torch.randn(12, 3, generator=g), torch.randint(0, 3, (12,), generator=g)
    labels[labels == 2] = 0  # class 2 absent
    sums, counts = score.class_means(feats, labels, 3)
    for k in range(3):
        rows = [feats[i].double() for i in range(12) if labels[i] == k]
        assert counts[k] == len(rows)
        expected = sum(rows) if rows else torch.zeros(3, dtype=torch.float64)
        assert torch.allclose(sums[k], expected)


class _Fixed(nn.Module):
    """Logits from the image's first channel: class 0 where it is 0, class 1 elsewhere (K = 2, D = 2)."""

    def __init__(self, scale: float = 10.0):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        x = x.float()[:, :1]
        small = nn.functional.avg_pool2d(x, 2)  # the feature grid: stride 2
        one = (small > 0).float()
        logits = torch.cat([1 - one, one], 1) * self.scale
        return logits, torch.cat([1 - one + 0.1, one + 0.1], 1)


class _NoLabels(dict):
    def __getitem__(self, key):
        if key == "label":
            raise AssertionError("target_scores read a label")
        return super().__getitem__(key)


def _batches(n: int):
    out = []
    for _ in range(n):
        image = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
        image[:, :, :, 4:] = 200  # left half class 0, right half class 1
        out.append(_NoLabels(image=image, label=torch.zeros(2, 8, 8)))
    return out


def test_target_scores_on_a_known_model():
    model = _Fixed().train()
    result = score.target_scores(model, _batches(2), "cpu", num_classes=2, snd_pixels=10, cells=4)
    assert model.training  # restored
    assert set(result) == set(score.SCORES) | {"images"}
    assert result["images"] == 4
    # near one-hot predictions: entropy ~0; features cluster exactly by the predicted class
    assert -0.05 < result["neg_entropy"] <= 0  # the class boundary, bilinearly upsampled, is the only doubt
    assert result["proto_agreement"] == 1.0
    assert result["proto_separation"] > 0.5
    # deterministic for a seed, and comparable across models: the same positions
    again = score.target_scores(_Fixed(), _batches(2), "cpu", num_classes=2, snd_pixels=10, cells=4)
    assert again == result
    unsure = score.target_scores(_Fixed(scale=0.5), _batches(2), "cpu", num_classes=2, snd_pixels=10, cells=4)
    assert unsure["neg_entropy"] < result["neg_entropy"]
    # less confident predictions are all alike: each pixel's neighbourhood spreads over both classes
    assert unsure["snd"] > result["snd"]
    # max_images, given prototypes
    two = score.target_scores(_Fixed(), _batches(3), "cpu", num_classes=2, max_images=3,
                              prototypes=torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
                              prototypes_valid=torch.tensor([True, True]))
    assert two["images"] == 3
    assert two["ema_agreement"] == 1.0 and two["ema_separation"] == pytest.approx(1.0)


class _LeftRight(nn.Module):
    """Class 0 on the left half of every image, class 1 on the right, whatever the image: not flip-consistent."""

    def forward(self, x):
        b, _, h, w = x.shape
        one = (torch.arange(w // 2) >= w // 4).float().expand(b, 1, h // 2, w // 2)
        return torch.cat([1 - one, one], 1) * 10, torch.cat([1 - one, one], 1)


def test_flip_agreement():
    consistent = score.target_scores(_Fixed(), _batches(1), "cpu", num_classes=2)
    assert consistent["flip_agreement"] == 1.0  # the image decides the class: flipping moves both together
    inconsistent = score.target_scores(_LeftRight(), _batches(1), "cpu", num_classes=2)
    assert inconsistent["flip_agreement"] < 0.3  # flipped back, every pixel away from the middle disagrees
    off = score.target_scores(_Fixed(), _batches(1), "cpu", num_classes=2, flip=False)
    assert math.isnan(off["flip_agreement"]) and off["snd"] == consistent["snd"]


def test_target_scores_edge_cases():
    empty = score.target_scores(_Fixed(), [], "cpu", num_classes=2)
    assert empty["images"] == 0 and all(math.isnan(empty[n]) for n in score.SCORES)
    with pytest.raises(ValueError, match=r"model: expected logits with 3 classes, got shape \(2, 2, 4, 4\)"):
        score.target_scores(_Fixed(), _batches(1), "cpu", num_classes=3)
    with pytest.raises(ValueError, match="prototypes: expected shape"):
        score.target_scores(_Fixed(), _batches(1), "cpu", num_classes=2, prototypes=torch.ones(3, 2))
    with pytest.raises(ValueError, match="num_classes: expected >= 1, got 0"):
        score.target_scores(_Fixed(), _batches(1), "cpu", num_classes=0)


def test_combine_ranks():
    rows = [{"a": 1.0, "b": 3.0}, {"a": 2.0, "b": 1.0}, {"a": 3.0, "b": 2.0}]
    # a: ranks 0, 1/2, 1; b: 1, 0, 1/2
    assert score.combine(rows, ["a", "b"]) == pytest.approx([0.5, 0.25, 0.75])
    # two models: a vote, ties count 1/2
    assert score.combine([{"a": 1.0, "b": 2.0}, {"a": 2.0, "b": 2.0}], ["a", "b"]) == pytest.approx([0.25, 0.75])
    # NaN: that score left out for that model; nothing defined: NaN
    out = score.combine([{"a": math.nan, "b": 1.0}, {"a": 1.0, "b": 2.0}, {"a": math.nan, "b": math.nan}],
                        ["a", "b"])
    assert out[0] == pytest.approx(0.0) and out[1] == pytest.approx((0.5 + 1.0) / 2) and math.isnan(out[2])
    with pytest.raises(ValueError, match=r"rows: expected every row to hold \['a'\], got rows without \['a'\]"):
        score.combine([{"b": 1.0}], ["a"])


def test_round_scores_analysis():
    from study import round_scores

    entries = [{"miou": m, "scores": {"snd": s, **{n: 0.0 for n in score.COMBINED_FROM if n != "snd"}}}
               for m, s in [(40.0, 1.0), (45.0, 2.0), (43.0, 3.0), (41.0, 0.5)]]
    run = {"shift": "demo", "seed": 0, "entries": entries}
    assert round_scores.regret(run, "snd") == pytest.approx(43.0 - 45.0)  # picks round 1, the best is round 0
    # (score change, mIoU change) per round; pytest.approx takes no nested data since pytest 9.2: flattened
    assert [x for pair in round_scores.deltas(run, "snd") for x in pair] == pytest.approx(
        [1.0, 5.0, 1.0, -2.0, -2.5, -2.0])
    # combined: the vote of the pair (one of four components moves, three tie)
    assert [d for d, _ in round_scores.deltas(run, "combined")] == pytest.approx([0.25, 0.25, -0.25])
