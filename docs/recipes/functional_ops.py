"""The functional operators of protocl, without the ``BidirectionalContrast`` orchestrator.

Writes out the seven steps of one adaptation step (the protocl method spec, section 3) with the functions
themselves, for when you need a step ordered differently, extra statistics or another loss. Then shows the
release-compatible loss setting and the per-pixel (``reduction="none"``) form.

Self-contained: random tensors and a tiny model, CPU, a few seconds.
Run: ``python docs/recipes/functional_ops.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from protocl import (
    IGNORE_INDEX,
    BidirectionalContrast,
    ClassBalancedThresholds,
    PrototypeEMA,
    bcl_loss,
    domain_bias_calibrate,
    dynamic_pseudo_label,
    entropy_loss,
    fcl_loss,
    hybrid_fuse,
    masked_average_pool,
    overlap_class_weight,
    static_pseudo_label,
)

K, D = 5, 12  # classes, feature channels
B, H, W = 2, 24, 24  # batch, label grid
h, w = 12, 12  # feature grid (output stride 2)


class Model(nn.Module):
    """Returns features (B, D, h, w) and logits (B, K, H, W)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, D, 3, stride=2, padding=1), nn.ReLU())
        self.classifier = nn.Conv2d(D, K, 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(images)
        logits = F.interpolate(self.classifier(features), size=(H, W), mode="bilinear", align_corners=False)
        return features, logits


def random_labels(generator: torch.Generator) -> torch.Tensor:
    labels = torch.randint(0, K, (B, H // 6, W // 6), generator=generator)
    labels = labels.repeat_interleave(6, dim=1).repeat_interleave(6, dim=2)  # (B, H, W) blocks
    labels[:, :3] = IGNORE_INDEX
    return labels


def main() -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = Model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    source_ema = PrototypeEMA(K, D, momentum=0.99)  # mu_S, buffers (K, D) + initialized (K,)
    target_ema = PrototypeEMA(K, D, momentum=0.99)  # mu_T

    # Static labels y_F of a target set: class-balanced thresholds over the set (O(K * bins) memory).
    target_set = torch.randn(6, 3, H, W, generator=generator)
    thresholds = ClassBalancedThresholds(K, proportion=0.2)
    with torch.no_grad():
        thresholds.update(model(target_set)[1])
        class_thresholds = thresholds.compute()  # (K,), +inf for a class never predicted
        static_set = static_pseudo_label(
            model(target_set)[1], class_thresholds=class_thresholds, proportion=0.2
        )
    print(f"class thresholds {[round(t, 3) for t in class_thresholds.tolist()]}")

    for step in range(5):
        source_images = torch.randn(B, 3, H, W, generator=generator)
        source_labels = random_labels(generator)  # y_S, (B, H, W)
        index = torch.randint(0, target_set.shape[0], (B,), generator=generator)
        target_images, static_labels = target_set[index], static_set[index]  # y_F, (B, H, W)
        source_features, source_logits = model(source_images)
        target_features, target_logits = model(target_images)

        # 1. per-image source prototypes p_S (B, K, D), counts (B, K); labels are resized to the feature grid.
        source = masked_average_pool(source_features, source_labels, K)
        # 2. calibrate by the classwise domain bias mu_T - mu_S (EMAs of earlier steps, 0 if not initialised).
        calibrated = domain_bias_calibrate(source.prototypes, source_ema, target_ema)
        # 3. dynamic labels y_D by matching target features to the calibrated prototypes (no gradient).
        dynamic_labels = dynamic_pseudo_label(
            target_features, calibrated, valid=source.counts > 0, threshold=0.5, size=(H, W)
        )
        # 4. hybrid labels y_T: static where available, dynamic elsewhere.
        target_labels = hybrid_fuse(static_labels, dynamic_labels, mode="fill")
        # 5. per-image target prototypes p_T from the hybrid labels.
        target = masked_average_pool(target_features, target_labels, K)
        # 6. the losses. Pass the PooledPrototypes as they come: prototypes without pixels (counts == 0) are
        # masked out of the softmax (absent="mask"). (A bare tensor works too: all-zero rows count as absent.)
        fcl = fcl_loss(target_features, source, target_labels)
        bcl = bcl_loss(source_features, target, source_labels)
        target_ce = F.cross_entropy(target_logits, target_labels, ignore_index=IGNORE_INDEX, reduction="sum")
        target_ce = target_ce / (target_labels != IGNORE_INDEX).sum().clamp_min(1)  # 0, not NaN, when empty
        loss = (
            F.cross_entropy(source_logits, source_labels, ignore_index=IGNORE_INDEX)
            + 0.3 * target_ce
            + 0.4 * (entropy_loss(source_logits) + 0.3 * entropy_loss(target_logits))
            + 0.1 * fcl
            + 0.1 * bcl
        )
        assert torch.isfinite(loss) and torch.isfinite(fcl) and torch.isfinite(bcl), (
            f"non-finite at step {step}"
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        # 7. EMA updates from the (detached) per-image prototypes, pooled by their counts.
        source_ema.update_from(source.prototypes.detach(), source.counts)
        target_ema.update_from(target.prototypes.detach(), target.counts)

        coverage = [
            (x != IGNORE_INDEX).float().mean().item() for x in (static_labels, dynamic_labels, target_labels)
        ]
        print(
            f"step {step}: loss {loss.item():.3f} fcl {fcl.item():.3f} bcl {bcl.item():.3f} | "
            f"coverage static {coverage[0]:.2f} dynamic {coverage[1]:.2f} hybrid {coverage[2]:.2f}"
        )

    bias = (target_ema.prototypes - source_ema.prototypes).norm(dim=1)
    print(f"domain bias |mu_T - mu_S| per class: {[round(b, 3) for b in bias.tolist()]}")

    # Release-compatible loss: absent prototypes at cosine -1 inside the softmax, CE at label resolution,
    # FCL and BCL both weighted by the classes present in both label maps of each (source, target) pair.
    with torch.no_grad():
        source_features, _ = model(source_images)
        target_features, _ = model(target_images)
    source = masked_average_pool(source_features, source_labels, K)
    target = masked_average_pool(target_features, target_labels, K)
    # Each label map is resized to its own feature grid: one (h, w) per map (here both grids are (h, w)).
    weight = overlap_class_weight(source_labels, target_labels, K, size=((h, w), (h, w)))  # (B, K)
    release = dict(absent="min_similarity", at="label", temperature=0.1)
    # The release averages each (source, target) pair's loss, then the pairs: one call per pair.
    # (BidirectionalContrast(release_compatible=True) does the same without the Python loop.)
    fcl_pairs, bcl_pairs = [], []
    for b in range(B):
        pair = slice(b, b + 1)
        fcl_pairs.append(
            fcl_loss(
                target_features[pair],
                source.prototypes[pair],
                target_labels[pair],
                valid=source.counts[pair] > 0,
                class_weight=weight[pair],
                **release,
            )
        )
        bcl_pairs.append(
            bcl_loss(
                source_features[pair],
                target.prototypes[pair],
                source_labels[pair],
                valid=target.counts[pair] > 0,
                class_weight=weight[pair],
                **release,
            )
        )
    fcl_release, bcl_release = torch.stack(fcl_pairs).mean(), torch.stack(bcl_pairs).mean()
    assert torch.isfinite(fcl_release) and torch.isfinite(bcl_release)
    # The same numbers from the orchestrator (dynamic=False: the hybrid labels are the labels given).
    step = BidirectionalContrast(K, D, release_compatible=True, dynamic=False)
    out = step(source_features, source_labels, target_features, target_labels, update=False)
    assert torch.allclose(out.fcl, fcl_release, atol=1e-5) and torch.allclose(out.bcl, bcl_release, atol=1e-5)
    print(f"release-compatible setting: fcl {fcl_release.item():.3f} bcl {bcl_release.item():.3f}")

    # Per-pixel losses: (B, h, w) on the feature grid (at="feature"), (B, H, W) on the label grid ("label").
    per_cell = fcl_loss(target_features, source.prototypes, target_labels, reduction="none")
    per_pixel = fcl_loss(target_features, source.prototypes, target_labels, reduction="none", at="label")
    print(f"reduction='none': at='feature' {tuple(per_cell.shape)}, at='label' {tuple(per_pixel.shape)}")
    assert per_cell.shape == (B, h, w) and per_pixel.shape == (B, H, W)

    # Other trainers' conventions: mmseg's gt_semantic_seg (B, 1, H, W), a per-pixel weight (label grid, feature
    # grid or one per image: "mean" divides by the summed weights of the contributing pixels, as F.cross_entropy
    # does), and a (K, 1) class-weight column as DASS builds it.
    gt_semantic_seg = target_labels[:, None]  # (B, 1, H, W)
    confidence = torch.rand(B, H, W, generator=generator)  # e.g. a teacher's confidence per pixel
    weighted = fcl_loss(
        target_features, source, gt_semantic_seg, pixel_weight=confidence, class_weight=torch.ones(K, 1)
    )
    per_image = fcl_loss(target_features, source, gt_semantic_seg, pixel_weight=torch.tensor([1.0, 0.5]))
    assert torch.isfinite(weighted) and torch.isfinite(per_image)
    print(f"mmseg labels {tuple(gt_semantic_seg.shape)}: fcl weighted per pixel {weighted.item():.3f}, "
          f"per image {per_image.item():.3f}")


if __name__ == "__main__":
    main()
