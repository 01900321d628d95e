"""ClassificationTask: timm ViT classifier with merging, top-1/top-5, mixup/cutmix with soft-target loss."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from dtem_lightning.tasks.base import BaseTask


class ClassificationTask(BaseTask):
    """Image classification with the backbone's own timm head.

    Args:
        num_classes: classes of the head (linked from the data module by the CLI).
        mixup: mixup alpha (0 disables).
        cutmix: cutmix alpha (0 disables).
        mix_switch_prob: probability of cutmix instead of mixup when both are on.
        label_smoothing: label smoothing of the training loss.
        **kwargs: see :class:`~dtem_lightning.tasks.base.BaseTask`.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        mix_switch_prob: float = 0.5,
        label_smoothing: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        super().__init__(**kwargs)
        self.mix = None
        if mixup > 0 or cutmix > 0:
            self.mix = Mixup(
                mixup_alpha=mixup,
                cutmix_alpha=cutmix,
                switch_prob=mix_switch_prob,
                label_smoothing=label_smoothing,
                num_classes=num_classes,
            )
            self.soft_ce = SoftTargetCrossEntropy()

    def backbone_create_kwargs(self) -> dict[str, Any]:
        return {**super().backbone_create_kwargs(), "num_classes": self.num_classes}

    def head_modules(self) -> list[nn.Module]:
        """The backbone's own classifier head (for timm: attention pool if any, fc_norm, dropout, head)."""
        return self.encoder.head_modules()

    def metrics(self) -> MetricCollection:
        top5 = min(5, self.num_classes)
        return MetricCollection(
            {
                "acc1": MulticlassAccuracy(self.num_classes, top_k=1, average="micro"),
                "acc5": MulticlassAccuracy(self.num_classes, top_k=top5, average="micro"),
            }
        )

    interval_metric = "acc1"

    def sample_stats(self, preds: Tensor, target: Tensor) -> Tensor:
        """Top-1 correctness [B] (0/1) of logits ``preds`` [B, K]: its mean is ``acc1``."""
        return (preds.argmax(-1) == target).long()

    def forward(self, x: Tensor) -> Tensor:
        """Logits [B, K] of images [B, 3, H, W]: the merging encoder, then the backbone's own head."""
        return self.encoder.forward_head(self.encoder(x))

    def predict_rows(self, batch: Any) -> list[dict[str, Any]]:
        """Predicted class, its softmax probability and the folder's class of each image."""
        x, y = batch
        prob, pred = self(x).softmax(-1).max(-1)
        dm = getattr(self.trainer, "datamodule", None)
        names = list(getattr(dm, "classes", None) or range(self.hparams.num_classes))
        return [
            {"prediction": names[int(p)], "probability": round(float(q), 6), "label": names[int(t)]}
            for p, q, t in zip(pred, prob, y)
        ]

    def step(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits, y), logits, y

    def training_loss(self, batch: Any) -> Tensor:
        x, y = batch
        if self.mix is not None:
            if len(x) % 2:
                raise ValueError(f"mixup/cutmix need an even batch size, got {len(x)}")
            x, soft = self.mix(x, y)
            return self.soft_ce(self(x), soft)
        return F.cross_entropy(self(x), y, label_smoothing=self.hparams.label_smoothing)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        # docs/design.md §8: merging after the last attention cannot change the class token.
        last = self.encoder.depth - 1
        token_head = self.encoder.global_pool == "token"
        if (
            token_head
            and self.encoder.schedule()[-1]
            and any(p.requires_grad for p in self.policy.parameters())
        ):
            self.print(
                f"note: block {last} merges after the last attention, which the class token never sees: "
                f"policy.embed.{last} gets no gradient and keeps its initialisation"
            )
