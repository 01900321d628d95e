"""SegmentationTask: Segmenter-style semantic segmentation whose ViT encoder merges and then unmerges tokens."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from dtem_lightning import flops, stats
from dtem_lightning.io import save_image, write_csv
from dtem_lightning.labelmaps import IGNORE_INDEX, colorize, default_palette
from dtem_lightning.tasks.base import BaseTask
from dtem_lightning.tasks.decoders import DECODERS, LinearDecoder, MaskTransformer


class SegmentationTask(BaseTask):
    """Semantic segmentation (Segmenter) with a merging ViT encoder.

    Modifications of the plain Segmenter forward: the encoder traces sources (``trace_source`` is switched on
    for the task's policy and every test policy), and :meth:`~dtem_lightning.encoder.Encoded.patch_grid` copies
    every merged token back to each patch it covers, so the decoder always sees the full h × w patch grid. The
    encoder is created with ``dynamic_img_size=True``: any input side divisible by the patch size works
    (position embeddings resampled the timm way); other sizes are padded. Evaluation images larger than the
    window (``window_size``, default the training crop) are segmented with overlapping sliding windows whose
    logits are averaged.

    Args:
        num_classes: classes (linked from the data module by the CLI).
        decoder: ``linear`` or ``mask_transformer``.
        decoder_dim: mask transformer width (None: the encoder's).
        decoder_depth: mask transformer blocks.
        decoder_heads: mask transformer heads (None: the encoder's).
        decoder_dropout: mask transformer dropout.
        decoder_drop_path: mask transformer stochastic depth.
        ignore_label: label excluded from the loss and the metrics (the data modules map their
            ``ignore_index`` to 255; named apart so the two hyper-parameters never clash).
        window_size: sliding-window side at evaluation (None: ``img_size``, the training crop).
        window_stride: sliding-window stride (None: 2/3 of the window, rounded to the patch size; capped at
            the window).
        class_names: names for per-class IoU (default: the data module's, else ``class_<i>``).
        **kwargs: see :class:`~dtem_lightning.tasks.base.BaseTask`.
    """

    def __init__(
        self,
        num_classes: int = 150,
        decoder: str = "mask_transformer",
        decoder_dim: int | None = None,
        decoder_depth: int = 2,
        decoder_heads: int | None = None,
        decoder_dropout: float = 0.1,
        decoder_drop_path: float = 0.0,
        ignore_label: int = IGNORE_INDEX,
        window_size: int | None = None,
        window_stride: int | None = None,
        class_names: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        self.num_classes = num_classes
        super().__init__(**kwargs)
        C = self.encoder.width
        if decoder == "linear":
            self.decoder = LinearDecoder(C, num_classes)
        else:
            heads = decoder_heads or self.encoder.num_heads
            self.decoder = MaskTransformer(
                C, num_classes, decoder_dim or C, decoder_depth, heads, drop_path=decoder_drop_path,
                dropout=decoder_dropout,
            )  # fmt: skip
        self.patch = self.encoder.patch_size
        crop = self.hparams.img_size or self.encoder.img_size[0]
        self.window = window_size or crop
        stride = window_stride or max(
            self.patch[0], round(self.window * 2 / 3 / self.patch[0]) * self.patch[0]
        )
        if self.window % self.patch[0] or self.window % self.patch[1]:
            raise ValueError(f"window_size {self.window} must be divisible by the patch size {self.patch}")
        if stride <= 0:
            raise ValueError(f"window_stride must be positive, got {stride}")
        self.stride = min(stride, self.window)  # a longer stride would leave gaps: capped at the window
        self.ignore_index = ignore_label
        self.class_names = list(class_names) if class_names else None
        self.class_iou: list[dict[str, Any]] = []

    traces_sources = True  # the decoder reads every patch: merged tokens are copied back (unmerged)

    def backbone_create_kwargs(self) -> dict[str, Any]:
        return {**super().backbone_create_kwargs(), "num_classes": 0, "dynamic_img_size": True}

    def head_modules(self) -> list[nn.Module]:
        """The decoder (linear or mask transformer)."""
        decoder = getattr(self, "decoder", None)
        return [decoder] if decoder is not None else []

    # ------------------------------------------------------------------ model
    def encode(self, x: Tensor) -> Tensor:
        """Images [B, 3, H, W] (sides divisible by the patch) -> patch features [B, h·w, C] on the full grid."""
        return self.encoder(x).patch_grid()

    def encode_decode(self, x: Tensor) -> Tensor:
        """Logits [B, K, H, W] of images [B, 3, H, W]; H and W must be divisible by the patch size."""
        H, W = x.shape[-2:]
        if H % self.patch[0] or W % self.patch[1]:
            raise ValueError(f"input {H}x{W} is not divisible by the patch size {self.patch}")
        grid = (H // self.patch[0], W // self.patch[1])
        logits = self.decoder(self.encode(x), grid)
        return F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)

    def forward(self, x: Tensor) -> Tensor:
        """Logits [B, K, H, W] of images of any size: padded (bottom/right) to the patch grid, one window."""
        H, W = x.shape[-2:]
        ph, pw = -H % self.patch[0], -W % self.patch[1]
        if ph or pw:
            return self.encode_decode(F.pad(x, (0, pw, 0, ph)))[..., :H, :W]
        return self.encode_decode(x)

    def inference(self, x: Tensor) -> Tensor:
        """Logits [B, K, H, W]: one pass when the image fits the window, else averaged sliding windows."""
        H, W = x.shape[-2:]
        if H <= self.window and W <= self.window:
            return self(x)
        win_h, win_w = min(self.window, H), min(self.window, W)
        out = x.new_zeros(x.shape[0], self.num_classes, H, W)
        count = x.new_zeros(1, 1, H, W)
        for top in _starts(H, win_h, self.stride):
            for left in _starts(W, win_w, self.stride):
                out[..., top : top + win_h, left : left + win_w] += self(
                    x[..., top : top + win_h, left : left + win_w]
                )
                count[..., top : top + win_h, left : left + win_w] += 1
        return out / count

    # ------------------------------------------------------------------ BaseTask hooks
    def metrics(self) -> MetricCollection:
        K, ig = self.num_classes, self.ignore_index
        return MetricCollection(
            {
                "miou": MulticlassJaccardIndex(K, ignore_index=ig, average="macro"),
                "pixel_acc": MulticlassAccuracy(K, ignore_index=ig, average="micro"),
                "class_iou": MulticlassJaccardIndex(K, ignore_index=ig, average="none"),
            },
            compute_groups=[["miou", "class_iou"], ["pixel_acc"]],
        )

    interval_metric = "miou"

    def sample_stats(self, preds: Tensor, target: Tensor) -> Tensor:
        """Per-image class counts [B, 3, K] of predicted labels ``preds`` [B, H, W]: (intersection, target,
        prediction) pixels per class, the diagonal and margins of each image's confusion matrix (ignored pixels
        left out). Summed over the test set they are those of the corpus confusion matrix behind ``miou``."""
        return stats.class_counts(preds, target, self.num_classes, self.ignore_index)

    def interval_statistic(self, totals: Tensor, n: int) -> Tensor:
        """mIoU [R] of summed class counts [R, 3, K], as the ``miou`` column computes it from its confusion."""
        return stats.miou_of_counts(totals)

    def step(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        x, y = batch
        logits = self.inference(x) if not self.training else self(x)
        loss = F.cross_entropy(logits, y, ignore_index=self.ignore_index)
        return loss, logits.argmax(1), y

    def evaluate(self, batch: Any) -> tuple[Tensor, Tensor]:
        """Predicted labels and targets of one test batch (no loss computed)."""
        x, y = batch
        return self.inference(x).argmax(1), y

    def training_loss(self, batch: Any) -> Tensor:
        x, y = batch
        if (y == self.ignore_index).all():
            return self(x).sum() * 0.0  # an all-void crop: no signal, but keep DDP's gradients in step
        return F.cross_entropy(self(x), y, ignore_index=self.ignore_index)

    def gmacs(self, input_size: tuple[int, int, int]) -> float:
        """GMACs per image of encoder and decoder, every sliding window included."""
        return flops.gmacs(self.inference, input_size)

    def input_size_for_flops(self, trainer: Any) -> tuple[int, int, int]:
        return (3, self.window, self.window)

    def num_input_tokens(self, input_size: tuple[int, int, int]) -> int:
        """Tokens entering block 0 of one window for images of ``input_size``."""
        H, W = input_size[1:]
        return super().num_input_tokens((3, min(H, self.window), min(W, self.window)))

    # ------------------------------------------------------------------ Lightning
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.class_names is None:
            dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
            names = list(getattr(dm, "class_names", ()) or ())
            self.class_names = names if len(names) == self.num_classes else None

    def on_test_epoch_end(self) -> None:
        """The sweep rows (scalars; see BaseTask), plus per-class IoU of every row to ``class_iou.csv``."""
        vectors = {
            key: m["class_iou"].compute().tolist() for key, m in self.test_metrics.items() if "class_iou" in m
        }
        super().on_test_epoch_end()
        names = self.class_names or [f"class_{i}" for i in range(self.num_classes)]
        self.class_iou = []
        for (i, label, _, r), row in zip(self.sweep(), self.sweep_results):
            ious = vectors.get(self.sweep_key(i, r))
            if ious is not None:
                self.class_iou.append(
                    {"policy": label, "r": row["r"], "miou": row.get("miou"), **dict(zip(names, ious))}
                )
        if self.class_iou and self.trainer.is_global_zero and self.trainer.log_dir:
            path = Path(self.trainer.log_dir) / "class_iou.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_csv(path, self.class_iou, list(self.class_iou[0]))

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Predicted label maps [B, H, W] (uint8); saves image | ground truth | prediction PNGs (``save_png``) to
        ``<run>/predictions/<image name>.png``, named after the source images."""
        x, y = batch
        pred = self.inference(x).argmax(1)
        out = Path(self.trainer.log_dir or ".") / "predictions"
        for j, name in enumerate(self.predict_names(batch_idx, len(x))):
            self.save_png(out / f"{Path(name).stem}.png", x[j], y[j], pred[j])
        return pred.byte()  # labels < 256: a quarter of int64's memory in the collected predictions

    def save_png(self, path: Path, image: Tensor, target: Tensor, pred: Tensor) -> None:
        """Write image, colourised ground truth and colourised prediction side by side (ignored pixels black).

        Args:
            path: PNG file to write.
            image: [3, H, W] normalised image (denormalised with the data module's mean and std).
            target: [H, W] labels (255 = ignore).
            pred: [H, W] predicted labels.
        """
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        cfg = getattr(dm, "data_config", {"mean": (0.5,) * 3, "std": (0.5,) * 3})
        palette = getattr(dm, "palette", None) or default_palette(self.num_classes)
        mean = torch.tensor(cfg["mean"], device=image.device).view(3, 1, 1)
        std = torch.tensor(cfg["std"], device=image.device).view(3, 1, 1)
        rgb = ((image * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        t = target.cpu().numpy()
        gt = np.asarray(colorize(np.where(t == self.ignore_index, IGNORE_INDEX, t), palette))
        pr = np.asarray(colorize(pred.cpu().numpy(), palette))
        gap = np.full((rgb.shape[0], 4, 3), 255, dtype=np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(path, Image.fromarray(np.concatenate([rgb, gap, gt, gap, pr], axis=1)))


def _starts(length: int, window: int, stride: int) -> list[int]:
    """Window offsets covering [0, length): every ``stride``, the last one flush with the end."""
    n = max(1, math.ceil((length - window) / stride) + 1)
    return sorted({min(i * stride, length - window) for i in range(n)})
