"""protocl inside a Lightning-style module.

``ProtoCLModule`` is a ``LightningModule`` when ``lightning`` (or ``pytorch_lightning``) is importable, and
is then trained by ``lightning.pytorch.Trainer``. Without Lightning, the same class derives from a minimal
stand-in and a plain loop calls the same hooks in Lightning's order (``configure_optimizers``,
``on_train_epoch_start``, ``training_step``, optimizer and scheduler steps, ``on_train_epoch_end``), so the
recipe runs either way.

One epoch is one round of the method: epoch 0 trains on the source only; every later epoch starts by
regenerating the static pseudo labels of the whole target set (``on_train_epoch_start``), stored in a buffer
so that they are part of the checkpoint; every step fuses them with dynamic labels and adds FCL + BCL.
``BidirectionalContrast`` keeps its EMA prototypes in buffers too: checkpoints, ``.to(device)`` and DDP need
no extra code (with ``strategy="ddp"``, its prototypes and the histograms of ``ClassBalancedThresholds`` are
all-reduced across ranks).

Self-contained: tiny random two-domain data, CPU, a few seconds.
Run: ``python docs/recipes/lightning_module.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from protocl import (
    IGNORE_INDEX,
    BidirectionalContrast,
    ClassBalancedThresholds,
    entropy_loss,
    static_pseudo_label,
)

try:
    import lightning.pytorch as pl
except ImportError:
    try:
        import pytorch_lightning as pl
    except ImportError:
        pl = None

NUM_CLASSES = 4
FEATURE_DIM = 16
IMAGE_SIZE = 32


class _MiniLightningModule(nn.Module):
    """The part of ``LightningModule`` this recipe uses, for running it without Lightning."""

    def __init__(self) -> None:
        super().__init__()
        self.current_epoch = 0
        self.logged: dict[str, float] = {}

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def log(self, name: str, value: torch.Tensor | float, **kwargs: object) -> None:
        self.logged[name] = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)

    def log_dict(self, values: dict[str, torch.Tensor], **kwargs: object) -> None:
        for name, value in values.items():
            self.log(name, value, **kwargs)


LightningModule = pl.LightningModule if pl is not None else _MiniLightningModule


# ----------------------------------------------------------------------------------------------------
# Data and model.
def make_domain(n: int, palette: torch.Tensor, *, shift: float, noise: float, generator: torch.Generator):
    cells = IMAGE_SIZE // 8
    coarse = torch.randint(0, palette.shape[0], (n, cells, cells), generator=generator)
    labels = coarse.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2)  # n h w
    colours = rearrange(palette[labels], "n h w c -> n c h w")
    images = (1 - shift) * colours + shift + noise * torch.randn(colours.shape, generator=generator)
    return images, labels


class PairedDomains(Dataset):
    """One item = a source image and label, a target image and its index (to look up its static labels)."""

    def __init__(self, source: tuple[torch.Tensor, torch.Tensor], target_images: torch.Tensor, length: int):
        self.source_images, self.source_labels = source
        self.target_images = target_images
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        s, t = i % len(self.source_images), (7 * i) % len(self.target_images)
        return self.source_images[s], self.source_labels[s], self.target_images[t], t


class TinySegNet(nn.Module):
    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, dim, 3, stride=2, padding=1), nn.ReLU()
        )
        self.classifier = nn.Conv2d(dim, num_classes, 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(images)  # (B, D, h, w)
        logits = F.interpolate(
            self.classifier(features), size=images.shape[-2:], mode="bilinear", align_corners=False
        )
        return features, logits


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over non-ignored pixels; 0 (not NaN) when every pixel is ignored."""
    total = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp_min(1)


# ----------------------------------------------------------------------------------------------------
# The module.
class ProtoCLModule(LightningModule):
    def __init__(
        self,
        target_set: TensorDataset,
        *,
        num_classes: int = NUM_CLASSES,
        dim: int = FEATURE_DIM,
        source_only_epochs: int = 1,
        lr: float = 0.05,
        total_steps: int = 100,
        proportion: float = 0.2,
    ) -> None:
        super().__init__()
        self.model = TinySegNet(num_classes, dim)
        self.contrast = BidirectionalContrast(num_classes, dim, fcl_weight=0.1, bcl_weight=0.1, threshold=0.7)
        self.target_set = target_set
        self.num_classes, self.source_only_epochs = num_classes, source_only_epochs
        self.lr, self.total_steps, self.proportion = lr, total_steps, proportion
        (target_images,) = target_set.tensors
        # The static labels y_F of every target image: a buffer, so they are saved with the checkpoint.
        self.register_buffer(
            "static_labels", torch.full((len(target_images), *target_images.shape[-2:]), 255)
        )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(images)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)
        poly = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (1 - step / self.total_steps) ** 0.9)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": poly, "interval": "step"}}

    @torch.no_grad()
    def on_train_epoch_start(self) -> None:
        """Start of a round: regenerate the static labels of the whole target set with the current model."""
        if self.current_epoch < self.source_only_epochs:
            return
        was_training = self.model.training
        self.model.eval()
        thresholds = ClassBalancedThresholds(self.num_classes, proportion=self.proportion).to(self.device)
        loader = DataLoader(self.target_set, batch_size=4)
        logits = [self.model(images.to(self.device))[1] for (images,) in loader]
        for batch_logits in logits:
            thresholds.update(batch_logits)
        class_thresholds = thresholds.compute()
        labels = [
            static_pseudo_label(x, class_thresholds=class_thresholds, proportion=self.proportion)
            for x in logits
        ]
        self.static_labels.copy_(torch.cat(labels))
        self.model.train(was_training)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        source_images, source_labels, target_images, target_index = batch
        source_features, source_logits = self.model(source_images)
        source_ce = cross_entropy(source_logits, source_labels)
        self.log("train/source_ce", source_ce.detach())
        if self.current_epoch < self.source_only_epochs:
            return source_ce

        target_features, target_logits = self.model(target_images)
        out = self.contrast(source_features, source_labels, target_features, self.static_labels[target_index])
        target_ce = cross_entropy(target_logits, out.target_labels)
        entropy = entropy_loss(source_logits) + 0.3 * entropy_loss(target_logits)
        loss = source_ce + 0.3 * target_ce + 0.4 * entropy + out.loss
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss at epoch {self.current_epoch}, batch {batch_idx}")
        self.log_dict(
            {
                "train/loss": loss.detach(),
                "train/fcl": out.fcl.detach(),
                "train/bcl": out.bcl.detach(),
                "train/target_ce": target_ce.detach(),
                "train/hybrid_coverage": (out.target_labels != IGNORE_INDEX).float().mean(),
            }
        )
        return loss

    def on_train_epoch_end(self) -> None:
        coverage = (self.static_labels != IGNORE_INDEX).float().mean().item()
        logged = self.logged if pl is None else self.trainer.callback_metrics
        text = ", ".join(f"{name} {float(value):.3f}" for name, value in sorted(logged.items()))
        print(f"epoch {self.current_epoch}: static coverage {coverage:.2f} | {text}")


# ----------------------------------------------------------------------------------------------------
# Training: Lightning's Trainer when available, else a plain loop calling the same hooks.
def fit_without_lightning(module: ProtoCLModule, loader: DataLoader, max_epochs: int) -> None:
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    module.train()
    for epoch in range(max_epochs):
        module.current_epoch = epoch
        module.on_train_epoch_start()
        for batch_idx, batch in enumerate(loader):
            loss = module.training_step(batch, batch_idx)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        module.on_train_epoch_end()


def main() -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    palette = torch.rand(NUM_CLASSES, 3, generator=generator)
    source = make_domain(16, palette, shift=0.0, noise=0.05, generator=generator)
    target_images, target_gt = make_domain(8, palette, shift=0.3, noise=0.25, generator=generator)

    max_epochs, steps_per_epoch, batch_size = 3, 12, 2
    loader = DataLoader(
        PairedDomains(source, target_images, steps_per_epoch * batch_size),
        batch_size=batch_size,
        shuffle=True,
    )
    module = ProtoCLModule(TensorDataset(target_images), total_steps=max_epochs * steps_per_epoch)
    if pl is not None:
        print(f"training with Lightning {pl.__version__}")
        trainer = pl.Trainer(
            max_epochs=max_epochs,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, loader)
    else:
        print("lightning is not installed: training with the plain loop that calls the same hooks")
        fit_without_lightning(module, loader, max_epochs)

    module.eval()
    with torch.no_grad():
        prediction = module(target_images)[1].argmax(1)
    print(f"target pixel accuracy: {(prediction == target_gt).float().mean().item():.3f}")
    state = module.state_dict()
    assert "contrast.source_ema.prototypes" in state and "static_labels" in state  # all state is checkpointed
    print(f"checkpointed state: {len(state)} tensors, including the EMA prototypes and the static labels")


if __name__ == "__main__":
    main()
