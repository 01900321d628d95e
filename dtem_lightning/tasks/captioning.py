"""CaptioningTask: GIT-style captioner (merging ViT encoder, one transformer over visual and text tokens)."""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection

from dtem_lightning import flops
from dtem_lightning.tasks.base import BaseTask
from dtem_lightning.tasks.decoders import CaptionDecoder, beam_decode, greedy_decode
from dtem_lightning.text import CaptionMetrics, Vocabulary, meteor_missing

FLOPS_TEXT_LEN = 12  # text tokens of the decoder pass counted by CaptioningTask.gmacs: a typical caption


class CaptioningTask(BaseTask):
    """GIT-style image captioning whose ViT encoder merges tokens (DTEM paper, Table 4).

    The encoder's output tokens (prefix tokens included, merged, with their sizes) are projected and
    concatenated with the caption tokens into one transformer (:class:`CaptionDecoder`, mask
    :func:`git_attention_mask`). Training is teacher-forced cross-entropy with label smoothing on one or more
    reference captions per image; validation decodes greedily; the test sweep decodes with ``beam_size``.

    The word vocabulary comes from the data module (``vocab_size`` is linked by the CLI; the words are taken in
    ``setup``) and is stored in every checkpoint, so ``dtem test --ckpt_path`` restores it.

    Args:
        vocab_size: decoder output size (linked from ``data.vocab_size``); the data's or checkpoint's vocabulary
            wins when they differ.
        decoder_width: decoder transformer width.
        decoder_depth: decoder blocks.
        decoder_heads: decoder attention heads.
        decoder_mlp_ratio: decoder MLP ratio.
        decoder_dropout: decoder dropout.
        max_len: longest generated caption in words (the decoder holds max_len + 1 positions).
        label_smoothing: label smoothing of the caption loss.
        captions_per_image: training captions drawn (without replacement) per image and step; the encoder
            runs once per image.
        beam_size: beam width of the test decoding (1: greedy).
        use_meteor: METEOR column (pycocoevalcap + Java); None: when available.
        concept_weight: weight of an auxiliary word-tagging loss (0: off, as in GIT): a linear head on the
            size-weighted mean of the encoder tokens predicts which content words occur in any of the image's
            reference captions (multi-label BCE, summed over words and divided by the image's number of content
            words). It trains the encoder directly on what the image shows, which a captioner trained from
            scratch on little data otherwise barely learns (its decoder settles on a few generic captions).
        **kwargs: see :class:`~dtem_lightning.tasks.base.BaseTask` (``train: policy`` is the modular regime).
    """

    def __init__(
        self,
        vocab_size: int = 0,
        decoder_width: int = 768,
        decoder_depth: int = 6,
        decoder_heads: int = 12,
        decoder_mlp_ratio: float = 4.0,
        decoder_dropout: float = 0.1,
        max_len: int = 20,
        label_smoothing: float = 0.1,
        captions_per_image: int = 1,
        beam_size: int = 3,
        use_meteor: bool | None = None,
        concept_weight: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if concept_weight < 0:
            raise ValueError(f"concept_weight must be >= 0, got {concept_weight}")
        if beam_size < 1 or max_len < 1 or captions_per_image < 1:
            raise ValueError(
                f"beam_size, max_len and captions_per_image must be >= 1, got {beam_size}, {max_len}, "
                f"{captions_per_image}"
            )
        super().__init__(**kwargs)
        self.vocab: Vocabulary | None = None
        self.decoder = CaptionDecoder(
            max(vocab_size, len(Vocabulary([]))),
            self.encoder.width,
            decoder_width,
            decoder_depth,
            decoder_heads,
            decoder_mlp_ratio,
            max_len + 1,
            decoder_dropout,
        )
        # Only built when used, so checkpoints of captioners without it keep their exact keys.
        self.concept_head = (
            nn.Linear(self.encoder.width, self.decoder.word_embed.num_embeddings)
            if concept_weight > 0
            else None
        )

    def backbone_create_kwargs(self) -> dict[str, Any]:
        return {**super().backbone_create_kwargs(), "num_classes": 0}

    def head_modules(self) -> list[nn.Module]:
        """The text decoder, and the word-tagging head when ``concept_weight`` > 0."""
        parts = [getattr(self, "decoder", None), getattr(self, "concept_head", None)]
        return [m for m in parts if m is not None]

    # ------------------------------------------------------------------ vocabulary
    def set_vocab(self, vocab: Vocabulary) -> None:
        """Use ``vocab``; the word embedding and output layer are re-created when its size differs."""
        if len(vocab) != self.decoder.word_embed.num_embeddings:
            self.decoder.resize_vocab(len(vocab))
            if self.concept_head is not None:
                w = self.concept_head.weight
                self.concept_head = nn.Linear(w.shape[1], len(vocab), device=w.device, dtype=w.dtype)
        self.vocab = vocab

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.vocab is None and getattr(dm, "vocab", None) is not None:
            self.set_vocab(dm.vocab)
        if self.vocab is None:
            raise RuntimeError("CaptioningTask has no vocabulary: use a caption data module or set_vocab()")
        super().setup(stage)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.vocab is not None:
            checkpoint["vocab"] = self.vocab.state_dict()

    def check_test_checkpoint(self, checkpoint: dict[str, Any], what: str) -> None:
        """A test checkpoint's decoder is read with this task's vocabulary: refuse one trained with another."""
        theirs = checkpoint.get("vocab")
        if theirs is not None and self.vocab is not None and Vocabulary.from_state_dict(theirs) != self.vocab:
            raise ValueError(
                f"{what} was trained with another vocabulary ({len(theirs['itos'])} words, {len(self.vocab)} "
                "here): its captions would be decoded with the wrong words"
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "vocab" in checkpoint:
            self.set_vocab(Vocabulary.from_state_dict(checkpoint["vocab"]))
        super().on_load_checkpoint(checkpoint)

    # ------------------------------------------------------------------ model
    def encode(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """Merged encoder tokens [B, n, C] and their sizes [B, n, 1] (None while nothing merged)."""
        out = self.encoder(images)  # with the policy in use (the sweep switches policies)
        return out.tokens, out.size

    def forward(self, images: Tensor, tokens: Tensor) -> Tensor:
        """Teacher-forced logits [B, T, V] of ``tokens`` [B, T] (BOS first) given ``images`` [B, 3, H, W]."""
        visual, size = self.encode(images)
        return self.decoder(visual, size, tokens)

    def _targets(self, captions: list[list[str]], per_image: int) -> tuple[Tensor, Tensor]:
        """Image index [M] and padded ids [M, L+1] (BOS w1 .. wL EOS) of ``per_image`` captions per image."""
        vocab, L = self.vocab, self.hparams.max_len
        owners, rows = [], []
        for i, caps in enumerate(captions):
            picked = (
                random.sample(list(caps), min(per_image, len(caps))) if self.training else caps[:per_image]
            )
            for c in picked:
                owners.append(i)
                rows.append([vocab.bos, *vocab.encode(c, L), vocab.eos])
        ids = torch.full((len(rows), max(map(len, rows))), vocab.pad, dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = torch.tensor(r)
        return torch.tensor(owners, device=self.device), ids.to(self.device)

    def caption_loss(
        self, visual: Tensor, size: Tensor | None, captions: list[list[str]], per_image: int
    ) -> Tensor:
        """Label-smoothed cross-entropy of ``per_image`` reference captions per image of encoded ``visual``."""
        owner, ids = self._targets(captions, per_image)
        visual = visual[owner]
        size = size[owner] if size is not None else None
        logits = self.decoder(visual, size, ids[:, :-1])
        return F.cross_entropy(
            logits.flatten(0, 1).float(),
            ids[:, 1:].flatten(),
            ignore_index=self.vocab.pad,
            label_smoothing=self.hparams.label_smoothing,
        )

    def concept_loss(self, visual: Tensor, size: Tensor | None, captions: list[list[str]]) -> Tensor:
        """Word-tagging loss (see ``concept_weight``) of encoded ``visual`` [B, n, C] with sizes [B, n, 1]."""
        w = size if size is not None else torch.ones_like(visual[..., :1])
        pooled = (visual * w).sum(1) / w.sum(1)  # merged tokens count by the patches they hold
        logits = self.concept_head(pooled).float()
        target = self.vocab.bag_of_words(captions).to(logits.device)
        keep = self.vocab.concept_mask().to(logits.device)
        bce = F.binary_cross_entropy_with_logits(logits[:, keep], target[:, keep], reduction="none")
        return (bce.sum(1) / target[:, keep].sum(1).clamp(min=1)).mean()

    def image_loss(self, images: Tensor, captions: list[list[str]], per_image: int) -> Tensor:
        """Caption loss plus ``concept_weight`` times the word-tagging loss; the encoder runs once."""
        visual, size = self.encode(images)
        loss = self.caption_loss(visual, size, captions, per_image)
        if self.concept_head is not None:
            loss = loss + self.hparams.concept_weight * self.concept_loss(visual, size, captions)
        return loss

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def greedy(self, images: Tensor, max_len: int | None = None) -> list[str]:
        """Greedy captions of ``images`` [B, 3, H, W] (batched; at most ``max_len`` words)."""
        ids = greedy_decode(self.decoder, *self.encode(images), self.vocab, max_len or self.hparams.max_len)
        return [self.vocab.decode(s[1:].tolist()) for s in ids]

    @torch.no_grad()
    def beam_search(
        self, images: Tensor, beam_size: int | None = None, max_len: int | None = None
    ) -> list[str]:
        """Beam-search captions of ``images`` [B, 3, H, W] (:func:`~dtem_lightning.tasks.decoders.beam_decode`)."""
        K, max_len = beam_size or self.hparams.beam_size, max_len or self.hparams.max_len
        ids = beam_decode(self.decoder, *self.encode(images), self.vocab, K, max_len)
        return [self.vocab.decode(s[1:].tolist()) for s in ids]

    def generate(self, images: Tensor) -> list[str]:
        """Captions with the configured decoding (greedy when ``beam_size`` is 1)."""
        return self.greedy(images) if self.hparams.beam_size == 1 else self.beam_search(images)

    # ------------------------------------------------------------------ BaseTask hooks
    interval_metric = "cider"

    def metrics(self) -> MetricCollection:
        return MetricCollection({"caption": CaptionMetrics(self.hparams.use_meteor)})

    def row_sample_stats(self, key: str) -> Tensor | None:
        """Per-image CIDEr-D [m] of row ``key`` (mean: its ``cider``), from the corpus its metric just gathered.

        CIDEr-D's document frequencies need every reference, so the scores exist only after ``compute``; they
        are in the metric's gathering order (rank after rank), the order of the base class's sample indices.
        A bootstrap over them keeps the test set's idf weights fixed (see
        :func:`~dtem_lightning.text.cider_d_per_image`).
        """
        return self.test_metrics[key]["caption"].cider_per_image

    def training_loss(self, batch: Any) -> Tensor:
        images, captions = batch
        return self.image_loss(images, captions, self.hparams.captions_per_image)

    def step(self, batch: Any) -> tuple[Tensor, list[str], list[list[str]]]:
        """Validation: loss on the first reference caption and greedy captions."""
        images, captions = batch
        loss = self.image_loss(images, captions, 1)
        return loss, self.greedy(images), [list(c) for c in captions]

    def predict_rows(self, batch: Any) -> list[dict[str, Any]]:
        """The generated caption of each image and its first reference caption."""
        images, captions = batch
        return [
            {"caption": c, "reference": refs[0] if refs else ""}
            for c, refs in zip(self.generate(images), captions)
        ]

    def evaluate(self, batch: Any) -> tuple[list[str], list[list[str]]]:
        """Test: captions decoded with ``beam_size`` and their references."""
        images, captions = batch
        return self.generate(images), [list(c) for c in captions]

    def gmacs(self, input_size: tuple[int, int, int]) -> float:
        """GMACs per image: encoder plus one decoder pass over the visual tokens and ``FLOPS_TEXT_LEN`` text tokens.

        Convention: the decoder is counted as scoring one caption of typical length (``FLOPS_TEXT_LEN``, BOS
        included) in a single pass, the cost per image of a decoder with a key/value cache; beam search
        multiplies the decoder part by about the beam width.
        """
        return flops.gmacs(self._score_typical_caption, input_size)

    def _score_typical_caption(self, images: Tensor) -> Tensor:
        """What :meth:`gmacs` counts: the encoder and one decoder pass over ``FLOPS_TEXT_LEN`` BOS tokens."""
        text_len = min(FLOPS_TEXT_LEN, self.decoder.max_len)
        tokens = torch.full((len(images), text_len), self.vocab.bos, device=images.device)
        return self.decoder(*self.encode(images), tokens)

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        # ``tokens`` is also what reaches the decoder: every encoder token, prefix included.
        notes = ["tokens: the visual tokens the encoder passes to the decoder (prefix tokens included)."]
        if self.hparams.use_meteor is False:
            notes.append("METEOR: not computed (use_meteor=false).")
        elif (why := meteor_missing()) is not None:
            notes.append(f"METEOR: skipped, {why}; it needs pycocoevalcap and Java.")
        self.sweep_note = "\n\n".join(n for n in (self.sweep_note, " ".join(notes)) if n)
