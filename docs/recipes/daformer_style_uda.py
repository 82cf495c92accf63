"""protocl's contrast added to a DAFormer/MIC-style mean-teacher trainer (DACS), on DAFormer's real network.

The network is the one DAFormer trains: SegFormer's MiT encoder (MiT-B0 here, random weights; DAFormer uses
MiT-B5 from ImageNet) and DAFormer's decoder (stages embedded to 256, separable-ASPP fusion, classifier), from
this repository's example package ``examples/uda`` (plain PyTorch, module names as in a DAFormer checkpoint).
The structures around it mirror DAFormer's ``DACS`` UDA decorator and mmseg's ``EncoderDecoder``, without
importing mmseg or mmcv:

- a data batch is a dict ``img``, ``img_metas``, ``gt_semantic_seg`` ``(B, 1, H, W)``, ``target_img``,
  ``target_img_metas`` (what ``UDADataset`` yields);
- the model (:class:`MiTEncoderDecoder`: ``backbone``, ``decode_head``) has ``extract_feat``,
  ``encode_decode`` (logits at image size) and
  ``forward_train(img, img_metas, gt_semantic_seg, seg_weight=None, return_feat=False)`` returning mmseg's
  loss dict (``decode.loss_seg``: the per-pixel cross-entropy times ``seg_weight``, averaged over all pixels;
  ``decode.acc_seg``) plus ``features``: the decoder's fused ``(B, 256, H/4, W/4)`` map before the
  classifier, what the contrast reads;
- the UDA wrapper keeps an EMA teacher (``_init_ema_weights``, ``_update_ema`` with
  ``alpha = min(1 - 1 / (iter + 1), 0.999)``), takes the teacher's arg max as pseudo labels weighted by
  DAFormer's ``pseudo_weight`` (the share of pixels at least ``pseudo_threshold`` confident over the whole
  batch, one number kept on the device, 0 on the ignored top/bottom rows), mixes source and target with
  ClassMix, calls ``backward`` inside ``forward_train``, sums every ``*loss*`` entry in ``_parse_losses``;
  ``train_step`` returns ``dict(log_vars=..., num_samples=...)``.

What protocl adds (from ``contrast_start`` on; SePiCo starts its contrast at 3000 of 40000 iterations):

1. The source forward's loss and fused features are **kept**: DAFormer backwards the source loss at once to
   free its graph; FCL/BCL need the source features, so the graph stays alive until one backward of source
   loss + mixed loss + contrast loss at the end (more memory: one more forward's activations).
2. **Static labels** for the contrast: the teacher's arg max where its max probability is at least
   ``pseudo_threshold``, ``IGNORE_INDEX`` elsewhere and on the ignored rows. ClassMix mixes them as it mixes
   the labels: the source's ground truth on the pasted pixels, the static labels elsewhere.
3. ``BidirectionalContrast`` on the student's source features (ground truth) and its features of the **mixed**
   image (mixed static labels): it fuses the static labels with dynamic labels from the calibrated source
   prototypes and returns ``fcl_weight * FCL + bcl_weight * BCL`` (``contrast.loss``).
4. Optionally (``HYBRID_CE = True``), the mixed cross-entropy trains on the contrast's hybrid labels where
   they label a pixel (the mixed labels elsewhere, the recipe's weights unchanged).

Everything else is DACS as it is. Left out here, unchanged by protocl: DACS's colour jitter and blur of the
mixed image, DAFormer's rare-class sampling, ImageNet feature distance, poly learning rate with warm-up, and
MIC's masked-image term (one more CE on the teacher's labels). The contrast also takes per-pixel weights
(``target_weight=``, ``source_weight=``), e.g. the mixed ``pseudo_weight``; this recipe, like protocl's
``examples/train_daformer.py``, does without: the static labels are already the confident pixels.

Self-contained: synthetic two-domain 64x64 images, 30 iterations on a CPU (under 20 s on one thread).
Run from the repository root: ``PYTHONPATH=examples python docs/recipes/daformer_style_uda.py``.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from protocl import IGNORE_INDEX, BidirectionalContrast

# DAFormer's network from this repository's example package (examples/uda: plain PyTorch, no mmseg).
try:
    from uda.daformer_head import DAFormerHead
    from uda.mit import DropPath, build_mit
except ImportError as error:
    raise SystemExit(f"expected the repository's examples/ on the path ({error}): run PYTHONPATH=examples python "
                     "docs/recipes/daformer_style_uda.py from the repository root") from None

NUM_CLASSES = 4
CHANNELS = 256  # the decode head's fused feature channels, D (DAFormer: 256)
IMAGE_SIZE = 64  # a multiple of 32, the MiT's output stride
IGNORE_ROWS = 4  # bottom rows the synthetic source labels ignore (and DAFormer's psweight_ignore_bottom here)
HYBRID_CE = False  # True: the mixed CE trains on protocl's hybrid labels where they label a pixel
IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB in [0, 255]: SegFormer's and DAFormer's img_norm_cfg
IMAGENET_STD = (58.395, 57.12, 57.375)


# ----------------------------------------------------------------------------------------------------
# Data, in the UDADataset format.
def make_domain(n, palette, *, shift, noise, prefix, generator):
    """Images ``(n, 3, S, S)`` RGB in [0, 255], labels ``(n, 1, S, S)`` (mmseg keeps a channel axis) and
    ``img_metas``: 8x8-pixel cells of a class, coloured by class, then shifted and noised."""
    cells = IMAGE_SIZE // 8
    coarse = torch.randint(0, palette.shape[0], (n, cells, cells), generator=generator)
    labels = coarse.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2)  # n h w
    colours = rearrange(palette[labels], "n h w c -> n c h w")
    images = (1 - shift) * colours + shift + noise * torch.randn(colours.shape, generator=generator)
    images = 255 * images.clamp(0, 1)
    labels[:, -IGNORE_ROWS:, :] = IGNORE_INDEX
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
# DAFormer's network as an mmseg-like EncoderDecoder.
class MiTEncoderDecoder(nn.Module):
    """MiT encoder (``backbone``) + DAFormer's decoder (``decode_head``), with mmseg's ``EncoderDecoder``
    interface.

    Images are RGB in [0, 255]; ``extract_feat`` normalises them with the ImageNet mean and std (mmseg does
    it in the data pipeline's ``Normalize``, so DAFormer's batches arrive normalised; ClassMix mixing raw
    pixels is the same as mixing normalised ones, the normalisation being a per-channel affine map).
    """

    def __init__(self, arch="mit-b0", num_classes=NUM_CLASSES, channels=CHANNELS, drop_path=0.1):
        super().__init__()
        self.backbone = build_mit(arch, drop_path=drop_path)
        self.decode_head = DAFormerHead(
            self.backbone.out_channels, num_classes, embed_dim=channels, channels=channels
        )
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def extract_feat(self, img):
        """The encoder's four stage maps (strides 4, 8, 16, 32) of RGB images in [0, 255]."""
        return self.backbone((img - self.pixel_mean) / self.pixel_std)

    def decode(self, img):
        """``(logits (B, K, H/4, W/4), fused features (B, 256, H/4, W/4))``."""
        return self.decode_head(self.extract_feat(img))

    def encode_decode(self, img, img_metas):
        logits, _ = self.decode(img)
        return F.interpolate(logits, size=img.shape[2:], mode="bilinear", align_corners=False)

    @staticmethod
    def losses(seg_logits, gt_semantic_seg, seg_weight=None):
        """mmseg's decode-head losses: logits resized to the labels, per-pixel CE (0 where ignored) times
        ``seg_weight``, averaged over **all** pixels (mmseg 0.16's mean, as DAFormer trains)."""
        size = gt_semantic_seg.shape[2:]
        logits = F.interpolate(seg_logits, size=size, mode="bilinear", align_corners=False)
        labels = gt_semantic_seg.squeeze(1)
        pixel_loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
        if seg_weight is not None:
            pixel_loss = pixel_loss * seg_weight
        valid = labels != IGNORE_INDEX
        accuracy = ((logits.argmax(1) == labels) & valid).sum() / valid.sum().clamp_min(1) * 100
        return {"decode.loss_seg": pixel_loss.mean(), "decode.acc_seg": accuracy.detach()}

    def forward_train(self, img, img_metas, gt_semantic_seg, seg_weight=None, return_feat=False):
        logits, features = self.decode(img)
        losses = self.losses(logits, gt_semantic_seg, seg_weight)
        if return_feat:
            losses["features"] = features  # the decoder's fused map: what protocl contrasts
        return losses


# ----------------------------------------------------------------------------------------------------
# The UDA decorator: DACS's mean teacher and ClassMix + protocl.
def class_mix_mask(labels, generator):
    """DACS's ClassMix masks ``(B, 1, H, W)`` (float) from source labels ``(B, 1, H, W)``: for each image,
    half of its label values (rounded up, the ignore id included when present, as DACS) chosen at random; 1
    where the pixel's label is chosen. ``torch.unique`` reads the labels back to the host, as DACS's
    ``get_class_masks`` does (``uda.mix.class_mix_masks`` in the example package is a sync-free version)."""
    masks = []
    for label in labels:
        classes = torch.unique(label)
        chosen = torch.randperm(classes.numel(), generator=generator)[: (classes.numel() + 1) // 2]
        masks.append(torch.isin(label, classes[chosen.to(classes.device)]))
    return torch.stack(masks).float()


def add_prefix(losses, prefix):
    return {f"{prefix}.{name}": value for name, value in losses.items()}


class ProtoCLDACS(nn.Module):
    def __init__(
        self, model, *, alpha=0.999, pseudo_threshold=0.968, psweight_ignore_top=0, psweight_ignore_bottom=0,
        fcl_weight=0.1, bcl_weight=0.1, contrast_start=0, seed=0,
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
        self.contrast_start = contrast_start
        self.generator = torch.Generator().manual_seed(seed)  # ClassMix's draws (DACS: numpy's global RNG)
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
        # mmcv's convention: the logged values are read back to the host here (one sync each); nothing else in
        # the step reads a device value.
        return loss, OrderedDict((name, value.item()) for name, value in log_vars.items())

    def train_step(self, data_batch, optimizer):
        optimizer.zero_grad()
        log_vars = self(**data_batch)
        optimizer.step()
        log_vars.pop("loss", None)
        return dict(log_vars=log_vars, num_samples=len(data_batch["img_metas"]))

    def forward(self, img, img_metas, return_loss=True, **kwargs):  # mmseg's BaseSegmentor.forward
        return self.forward_train(img, img_metas, **kwargs)

    def forward_train(self, img, img_metas, gt_semantic_seg, target_img, target_img_metas):
        if self.local_iter == 0:
            self._init_ema_weights()
        else:
            self._update_ema(self.local_iter)
        log_vars = {}
        joint = self.local_iter >= self.contrast_start  # a host integer: no sync

        # Source: supervised loss, and the fused features for the contrast.
        src_losses = self.get_model().forward_train(img, img_metas, gt_semantic_seg, return_feat=True)
        src_feat = src_losses.pop("features")
        src_loss, src_log_vars = self._parse_losses(src_losses)
        log_vars.update(src_log_vars)
        if not joint:
            src_loss.backward()  # DAFormer: at once, freeing the source graph before the target's
        # (joint: the graph is kept, FCL/BCL need src_feat; one backward at the end. More memory.)

        # Teacher: pseudo labels (arg max) and DAFormer's pseudo_weight, one share for the whole batch
        # (DAFormer reads it with .item(); kept on the device here), 0 on the ignored top/bottom rows.
        # protocl's static labels: the confident arg max, IGNORE_INDEX elsewhere and on the ignored rows.
        with torch.no_grad():
            for m in self.get_ema_model().modules():  # DAFormer: no dropout or drop path in the teacher
                if isinstance(m, (nn.Dropout, nn.Dropout2d, DropPath)):
                    m.training = False
            ema_logits = self.get_ema_model().encode_decode(target_img, target_img_metas)
            pseudo_prob, pseudo_label = torch.softmax(ema_logits, dim=1).max(dim=1)  # (B, H, W)
            ps_large_p = pseudo_prob >= self.pseudo_threshold
            pseudo_weight = ps_large_p.float().mean() * torch.ones_like(pseudo_prob)
            height = pseudo_prob.shape[1]
            rows = torch.arange(height, device=img.device)
            kept_rows = (rows >= self.psweight_ignore_top) & (rows < height - self.psweight_ignore_bottom)
            pseudo_weight = pseudo_weight * kept_rows[:, None]
            static_label = torch.where(ps_large_p & kept_rows[:, None], pseudo_label, IGNORE_INDEX)

            # ClassMix (DACS): half of each source image's classes pasted on its target image. DACS follows
            # with colour jitter and Gaussian blur of the mixed image (unchanged by protocl, left out here).
            mix_masks = class_mix_mask(gt_semantic_seg, self.generator)  # (B, 1, H, W)
            pasted = mix_masks.bool()
            mixed_img = mix_masks * img + (1 - mix_masks) * target_img
            mixed_lbl = torch.where(pasted, gt_semantic_seg, pseudo_label[:, None])  # (B, 1, H, W)
            mixed_weight = torch.where(pasted[:, 0], 1.0, pseudo_weight)  # (B, H, W)
            mixed_static = torch.where(pasted, gt_semantic_seg, static_label[:, None])  # protocl's

        # Student on the mixed images. DAFormer calls forward_train(mixed_img, img_metas, mixed_lbl,
        # pseudo_weight, return_feat=True); split here into decode + losses, since with HYBRID_CE the CE's
        # labels come from the contrast, which needs the features first.
        mix_logits, mix_feat = self.get_model().decode(mixed_img)
        if joint:
            # protocl: hybrid labels + bi-directional contrast (+ EMA prototype update), one call. mmseg's
            # (B, 1, H, W) label maps go in as they are.
            out = self.contrast(src_feat, gt_semantic_seg, mix_feat, mixed_static)
            if HYBRID_CE:
                hybrid = out.target_labels[:, None]  # (B, 1, H, W)
                mixed_lbl = torch.where(hybrid != IGNORE_INDEX, hybrid, mixed_lbl)
            contrast_losses = {
                "contrast.loss": out.loss,  # fcl_weight * FCL + bcl_weight * BCL
                "contrast.fcl": out.fcl.detach(),
                "contrast.bcl": out.bcl.detach(),
                "contrast.hybrid_coverage": out.stats["hybrid_coverage"],
            }
        else:  # before contrast_start: no contrast term (logged as 0)
            zero = torch.zeros((), device=img.device)
            contrast_losses = dict.fromkeys(
                ("contrast.loss", "contrast.fcl", "contrast.bcl", "contrast.hybrid_coverage"), zero
            )
        mix_losses = add_prefix(self.get_model().losses(mix_logits, mixed_lbl, mixed_weight), "mix")
        loss, mix_log_vars = self._parse_losses(
            {**mix_losses, **contrast_losses, "pseudo_weight": pseudo_weight.amax()}
        )
        log_vars.update(mix_log_vars)
        if joint:
            loss = loss + src_loss
        loss.backward()  # one backward: (source +) mixed CE (+ contrast)
        self.local_iter += 1
        return log_vars


def main():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    palette = torch.rand(NUM_CLASSES, 3, generator=generator)
    source = make_domain(16, palette, shift=0.0, noise=0.05, prefix="gta", generator=generator)
    target = make_domain(16, palette, shift=0.3, noise=0.25, prefix="cityscapes", generator=generator)

    # DAFormer's pseudo_threshold is 0.968; a from-scratch MiT-B0 is never that confident in 30 iterations, so
    # the demo uses 0.8 (with 0.968 the static labels stay empty: protocl's losses stay finite, and the hybrid
    # labels come from the dynamic labels alone).
    # psweight_ignore_bottom: DAFormer zeroes the weight of rows it distrusts (Cityscapes: top 15, bottom
    # 120); here the bottom rows, which the synthetic source labels ignore.
    # contrast_start: SePiCo starts its contrast at 3000 of 40000 iterations; here at 10 of 30.
    uda = ProtoCLDACS(
        MiTEncoderDecoder("mit-b0"),
        pseudo_threshold=0.8,
        psweight_ignore_bottom=IGNORE_ROWS,
        contrast_start=10,
    )
    # DAFormer's AdamW: lr 6e-5 for the encoder, 10x for the decoder, weight decay 0.01; this from-scratch
    # demo uses 10x that lr (6e-4, decoder 6e-3) and no poly schedule.
    model = uda.get_model()
    optimizer = torch.optim.AdamW(
        [
            {"params": model.backbone.parameters(), "lr": 6e-4},
            {"params": model.decode_head.parameters(), "lr": 6e-3},
        ],
        betas=(0.9, 0.999),
        weight_decay=0.01,
    )
    batches = uda_batches(source, target, batch_size=2, generator=generator)
    max_iters = 30
    for iteration in range(1, max_iters + 1):
        outputs = uda.train_step(next(batches), optimizer)
        log_vars = outputs["log_vars"]
        for name, value in log_vars.items():
            assert torch.isfinite(torch.tensor(value)), f"{name} is not finite at iter {iteration}"
        if iteration % 10 == 0:  # mmcv's TextLoggerHook format
            text = ", ".join(f"{name}: {value:.4f}" for name, value in log_vars.items())
            print(f"Iter [{iteration}/{max_iters}] {text}")

    teacher = uda.get_ema_model().eval()
    with torch.no_grad():
        prediction = teacher.encode_decode(target[0], target[2]).argmax(1)
    labels = target[1].squeeze(1)
    valid = labels != IGNORE_INDEX
    print(
        f"teacher pixel accuracy on the target set: {(prediction == labels)[valid].float().mean().item():.3f}"
    )


if __name__ == "__main__":
    main()
