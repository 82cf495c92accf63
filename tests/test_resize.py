r"""Label resizing (spec section 2): the nearest rule of ``F.interpolate`` and the purity option."""

import math

import pytest
import reference as ref
import torch
import torch.nn.functional as F

from protocl.resize import nearest_source_index, resize_labels

# (out, in) pairs: identity, integer ratios both ways, and non-integer ratios where the float32
# scale of F.interpolate and exact integer floor(i * in / out) disagree (92 -> 730 is the spec's example).
SIZE_PAIRS = [
    (5, 5),
    (4, 8),
    (8, 4),
    (10, 5),
    (7, 3),
    (3, 7),
    (13, 6),
    (6, 13),
    (730, 92),
    (92, 730),
    (82, 2),
    (97, 33),
    (33, 97),
    (1, 9),
    (9, 1),
]


@pytest.mark.parametrize(("out_size", "in_size"), SIZE_PAIRS)
def test_nearest_source_index_matches_interpolate(out_size, in_size):
    expected = torch.tensor(ref.nearest_index(out_size, in_size))
    got = nearest_source_index(out_size, in_size)
    assert got.dtype == torch.int64
    assert torch.equal(got, expected)


def test_nearest_source_index_differs_from_integer_floor_where_interpolate_does():
    # guards against the "exact" integer rule, which F.interpolate does not follow for 92 -> 730
    got = nearest_source_index(730, 92)
    exact = torch.tensor([min(i * 92 // 730, 91) for i in range(730)])
    assert not torch.equal(got, exact)
    assert torch.equal(got, torch.tensor(ref.nearest_index(730, 92)))


@pytest.mark.parametrize(
    ("size_in", "size_out"),
    [
        ((9, 11), (4, 5)),
        ((4, 5), (9, 11)),
        ((7, 7), (7, 7)),
        ((12, 8), (6, 4)),
        ((13, 10), (5, 7)),
        ((3, 2), (10, 9)),
    ],
)
def test_nearest_resize_matches_reference(size_in, size_out, device):
    labels = ref.random_labels(2, *size_in, 6).to(device)
    got = resize_labels(labels, size_out)
    assert got.shape == (2, *size_out) and got.dtype == torch.int64 and got.device == labels.device
    assert torch.equal(got.cpu(), torch.from_numpy(ref.resize_nearest(labels, size_out)))


def test_nearest_resize_equals_interpolate_on_float_labels():
    labels = ref.random_labels(3, 92, 47, 19, ignore_frac=0.3)
    got = resize_labels(labels, (730, 61))
    expected = F.interpolate(labels[:, None].float(), size=(730, 61), mode="nearest")[:, 0].long()
    assert torch.equal(got, expected)


def test_nearest_resize_non_contiguous_view():
    base = ref.random_labels(2, 11, 9, 5)
    view = base.transpose(1, 2)  # (B, 9, 11), non-contiguous
    assert not view.is_contiguous()
    got = resize_labels(view, (4, 5))
    assert torch.equal(got, torch.from_numpy(ref.resize_nearest(view.contiguous(), (4, 5))))


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8])
def test_nearest_resize_accepts_integer_dtypes_and_returns_int64(dtype):
    labels = ref.random_labels(1, 6, 6, 4, ignore_frac=0.0).to(dtype)
    got = resize_labels(labels, (3, 3))
    assert got.dtype == torch.int64
    assert torch.equal(got, torch.from_numpy(ref.resize_nearest(labels.long(), (3, 3))))


@pytest.mark.parametrize(
    ("size_in", "size_out", "min_purity"),
    [
        ((8, 8), (4, 4), 0.75),
        ((12, 9), (4, 3), 0.75),
        ((12, 9), (4, 3), 0.6),
        ((10, 10), (5, 5), 1.0),
        ((13, 11), (5, 4), 0.75),
        ((9, 7), (4, 3), 0.55),
        ((4, 3), (8, 6), 0.75),
        ((3, 3), (5, 4), 0.75),
    ],
)
def test_purity_resize_matches_reference(size_in, size_out, min_purity, device):
    labels = ref.blocky_labels(2, *size_in, 4, block=2, ignore_frac=0.15).to(device)
    got = resize_labels(labels, size_out, mode="purity", num_classes=4, min_purity=min_purity)
    expected = ref.resize_purity(labels, size_out, 4, min_purity=min_purity)
    assert got.dtype == torch.int64
    assert torch.equal(got.cpu(), torch.from_numpy(expected))


def test_purity_hand_example():
    # one 2x2 cell per quadrant of a 4x4 map
    labels = torch.tensor([[[1, 1, 2, 2], [1, 2, 2, 3], [0, 0, 255, 255], [255, 255, 255, 255]]])
    got = resize_labels(labels, (2, 2), mode="purity", num_classes=4, min_purity=0.75)
    # 3/4 class 1; 3/4 class 2; 2/4 class 0 (ignore counts in the cell size); all ignore
    assert got.tolist() == [[[1, 2], [255, 255]]]
    got = resize_labels(labels, (2, 2), mode="purity", num_classes=4, min_purity=0.5)
    assert got[0, 1, 0].item() == 0  # class 0 is a class, not "nothing"


def test_purity_one_class_and_all_ignored():
    one = torch.full((1, 6, 6), 3)
    assert torch.equal(resize_labels(one, (3, 2), mode="purity", num_classes=4), torch.full((1, 3, 2), 3))
    empty = torch.full((2, 6, 6), 255)
    assert torch.equal(resize_labels(empty, (3, 3), mode="purity", num_classes=4), torch.full((2, 3, 3), 255))


def test_purity_with_custom_ignore_index():
    labels = torch.tensor([[[1, 1], [1, -1]]])
    got = resize_labels(labels, (1, 1), mode="purity", num_classes=2, ignore_index=-1, min_purity=0.75)
    assert got.item() == 1
    got = resize_labels(labels, (1, 1), mode="purity", num_classes=2, ignore_index=-1, min_purity=0.8)
    assert got.item() == -1


def test_resize_identity_keeps_values():
    labels = ref.random_labels(2, 5, 4, 3)
    assert torch.equal(resize_labels(labels, (5, 4)), labels)
    assert math.isclose(
        resize_labels(labels, (5, 4), mode="purity", num_classes=3).ne(labels).float().sum().item(), 0.0
    )


# ------------------------------------------------------------------------------------------------ issue 18.10
# Which row F.interpolate(mode="nearest") picks depends on the input's dtype: float32 (and float16, bfloat16,
# uint8, and every dtype on CUDA) uses a float32 scale and product; float64 on CPU uses PyTorch's generic kernel
# (scale and product in float64, rounded to float32 before the floor) when the output's H + W > 128, and the
# float32 rule below that. The oracle of every test here is F.interpolate itself.


def _interpolate_rows(out_size, in_size, dtype, other=(200, 1)):
    r"""Rows F.interpolate reads resizing an (in_size, other[1]) map of ``dtype`` to (out_size, other[0])."""
    rows, _ = ref.upsample_rows_cols((in_size, other[1]), (out_size, other[0]), dtype)
    return torch.tensor(rows)


@pytest.mark.parametrize(("out_size", "in_size"), SIZE_PAIRS + [(14, 62), (20, 84), (365, 46), (1024, 129)])
def test_nearest_source_index_per_dtype_matches_interpolate(out_size, in_size):
    for dtype in (torch.float32, torch.float64):
        assert torch.equal(nearest_source_index(out_size, in_size, dtype=dtype), _interpolate_rows(out_size, in_size, dtype))


def test_float32_and_float64_rows_differ_at_the_release_size():
    f32, f64 = nearest_source_index(730, 92), nearest_source_index(730, 92, dtype=torch.float64)
    assert (f32 != f64).nonzero().flatten().tolist() == [365]
    assert (f32[365].item(), f64[365].item()) == (45, 46)
    assert torch.equal(f64, _interpolate_rows(730, 92, torch.float64, other=(730, 92)))
    # below H + W = 129, F.interpolate's float64 output takes the float32 rows (its vectorised kernel)
    assert torch.equal(_interpolate_rows(14, 62, torch.float64, other=(114, 1)), nearest_source_index(14, 62))
    assert torch.equal(_interpolate_rows(14, 62, torch.float64, other=(115, 1)),
                       nearest_source_index(14, 62, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", [(730, 730), (730, 41), (60, 50)])
def test_label_resolution_loss_reads_interpolates_rows_in_each_dtype(dtype, size):
    # at="label" equals F.cross_entropy on F.interpolate(logits) in the features' own dtype, pixel by pixel
    from protocl import cosine_similarity_map, pixel_prototype_contrastive_loss

    g = torch.Generator().manual_seed(0)
    grid = (92, 5) if size[1] == 41 else ((92, 92) if size[0] == 730 else (7, 6))
    feats = torch.randn(1, 3, *grid, generator=g, dtype=dtype)
    protos = torch.randn(1, 4, 3, generator=g, dtype=dtype)
    labels = torch.randint(0, 4, (1, *size), generator=g)
    logits = F.interpolate(cosine_similarity_map(feats, protos) / 0.1, size=size, mode="nearest")
    expected = F.cross_entropy(logits, labels, reduction="none")
    got = pixel_prototype_contrastive_loss(feats, protos, labels, at="label", absent="min_similarity", reduction="none")
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(got, expected, **tol)
    mean = pixel_prototype_contrastive_loss(feats, protos, labels, at="label", absent="min_similarity")
    torch.testing.assert_close(mean, expected.mean(), **tol)


def test_label_resolution_loss_row_365_follows_the_dtype():
    # the test above can fail: protocl's float64 loss with float32's rows differs at row 365 of 92 -> 730
    from protocl import pixel_prototype_contrastive_loss

    g = torch.Generator().manual_seed(1)
    feats = torch.randn(1, 3, 92, 5, generator=g, dtype=torch.float64)
    protos = torch.randn(1, 4, 3, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (1, 730, 41), generator=g)
    f64 = pixel_prototype_contrastive_loss(feats, protos, labels, at="label", reduction="none")
    f32 = pixel_prototype_contrastive_loss(feats.float(), protos.float(), labels, at="label", reduction="none")
    diff = (f64 - f32.double()).abs().amax(-1)[0]
    assert diff[365] > 1e-3 and diff[torch.arange(730) != 365].max() < 1e-4


def test_label_resolution_gradcheck_at_a_float64_row():
    # protocl's float64 gradient is the gradient of its forward (F.interpolate's own float64 backward is not)
    from protocl import pixel_prototype_contrastive_loss

    g = torch.Generator().manual_seed(2)
    feats = torch.randn(1, 2, 92, 1, generator=g, dtype=torch.float64, requires_grad=True)
    protos = torch.randn(1, 3, 2, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (1, 730, 41), generator=g)
    assert torch.autograd.gradcheck(
        lambda f: pixel_prototype_contrastive_loss(f, protos, labels, at="label", reduction="sum"), (feats,),
        fast_mode=True,
    )
