"""protocl inside a DAFormer/mmseg-style UDA step (mean teacher, DACS-like), without importing mmseg.

The structures mirror DAFormer's ``DACS`` UDA decorator and mmseg's ``EncoderDecoder``:

- a data batch is a dict ``img``, ``img_metas``, ``gt_semantic_seg`` ``(B, 1, H, W)``, ``target_img``,
  ``target_img_metas`` (what ``UDADataset`` yields);
- the model has ``extract_feat``, ``encode_decode`` and ``forward_train(..., return_feat=True)`` returning a
  dict of losses (``decode.loss_seg``, ``decode.acc_seg``) plus ``features``;
- the UDA wrapper keeps an EMA "teacher" copy (``_init_ema_weights``, ``_update_ema`` with
  ``alpha = min(1 - 1 / (iter + 1), 0.99)``), turns its confident predictions into pseudo labels, calls
  ``backward`` inside ``forward_train`` and sums every ``*loss*`` entry in ``_parse_losses``; ``train_step``
  returns ``dict(log_vars=..., num_samples=...)``.

What protocl adds: the teacher's thresholded predictions are the **static** labels; ``BidirectionalContrast``
fuses them with dynamic labels from the calibrated source prototypes and returns FCL + BCL; the student's
target cross-entropy is trained on the hybrid labels. mmseg's conventions go in as they are: the
``gt_semantic_seg`` ``(B, 1, H, W)`` label map, and DAFormer's per-pixel ``pseudo_weight`` (the share of
confident teacher pixels over the whole batch, one number as DAFormer's ``ps_large_p.sum() / ps_size``, 0 on the
ignored top/bottom rows, ``psweight_ignore_top`` / ``psweight_ignore_bottom``) weights the target pixels of FCL
(``target_weight=``) as it weights DAFormer's pseudo-label CE. protocl's "mean" divides by the summed weights of
the contributing pixels (``F.cross_entropy``'s weighted mean), so the batch's share cancels out of FCL and only
the per-pixel shape of the weight (which rows count) matters; DAFormer's own CE divides by the
pixel count instead, which this recipe keeps for its target CE. (DACS also mixes images with ClassMix; that part is
unchanged by protocl and left out here: mix with ``out.target_labels`` where DACS mixes with the teacher's
argmax.)

Self-contained: tiny random two-domain data, CPU, a few seconds.
Run: ``python docs/recipes/daformer_style_uda.py``.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from protocl import IGNORE_INDEX, BidirectionalContrast, static_pseudo_label

NUM_CLASSES = 4
CHANNELS = 16  # the decode head's fused feature channels, D
IMAGE_SIZE = 32


# ----------------------------------------------------------------------------------------------------
# Data, in the UDADataset format.
def make_domain(n, palette, *, shift, noise, prefix, generator):
    """Images ``(n, 3, S, S)``, labels ``(n, 1, S, S)`` (mmseg keeps a channel axis) and ``img_metas``."""
    cells = IMAGE_SIZE // 8
    coarse = torch.randint(0, palette.shape[0], (n, cells, cells), generator=generator)
    labels = coarse.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2)  # n h w
    colours = rearrange(palette[labels], "n h w c -> n c h w")
    images = (1 - shift) * colours + shift + noise * torch.randn(colours.shape, generator=generator)
    labels[:, -2:, :] = IGNORE_INDEX
    metas = [
        dict(
            filename=f"{prefix}_{i:04d}.png",
            ori_shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
            img_shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
            pad_shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
            flip=False,
        )
        for i in range(n)
    ]
    return images, rearrange(labels, "n h w -> n 1 h w"), metas


def uda_batches(source, target, *, batch_size, generator):
    """Yields what DAFormer's ``UDADataset`` + collate give the model: one dict per iteration."""
    (source_images, source_labels, source_metas), (target_images, _, target_metas) = source, target
    while True:
        s = torch.randint(0, source_images.shape[0], (batch_size,), generator=generator)
        t = torch.randint(0, target_images.shape[0], (batch_size,), generator=generator)
        yield dict(
            img=source_images[s],
            img_metas=[source_metas[i] for i in s.tolist()],
            gt_semantic_seg=source_labels[s],
            target_img=target_images[t],
            target_img_metas=[target_metas[i] for i in t.tolist()],
        )


# ----------------------------------------------------------------------------------------------------
# A tiny mmseg-like EncoderDecoder.
class TinyHead(nn.Module):
    """Fuses multi-level features (like DAFormer's head) and classifies them (``cls_seg``)."""

    def __init__(self, in_channels=(8, 16), channels=CHANNELS, num_classes=NUM_CLASSES):
        super().__init__()
        self.fuse_layer = nn.Sequential(nn.Conv2d(sum(in_channels), channels, 1), nn.ReLU())
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, inputs, return_feat=False):
        size = inputs[-1].shape[-2:]
        fused = torch.cat([F.adaptive_avg_pool2d(x, size) for x in inputs], dim=1)
        features = self.fuse_layer(fused)  # (B, D, H/4, W/4): the features protocl contrasts
        logits = self.conv_seg(features)
        return (logits, features) if return_feat else logits


class TinyEncoderDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())  # 1/2
        self.stage2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())  # 1/4
        self.decode_head = TinyHead()

    def extract_feat(self, img):
        c1 = self.stage1(img)
        return [c1, self.stage2(c1)]

    def encode_decode(self, img, img_metas):
        logits = self.decode_head(self.extract_feat(img))
        return F.interpolate(logits, size=img.shape[2:], mode="bilinear", align_corners=False)

    def forward_train(self, img, img_metas, gt_semantic_seg, seg_weight=None, return_feat=False):
        logits, features = self.decode_head(self.extract_feat(img), return_feat=True)
        logits = F.interpolate(logits, size=gt_semantic_seg.shape[2:], mode="bilinear", align_corners=False)
        labels = gt_semantic_seg.squeeze(1)
        pixel_loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
        if seg_weight is not None:
            pixel_loss = pixel_loss * seg_weight
        valid = labels != IGNORE_INDEX
        # mmseg averages over non-ignored pixels; the clamp keeps an all-ignored batch at 0 instead of NaN.
        losses = {"decode.loss_seg": pixel_loss.sum() / valid.sum().clamp_min(1)}
        losses["decode.acc_seg"] = (
            ((logits.argmax(1) == labels) & valid).sum() / valid.sum().clamp_min(1) * 100
        )
        if return_feat:
            losses["features"] = features
        return losses


# ----------------------------------------------------------------------------------------------------
# The UDA decorator: DACS's mean teacher + protocl.
class ProtoCLDACS(nn.Module):
    def __init__(
        self, model, *, alpha=0.99, pseudo_threshold=0.968, psweight_ignore_top=0, psweight_ignore_bottom=0,
        fcl_weight=0.1, bcl_weight=0.1,
    ):
        super().__init__()
        self.model = model
        self.ema_model = copy.deepcopy(model)
        self.alpha = alpha
        self.pseudo_threshold = pseudo_threshold
        self.psweight_ignore_top = psweight_ignore_top
        self.psweight_ignore_bottom = psweight_ignore_bottom
        self.contrast = BidirectionalContrast(
            NUM_CLASSES, CHANNELS, fcl_weight=fcl_weight, bcl_weight=bcl_weight
        )
        self.local_iter = 0

    def get_model(self):
        return self.model

    def get_ema_model(self):
        return self.ema_model

    def _init_ema_weights(self):
        for param in self.get_ema_model().parameters():
            param.detach_()
        for ema_param, param in zip(self.get_ema_model().parameters(), self.get_model().parameters()):
            ema_param.data.copy_(param.data)

    def _update_ema(self, iteration):
        alpha_teacher = min(1 - 1 / (iteration + 1), self.alpha)
        for ema_param, param in zip(self.get_ema_model().parameters(), self.get_model().parameters()):
            ema_param.data.mul_(alpha_teacher).add_(param.data, alpha=1 - alpha_teacher)

    @staticmethod
    def _parse_losses(losses):
        log_vars = OrderedDict((name, value.mean()) for name, value in losses.items())
        loss = sum(value for name, value in log_vars.items() if "loss" in name)
        log_vars["loss"] = loss
        return loss, OrderedDict((name, value.item()) for name, value in log_vars.items())

    def train_step(self, data_batch, optimizer):
        optimizer.zero_grad()
        log_vars = self(**data_batch)
        optimizer.step()
        log_vars.pop("loss", None)
        return dict(log_vars=log_vars, num_samples=len(data_batch["img_metas"]))

    def forward(self, img, img_metas, gt_semantic_seg, target_img, target_img_metas):
        if self.local_iter == 0:
            self._init_ema_weights()
        else:
            self._update_ema(self.local_iter)
        log_vars = {}

        # Source: supervised loss; keep the features for the contrast.
        source_out = self.get_model().forward_train(img, img_metas, gt_semantic_seg, return_feat=True)
        source_features = source_out.pop("features")

        # Teacher: static pseudo labels y_F = confident predictions (DACS: max prob >= pseudo_threshold), and
        # DAFormer's pseudo_weight: the share of confident pixels over the whole batch (one number, kept on the
        # device), 0 on the ignored top/bottom rows.
        with torch.no_grad():
            ema_logits = self.get_ema_model().encode_decode(target_img, target_img_metas)
            thresholds = torch.full((NUM_CLASSES,), self.pseudo_threshold)
            static_labels = static_pseudo_label(ema_logits, class_thresholds=thresholds, proportion=0.0)
            confident = (static_labels != IGNORE_INDEX).float()  # (B, H, W)
            pseudo_weight = confident.mean() * torch.ones_like(confident)
            if self.psweight_ignore_top > 0:
                pseudo_weight[:, : self.psweight_ignore_top, :] = 0
            if self.psweight_ignore_bottom > 0:
                pseudo_weight[:, -self.psweight_ignore_bottom :, :] = 0

        # Student on the target image: features for the contrast, logits for the pseudo-label CE.
        student = self.get_model()
        target_logits, target_features = student.decode_head(
            student.extract_feat(target_img), return_feat=True
        )
        target_logits = F.interpolate(
            target_logits, size=target_img.shape[2:], mode="bilinear", align_corners=False
        )

        # protocl: hybrid labels + bi-directional contrast (+ EMA prototype update), one call. mmseg's
        # gt_semantic_seg (B, 1, H, W) goes in as it is; pseudo_weight (B, H, W) weights FCL's target pixels.
        out = self.contrast(source_features, gt_semantic_seg, target_features, static_labels, target_weight=pseudo_weight)
        hybrid = out.target_labels  # (B, H, W)
        # DAFormer's pseudo-label CE: per-pixel CE times pseudo_weight, averaged over all pixels (mmseg's mean).
        labelled = hybrid != IGNORE_INDEX
        target_ce = F.cross_entropy(target_logits, hybrid, ignore_index=IGNORE_INDEX, reduction="none")
        losses = {
            **source_out,
            "target.loss_seg": (target_ce * pseudo_weight).mean(),
            "contrast.loss": out.loss,  # fcl_weight * FCL + bcl_weight * BCL
        }
        loss, log_vars = self._parse_losses(losses)
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss at iteration {self.local_iter}: {log_vars}")
        loss.backward()
        log_vars.update(
            {
                "contrast.fcl": out.fcl.item(),
                "contrast.bcl": out.bcl.item(),
                "static_coverage": (static_labels != IGNORE_INDEX).float().mean().item(),
                "hybrid_coverage": labelled.float().mean().item(),
                "pseudo_weight": pseudo_weight.mean().item(),
            }
        )
        self.local_iter += 1
        return log_vars


def main():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    palette = torch.rand(NUM_CLASSES, 3, generator=generator)
    source = make_domain(16, palette, shift=0.0, noise=0.05, prefix="gta", generator=generator)
    target = make_domain(16, palette, shift=0.3, noise=0.25, prefix="cityscapes", generator=generator)

    # DAFormer's pseudo_threshold is 0.968; the tiny model of this recipe is never that confident in 60
    # iterations, so the demo uses 0.8 (with 0.968 the static labels stay empty: protocl's losses stay finite,
    # and the hybrid labels come from the dynamic labels alone).
    # psweight_ignore_bottom: DAFormer zeroes the weight of rows it distrusts (the ego car on Cityscapes); here
    # the last two rows, which the synthetic source labels ignore.
    uda = ProtoCLDACS(TinyEncoderDecoder(), pseudo_threshold=0.8, psweight_ignore_bottom=2)
    optimizer = torch.optim.AdamW(uda.get_model().parameters(), lr=1e-2)
    batches = uda_batches(source, target, batch_size=2, generator=generator)
    max_iters = 60
    for iteration in range(1, max_iters + 1):
        outputs = uda.train_step(next(batches), optimizer)
        log_vars = outputs["log_vars"]
        for name in ("decode.loss_seg", "target.loss_seg", "contrast.loss"):
            assert torch.isfinite(torch.tensor(log_vars[name])), f"{name} is not finite at iter {iteration}"
        if iteration % 10 == 0:  # mmcv's TextLoggerHook format
            text = ", ".join(f"{name}: {value:.4f}" for name, value in log_vars.items())
            print(f"Iter [{iteration}/{max_iters}] {text}")

    with torch.no_grad():
        prediction = uda.get_ema_model().encode_decode(target[0], target[2]).argmax(1)
    labels = target[1].squeeze(1)
    valid = labels != IGNORE_INDEX
    print(
        f"teacher pixel accuracy on the target set: {(prediction == labels)[valid].float().mean().item():.3f}"
    )


if __name__ == "__main__":
    main()
