"""protocl inside a plain PyTorch training loop.

A small segmentation model returns ``(features, logits)``. After a short source-only warm-up, adaptation runs
in rounds, as in the paper: at the start of each round the static pseudo labels of the whole (tiny) target set
are regenerated from the current model (class-balanced thresholds + per-image top proportion); at every step
``BidirectionalContrast`` turns them into hybrid labels and returns the bi-directional contrastive loss.

Self-contained: tiny random two-domain data, CPU, a few seconds.
Run: ``python docs/recipes/plain_pytorch_loop.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from protocl import (
    IGNORE_INDEX,
    BidirectionalContrast,
    ClassBalancedThresholds,
    entropy_loss,
    static_pseudo_label,
)

NUM_CLASSES = 4
FEATURE_DIM = 16
IMAGE_SIZE = 32


def make_domain(
    n: int, palette: torch.Tensor, *, shift: float, noise: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(n, 3, S, S)`` and train-id labels ``(n, S, S)``: 8x8 blocks of a class, coloured by class."""
    num_classes = palette.shape[0]
    cells = IMAGE_SIZE // 8
    coarse = torch.randint(0, num_classes, (n, cells, cells), generator=generator)
    labels = coarse.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2)  # n h w
    colours = rearrange(palette[labels], "n h w c -> n c h w")
    images = (1 - shift) * colours + shift + noise * torch.randn(colours.shape, generator=generator)
    labels[:, :, :2] = IGNORE_INDEX  # an unlabelled margin, like the ego-vehicle/void regions of real data
    return images, labels


class TinySegNet(nn.Module):
    """Any segmentation network works, as long as it exposes the features it classifies."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, dim, 3, stride=2, padding=1), nn.ReLU()
        )
        self.classifier = nn.Conv2d(dim, num_classes, 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(images)  # (B, D, h, w), h = H / 2
        logits = self.classifier(features)  # (B, K, h, w)
        logits = F.interpolate(
            logits, size=images.shape[-2:], mode="bilinear", align_corners=False
        )  # (B, K, H, W)
        return features, logits


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over non-ignored pixels, 0 (not NaN) when every pixel is ignored, as protocl's own losses."""
    total = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp_min(1)


@torch.no_grad()
def regenerate_static_labels(model: nn.Module, images: torch.Tensor, proportion: float = 0.2) -> torch.Tensor:
    """Static labels y_F of a whole target set: class-balanced thresholds over the set, then per image."""
    model.eval()
    thresholds = ClassBalancedThresholds(NUM_CLASSES, proportion=proportion)
    logits = [model(batch)[1] for batch in images.split(4)]
    for batch_logits in logits:
        thresholds.update(batch_logits)
    class_thresholds = thresholds.compute()
    model.train()
    return torch.cat(
        [static_pseudo_label(x, class_thresholds=class_thresholds, proportion=proportion) for x in logits]
    )


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        prediction = model(images)[1].argmax(1)
    valid = labels != IGNORE_INDEX
    return (prediction == labels)[valid].float().mean().item()


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    palette = torch.rand(NUM_CLASSES, 3, generator=generator)
    source_images, source_labels = make_domain(16, palette, shift=0.0, noise=0.05, generator=generator)
    target_images, target_gt = make_domain(8, palette, shift=0.3, noise=0.25, generator=generator)

    model = TinySegNet(NUM_CLASSES, FEATURE_DIM)
    contrast = BidirectionalContrast(NUM_CLASSES, FEATURE_DIM, fcl_weight=0.1, bcl_weight=0.1, threshold=0.7)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def sample(n: int, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(0, images.shape[0], (n,), generator=generator)
        return images[index], labels[index]

    # Stage 1: source only.
    for _ in range(30):
        images, labels = sample(2, source_images, source_labels)
        loss = cross_entropy(model(images)[1], labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"source-only: target pixel accuracy {accuracy(model, target_images, target_gt):.3f}")

    # Stage 2: adaptation in rounds; static labels regenerated at the start of every round.
    for round_index in range(2):
        static_labels = regenerate_static_labels(model, target_images)
        coverage = (static_labels != IGNORE_INDEX).float().mean().item()
        for step in range(15):
            source_batch, source_batch_labels = sample(2, source_images, source_labels)
            target_batch, target_batch_static = sample(2, target_images, static_labels)
            source_features, source_logits = model(source_batch)
            target_features, target_logits = model(target_batch)

            out = contrast(source_features, source_batch_labels, target_features, target_batch_static)
            loss = (
                cross_entropy(source_logits, source_batch_labels)
                + 0.3 * cross_entropy(target_logits, out.target_labels)  # hybrid labels y_T
                + 0.4 * (entropy_loss(source_logits) + 0.3 * entropy_loss(target_logits))
                + out.loss  # 0.1 * FCL + 0.1 * BCL
            )
            assert torch.isfinite(loss), f"non-finite loss at round {round_index} step {step}"
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        hybrid_coverage = (out.target_labels != IGNORE_INDEX).float().mean().item()
        print(
            f"round {round_index}: static coverage {coverage:.2f}, hybrid coverage (last batch) "
            f"{hybrid_coverage:.2f}, loss {loss.item():.3f}, fcl {out.fcl.item():.3f}, "
            f"bcl {out.bcl.item():.3f}, "
            f"target pixel accuracy {accuracy(model, target_images, target_gt):.3f}"
        )
    initialized = contrast.source_ema.initialized.sum().item(), contrast.target_ema.initialized.sum().item()
    print(f"EMA prototypes initialised (source, target): {initialized} of {NUM_CLASSES} classes")


if __name__ == "__main__":
    main()
