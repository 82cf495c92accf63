"""examples/uda/teacher.py: DAFormer's mean teacher, pseudo-label weight, ImageNet feature distance and MIC's block
mask, against float64 loop references written from DAFormer's/MIC's definitions, plus a no-host-read check."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from uda import teacher as T
from uda.mit import DropPath

SYNC_OPS = {"aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.nonzero", "aten.nonzero_static",
            "aten.unique", "aten._unique", "aten._unique2", "aten.unique_dim", "aten.unique_consecutive",
            "aten.masked_select", "aten.bincount", "aten.repeat_interleave", "aten.equal"}


class SyncRecorder(TorchDispatchMode):
    """Records the ops that read device values on the host (and boolean-mask indexing)."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        boolean_index = name in ("aten.index", "aten.index_put", "aten.index_put_") and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool
            for t in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()))
        if name in SYNC_OPS or boolean_index:
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------------------------------------- EMA teacher
class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)
        self.scale = nn.Parameter(torch.tensor(0.5))  # a 0-dim parameter (DAFormer special-cases those)
        self.steps = nn.Parameter(torch.tensor([3, 4]), requires_grad=False)  # not floating point
        self.drop = nn.Dropout(0.5)
        self.drop_path = DropPath(0.2)


def test_ema_alpha_follows_daformer_ramp():
    assert T.ema_alpha(0) == 0.0  # a copy at the first iteration (DAFormer's _init_ema_weights)
    assert T.ema_alpha(1) == 0.5
    assert T.ema_alpha(9) == pytest.approx(0.9)
    assert T.ema_alpha(999) == pytest.approx(0.999)
    assert T.ema_alpha(5000) == 0.999
    assert T.ema_alpha(99, alpha=0.99) == pytest.approx(0.99) and T.ema_alpha(10**6, alpha=0.99) == 0.99
    for bad in (-1, 1.0, True):
        with pytest.raises(ValueError, match="iteration: expected"):
            T.ema_alpha(bad)
    with pytest.raises(ValueError, match="alpha: expected"):
        T.ema_alpha(3, alpha=1.5)


def test_ema_update_matches_float64_reference_and_leaves_buffers():
    student, teacher = Tiny(), Tiny()
    with torch.no_grad():
        teacher.bn.running_mean.fill_(7.0)
        teacher.bn.num_batches_tracked.fill_(11)
        student.bn.running_mean.fill_(-3.0)
    reference: dict[str, torch.Tensor] = {}
    g = torch.Generator().manual_seed(1)
    for i in range(6):
        with torch.no_grad():  # the student moves between updates
            for p in student.parameters():
                if p.is_floating_point():
                    p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))
        T.ema_update_(teacher, student, i, alpha=0.7)
        a = min(1 - 1 / (i + 1), 0.7)
        for name, p in student.named_parameters():
            s = p.detach().double()
            reference[name] = s.clone() if i == 0 else a * reference[name] + (1 - a) * s
        if i == 0:
            for (_, t), s in zip(teacher.named_parameters(), student.parameters()):
                assert torch.equal(t, s)
    for name, t in teacher.named_parameters():
        torch.testing.assert_close(t.double(), reference[name].to(t.dtype).double(), rtol=1e-6, atol=1e-6)
        assert t.dtype == dict(student.named_parameters())[name].dtype
    assert torch.equal(teacher.steps, student.steps)
    assert torch.all(teacher.bn.running_mean == 7.0) and int(teacher.bn.num_batches_tracked) == 11


def test_ema_update_rejects_other_architectures():
    with pytest.raises(ValueError, match="teacher: expected"):
        T.ema_update_(nn.Linear(4, 3), nn.Linear(4, 2), 1)
    with pytest.raises(ValueError, match="teacher: expected the student's"):
        T.ema_update_(nn.Linear(4, 3, bias=False), nn.Linear(4, 3), 1)


def test_teacher_mode_switches_off_dropout_and_drop_path_only():
    model = Tiny().eval()
    assert T.teacher_mode_(model) is model
    assert model.training and model.bn.training and model.fc.training
    assert not model.drop.training and not model.drop_path.training


# ---------------------------------------------------------------------------------------------- pseudo-labels
def _pseudo_reference(logits: torch.Tensor, threshold: float, top: int, bottom: int):
    """DAFormer's rule pixel by pixel in float64: softmax, first arg max, batch share of max prob >= threshold."""
    b_, k_, h_, w_ = logits.shape
    z = logits.double().tolist()
    labels = torch.zeros(b_, h_, w_, dtype=torch.long)
    confident = 0
    for b in range(b_):
        for i in range(h_):
            for j in range(w_):
                scores = [z[b][k][i][j] for k in range(k_)]
                m = max(scores)
                e = [math.exp(s - m) for s in scores]
                probs = [v / sum(e) for v in e]
                best = max(range(k_), key=lambda k: (probs[k], -k))
                labels[b, i, j] = best
                confident += probs[best] >= threshold
    share = confident / (b_ * h_ * w_)
    weight = torch.zeros(b_, h_, w_, dtype=torch.float64)
    for i in range(h_):
        if top <= i < h_ - bottom:
            weight[:, i, :] = share
    return labels, weight


@pytest.mark.parametrize("threshold,top,bottom", [(0.968, 2, 3), (0.5, 0, 0), (0.9, 1, 0), (0.99, 0, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pseudo_labels_match_loop_reference(threshold, top, bottom, dtype):
    logits = (torch.randn(3, 5, 9, 7, dtype=torch.float64) * 4.0).to(dtype)
    labels, weight = T.pseudo_labels(logits, threshold=threshold, ignore_top=top, ignore_bottom=bottom)
    ref_labels, ref_weight = _pseudo_reference(logits, threshold, top, bottom)
    assert labels.dtype == torch.long and labels.shape == (3, 9, 7)
    assert weight.dtype == dtype and weight.shape == (3, 9, 7) and weight.is_contiguous()
    assert torch.equal(labels, ref_labels)
    torch.testing.assert_close(weight.double(), ref_weight, rtol=1e-6, atol=0.0)
    assert 0.0 < float(ref_weight.max()) < 1.0  # the reference exercised a non-trivial share


def test_pseudo_weight_is_one_number_per_batch_not_per_image():
    logits = torch.zeros(2, 3, 4, 4)
    logits[0, 1] = 20.0  # image 0: every pixel confident; image 1: uniform, none
    _, weight = T.pseudo_labels(logits, threshold=0.968, ignore_top=0, ignore_bottom=0)
    assert torch.all(weight == 0.5)  # DAFormer: share over the batch (a per-image rule would give 1 and 0)


def test_pseudo_weight_rows_and_dtypes():
    logits = torch.randn(2, 4, 6, 5).to(torch.bfloat16) * 10
    labels, weight = T.pseudo_labels(logits, threshold=0.5, ignore_top=4, ignore_bottom=3)
    assert weight.dtype == torch.float32 and torch.all(weight == 0)  # top + bottom cover every row
    _, weight = T.pseudo_labels(logits.float(), threshold=0.0, ignore_top=1, ignore_bottom=2)
    assert torch.all(weight[:, 1:4] == 1.0) and torch.all(weight[:, :1] == 0) and torch.all(weight[:, 4:] == 0)
    with pytest.raises(ValueError, match="teacher_logits: expected"):
        T.pseudo_labels(torch.randn(4, 6, 5))
    with pytest.raises(ValueError, match="ignore_bottom: expected"):
        T.pseudo_labels(logits, ignore_bottom=-1)
    with pytest.raises(ValueError, match="threshold: expected"):
        T.pseudo_labels(logits, threshold=1.5)


# ---------------------------------------------------------------------------------------------- feature distance
def _bins(n: int, m: int) -> list[tuple[int, int]]:
    """Adaptive-pooling bins of n pixels onto m cells: [floor(i n / m), ceil((i + 1) n / m))."""
    return [((i * n) // m, -((-(i + 1) * n) // m)) for i in range(m)]


def _downscale_reference(labels: torch.Tensor, h: int, w: int, k: int, min_ratio: float, ignore: int):
    b_, hh, ww = labels.shape
    out = torch.full((b_, h, w), ignore, dtype=torch.long)
    lab = labels.tolist()
    for b in range(b_):
        for y, (y0, y1) in enumerate(_bins(hh, h)):
            for x, (x0, x1) in enumerate(_bins(ww, w)):
                counts = [0] * (k + 1)
                for i in range(y0, y1):
                    for j in range(x0, x1):
                        v = lab[b][i][j]
                        counts[k if v == ignore else v] += 1
                best = max(range(k + 1), key=lambda c: (counts[c], -c))
                if best < k and counts[best] / ((y1 - y0) * (x1 - x0)) >= min_ratio:
                    out[b, y, x] = best
    return out


def _fdist_reference(student, imnet, labels, things, k, min_ratio, ignore=255):
    b_, c_, h, w = student.shape
    s, t = student.double().tolist(), imnet.double().tolist()
    coarse = None if labels is None else _downscale_reference(labels, h, w, k, min_ratio, ignore)
    total, count = 0.0, 0
    for b in range(b_):
        for y in range(h):
            for x in range(w):
                if coarse is not None and int(coarse[b, y, x]) not in things:
                    continue
                total += math.sqrt(sum((s[b][c][y][x] - t[b][c][y][x]) ** 2 for c in range(c_)))
                count += 1
    return (total / count if count else 0.0), count


def _blocky_labels(b: int, hh: int, ww: int, k: int, g: torch.Generator) -> torch.Tensor:
    """Labels made of coarse regions (so that cells have majorities) with noise and ignored pixels."""
    coarse = torch.randint(0, k, (b, 1, 3, 4), generator=g).float()
    labels = F.interpolate(coarse, size=(hh, ww), mode="nearest")[:, 0].long()
    noise = torch.rand(b, hh, ww, generator=g)
    labels = torch.where(noise < 0.1, torch.randint(0, k, (b, hh, ww), generator=g), labels)
    return torch.where(noise > 0.93, 255, labels)


@pytest.mark.parametrize("hh,ww,h,w", [(16, 24, 4, 6), (15, 22, 4, 6), (13, 13, 3, 5), (8, 8, 8, 8)])
@pytest.mark.parametrize("min_ratio", [0.75, 0.5, 0.0])
def test_feature_distance_matches_loop_reference(hh, ww, h, w, min_ratio):
    g = torch.Generator().manual_seed(hh * 100 + ww + int(min_ratio * 10))
    k, things = 6, (1, 3, 4)
    student = torch.randn(2, 3, h, w, generator=g, dtype=torch.float64)
    imnet = torch.randn(2, 3, h, w, generator=g, dtype=torch.float64)
    labels = _blocky_labels(2, hh, ww, k, g)
    coarse = T.downscale_labels(labels, (h, w), num_classes=k, min_ratio=min_ratio)
    assert torch.equal(coarse, _downscale_reference(labels, h, w, k, min_ratio, 255))
    loss = T.feature_distance_loss(student, imnet, labels, things, scale_min_ratio=min_ratio, num_classes=k)
    assert loss.dtype == torch.float64 and loss.shape == ()
    expected, selected = _fdist_reference(student, imnet, labels, things, k, min_ratio)
    assert float(loss) == pytest.approx(expected, rel=1e-12)
    assert 0 < selected < 2 * h * w  # the case selects some cells and leaves others


def test_downscale_equals_daformer_rule_for_integer_ratios():
    """DAFormer's downscale_label_ratio restated: one-hot with ignore as class K, f x f average pool, arg max."""
    g = torch.Generator().manual_seed(3)
    k, f = 7, 4
    labels = _blocky_labels(3, 32, 48, k, g)
    onehot = F.one_hot(torch.where(labels == 255, k, labels), k + 1).permute(0, 3, 1, 2).float()
    ratio, majority = F.avg_pool2d(onehot, kernel_size=f).max(dim=1)
    majority[majority == k] = 255
    majority[ratio < 0.75] = 255
    assert torch.equal(T.downscale_labels(labels, (8, 12), num_classes=k, min_ratio=0.75), majority)


def test_feature_distance_empty_selection_is_a_connected_zero():
    g = torch.Generator().manual_seed(5)
    student = torch.randn(2, 4, 3, 3, generator=g, requires_grad=True)
    imnet = torch.randn(2, 4, 3, 3, generator=g)
    for labels in (torch.full((2, 12, 12), 255), torch.zeros(2, 12, 12, dtype=torch.long)):  # ignored / stuff
        loss = T.feature_distance_loss(student, imnet, labels, (6, 7), num_classes=19)
        loss.backward()
        assert float(loss.detach()) == 0.0 and loss.requires_grad
        assert torch.all(student.grad == 0)
        student.grad = None
    free = T.feature_distance_loss(student, imnet, None, num_classes=19)  # no class mask: mean over all cells
    expected = torch.linalg.vector_norm(student.detach() - imnet, dim=1).mean()
    assert float(free.detach()) == pytest.approx(float(expected))


def test_feature_distance_gradient_is_finite_at_equal_features():
    features = torch.randn(1, 4, 2, 2)
    student = features.clone().requires_grad_(True)
    labels = torch.full((1, 8, 8), 6)
    loss = T.feature_distance_loss(student, features, labels, (6,), num_classes=19)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.all(student.grad == 0)


def test_feature_distance_gradcheck():
    g = torch.Generator().manual_seed(7)
    student = torch.randn(2, 3, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    imnet = torch.randn(2, 3, 3, 4, generator=g, dtype=torch.float64)
    labels = _blocky_labels(2, 10, 13, 5, g)
    assert torch.autograd.gradcheck(
        lambda s: T.feature_distance_loss(s, imnet, labels, (0, 2, 3), scale_min_ratio=0.5, num_classes=5),
        (student,))


def test_feature_distance_validates():
    f = torch.randn(1, 2, 2, 2)
    with pytest.raises(ValueError, match="imnet_features: expected"):
        T.feature_distance_loss(f, torch.randn(1, 2, 2, 3), None, num_classes=19)
    with pytest.raises(ValueError, match="thing_classes: expected"):
        T.feature_distance_loss(f, f, torch.zeros(1, 8, 8, dtype=torch.long), (19,), num_classes=19)
    with pytest.raises(ValueError, match="labels: expected"):
        T.feature_distance_loss(f, f, torch.zeros(2, 8, 8, dtype=torch.long), num_classes=19)
    with pytest.raises(ValueError, match="size: expected"):
        T.feature_distance_loss(f, f, torch.zeros(1, 1, 8, dtype=torch.long), num_classes=19)
    with pytest.raises(ValueError, match="ignore_index: expected"):
        T.feature_distance_loss(f, f, None, num_classes=19, ignore_index=3)


# ---------------------------------------------------------------------------------------------- block mask
def test_block_mask_blocks_and_values():
    mask = T.block_mask(3, 64, 96, block=16, ratio=0.5, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (3, 1, 64, 96) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    cells = mask[:, :, ::16, ::16]
    assert torch.equal(mask, cells.repeat_interleave(16, 2).repeat_interleave(16, 3))
    assert 0 < float(cells.mean()) < 1


def test_block_mask_grid_follows_mic_rounding():
    g = torch.Generator().manual_seed(1)
    mask = T.block_mask(2, 50, 70, block=32, ratio=0.5, generator=g)
    grid = (round(50 / 32), round(70 / 32))  # MIC: round(H / block) x round(W / block) cells = 2 x 2
    u = torch.rand((2, 1, *grid), generator=torch.Generator().manual_seed(1))
    cells = (u > 0.5).float()
    rows = [y * grid[0] // 50 for y in range(50)]  # nearest: source index floor(y * in / out)
    cols = [x * grid[1] // 70 for x in range(70)]
    assert torch.equal(mask, cells[:, :, rows][:, :, :, cols])
    assert T.block_mask(1, 8, 8, block=32).shape == (1, 1, 8, 8)  # at least one cell (MIC: an empty grid)


def test_block_mask_share_and_determinism():
    mask = T.block_mask(64, 256, 256, block=32, ratio=0.7, generator=torch.Generator().manual_seed(2))
    assert float(mask.mean()) == pytest.approx(0.3, abs=0.02)  # 4096 cells: std ~0.007
    a = T.block_mask(2, 64, 64, generator=torch.Generator().manual_seed(9))
    b = T.block_mask(2, 64, 64, generator=torch.Generator().manual_seed(9))
    c = T.block_mask(2, 64, 64, generator=torch.Generator().manual_seed(10))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.all(T.block_mask(1, 64, 64, ratio=0.0) == 1) and torch.all(T.block_mask(1, 64, 64, ratio=1.0) == 0)
    with pytest.raises(ValueError, match="ratio: expected"):
        T.block_mask(1, 8, 8, ratio=1.5)
    with pytest.raises(ValueError, match="block: expected"):
        T.block_mask(1, 8, 8, block=0)


# ---------------------------------------------------------------------------------------------- no host reads
def test_training_path_reads_no_device_value():
    student, teacher = Tiny(), Tiny()
    logits = torch.randn(2, 19, 32, 32)
    features = torch.randn(2, 8, 4, 4, requires_grad=True)
    imnet = torch.randn(2, 8, 4, 4)
    labels = torch.randint(0, 19, (2, 32, 32))
    recorder = SyncRecorder()
    with recorder:
        T.ema_update_(teacher, student, 0)
        T.ema_update_(teacher, student, 5)
        T.teacher_mode_(teacher)
        pseudo, weight = T.pseudo_labels(logits, ignore_top=2, ignore_bottom=5)
        loss = T.feature_distance_loss(features, imnet, labels, T.CITYSCAPES_THINGS, num_classes=19)
        loss.backward()
        mask = T.block_mask(2, 32, 32, block=8, generator=torch.Generator().manual_seed(0))
    assert recorder.syncs == []
    assert pseudo.shape == weight.shape == (2, 32, 32) and mask.shape == (2, 1, 32, 32)


def test_recorder_sees_a_host_read():
    recorder = SyncRecorder()
    x = torch.randn(4)
    with recorder:
        x.sum().item()
        x[x > 0]
    assert any("_local_scalar_dense" in s for s in recorder.syncs) and any("index" in s for s in recorder.syncs)
