"""GitCaptioningTask: pretrained GIT (Hugging Face ``GitForCausalLM``) whose image encoder merges tokens.

The paper's Table 4 setting: GIT's own weights, tokenizer and decoding; the policy merges in GIT's image encoder
(patched in place by the hf backend, docs/hf.md), and the decoder reads the merged visual tokens.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection

from dtem_lightning import flops
from dtem_lightning.tasks.base import BaseTask
from dtem_lightning.text import CaptionMetrics, meteor_missing


class _FlopsProbe(nn.Module):
    """GIT on one image and a fixed-length caption (BOS repeated), for :func:`dtem_lightning.flops.gmacs`."""

    def __init__(self, task: GitCaptioningTask, text_len: int) -> None:
        super().__init__()
        self.task, self.text_len = task, text_len

    def forward(self, x: Tensor) -> Tensor:
        ids = torch.full((x.shape[0], self.text_len), self.task.bos_id, device=x.device)
        return self.task.backbone(input_ids=ids, pixel_values=x).logits


class GitCaptioningTask(BaseTask):
    """Captioning with a pretrained GIT (``backbone: hf:<folder or hub id>`` of a ``GitForCausalLM``).

    The merge policy is applied to GIT's image encoder; GIT's decoder reads its merged tokens (as plain tokens:
    GIT was trained without a size bias, and none is added). Training is GIT's own teacher-forced loss on one
    reference caption per image, drawn at random (the image-token count of the loss follows merging); decoding
    is GIT's ``generate`` (greedy or beam search), and captions are decoded by GIT's own tokenizer. With
    ``train: policy`` (the paper's modular setting) only the merge policy's embedding trains.

    Args:
        tokenizer: folder or hub id of the tokenizer; None: the backbone's (its folder, without ``hf:``).
        max_len: longest caption in tokens, without BOS and EOS (training truncates, decoding stops there).
        beam_size: beams of the test decoding (1: greedy); validation decodes greedily.
        use_meteor: METEOR column (pycocoevalcap + Java); None: when available.
        flops_text_len: text tokens of the decoder pass counted by :meth:`gmacs` (BOS included).
        **kwargs: see :class:`~dtem_lightning.tasks.base.BaseTask`.
    """

    def __init__(
        self,
        tokenizer: str | None = None,
        max_len: int = 20,
        beam_size: int = 1,
        use_meteor: bool | None = None,
        flops_text_len: int = 12,
        **kwargs: Any,
    ) -> None:
        if beam_size < 1 or max_len < 1 or flops_text_len < 1:
            raise ValueError(
                f"beam_size, max_len and flops_text_len must be >= 1, got {beam_size}, {max_len}, {flops_text_len}"
            )
        super().__init__(**kwargs)
        if type(self.backbone).__name__ != "GitForCausalLM":
            raise ValueError(
                f"GitCaptioningTask needs an hf: GitForCausalLM backbone, got {type(self.backbone).__name__} "
                f"({self.hparams.backbone!r})"
            )
        from transformers import AutoTokenizer

        src = tokenizer or str(self.hparams.backbone).removeprefix("hf:")
        self.tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=Path(src).is_dir())
        cfg = self.backbone.config
        if len(self.tokenizer) > cfg.vocab_size:
            raise ValueError(
                f"tokenizer {src} has {len(self.tokenizer)} tokens, GIT's vocab_size is {cfg.vocab_size}"
            )
        # GIT starts captions with the tokenizer's [CLS] (its config's bos_token_id) and ends them with [SEP].
        self.bos_id = int(cfg.bos_token_id)
        self.eos_id = int(cfg.eos_token_id)
        self.pad_id = int(cfg.pad_token_id)

    def head_modules(self) -> list[nn.Module]:
        """GIT's decoder: text embeddings, visual projection, transformer and output layer."""
        git = self.backbone.git
        return [git.embeddings, git.visual_projection, git.encoder, self.backbone.output]

    # ------------------------------------------------------------------ model
    def caption_loss(self, images: Tensor, captions: list[list[str]]) -> Tensor:
        """GIT's loss on one reference per image (random in training, the first otherwise)."""
        picked = [random.choice(c) if self.training else c[0] for c in captions]
        enc = self.tokenizer(
            picked, padding=True, truncation=True, max_length=self.hparams.max_len + 2, return_tensors="pt"
        )
        ids, mask = enc.input_ids.to(self.device), enc.attention_mask.to(self.device)
        labels = ids.masked_fill(mask == 0, -100)
        return self.backbone(input_ids=ids, attention_mask=mask, pixel_values=images, labels=labels).loss

    @torch.no_grad()
    def generate(self, images: Tensor, beam_size: int | None = None) -> list[str]:
        """Captions of ``images`` [B, 3, H, W] by GIT's ``generate`` with the policy in use."""
        ids = torch.full((len(images), 1), self.bos_id, dtype=torch.long, device=images.device)
        out = self.backbone.generate(
            pixel_values=images,
            input_ids=ids,
            max_new_tokens=self.hparams.max_len,
            num_beams=beam_size or self.hparams.beam_size,
            do_sample=False,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
        )
        return [t.strip() for t in self.tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True)]

    # ------------------------------------------------------------------ BaseTask hooks
    interval_metric = "cider"

    def metrics(self) -> MetricCollection:
        return MetricCollection({"caption": CaptionMetrics(self.hparams.use_meteor)})

    def row_sample_stats(self, key: str) -> Tensor | None:
        """Per-image CIDEr-D of row ``key`` (see :meth:`CaptioningTask.row_sample_stats`)."""
        return self.test_metrics[key]["caption"].cider_per_image

    def training_loss(self, batch: Any) -> Tensor:
        images, captions = batch
        return self.caption_loss(images, captions)

    def step(self, batch: Any) -> tuple[Tensor, list[str], list[list[str]]]:
        """Validation: loss on the first reference and greedy captions."""
        images, captions = batch
        return self.caption_loss(images, captions), self.generate(images, 1), [list(c) for c in captions]

    def evaluate(self, batch: Any) -> tuple[list[str], list[list[str]]]:
        """Test: captions decoded with ``beam_size`` and their references."""
        images, captions = batch
        return self.generate(images), [list(c) for c in captions]

    def predict_rows(self, batch: Any) -> list[dict[str, Any]]:
        images, captions = batch
        return [
            {"caption": c, "reference": refs[0] if refs else ""}
            for c, refs in zip(self.generate(images), captions)
        ]

    def gmacs(self, input_size: tuple[int, int, int]) -> float:
        """GMACs per image: image encoder plus one decoder pass over the visual tokens and ``flops_text_len``
        text tokens (the cost per image of decoding one caption with a key/value cache, as CaptioningTask)."""
        return flops.gmacs(_FlopsProbe(self, self.hparams.flops_text_len), input_size)

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        notes = [
            "tokens (#): the visual tokens GIT's image encoder passes to the decoder (class token included)."
        ]
        if self.hparams.use_meteor is False:
            notes.append("METEOR: not computed (use_meteor=false).")
        elif (why := meteor_missing()) is not None:
            notes.append(f"METEOR: skipped, {why}; it needs pycocoevalcap and Java.")
        self.sweep_note = "\n\n".join(n for n in (self.sweep_note, " ".join(notes)) if n)
