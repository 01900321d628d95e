"""Task heads that decode merged tokens: the GIT-style caption decoder and the Segmenter decoders.

They read the encoder's tokens and, where merging left them, the token sizes (proportional attention over merged
visual tokens); they know nothing of the policy or the backbone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from dtem_lightning.encoder import SIZE_EPS
from dtem_lightning.text import Vocabulary

DECODERS = ("linear", "mask_transformer")


def git_attention_mask(num_visual: int, num_text: int, size: Tensor | None = None) -> Tensor:
    """GIT's attention mask over [visual; text] with the proportional-attention bias on visual key columns.

    Visual queries see every visual key and no text key; text query t sees every visual key and text keys
    0..t (causal). Allowed entries are 0 (or log(size + eps) on visual columns), forbidden ones -inf.

    Args:
        num_visual: visual tokens n.
        num_text: text tokens T.
        size: [B, n, 1] token sizes of the merged visual tokens, or None (all 1: no bias).

    Returns:
        float32 mask [B or 1, 1, n + T, n + T], added to the attention logits.
    """
    L = num_visual + num_text
    device = size.device if size is not None else None
    allowed = torch.zeros(L, L, dtype=torch.bool, device=device)
    allowed[:, :num_visual] = True
    allowed[num_visual:, num_visual:] = torch.ones(num_text, num_text, dtype=torch.bool, device=device).tril()
    mask = torch.zeros(L, L, device=device).masked_fill(~allowed, float("-inf"))[None, None]
    if size is None:
        return mask
    bias = torch.zeros(size.shape[0], 1, 1, L, device=device)
    bias[..., :num_visual] = torch.log(size.float()[:, None, None, :, 0] + SIZE_EPS)
    return mask + bias


class CaptionDecoder(nn.Module):
    """GIT's text decoder: one pre-norm transformer over [projected visual tokens; embedded caption tokens].

    Args:
        vocab_size: output classes (words and special tokens).
        visual_dim: width of the encoder's tokens.
        width: transformer width.
        depth: transformer blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / width.
        max_len: longest text sequence (BOS + words).
        dropout: dropout on embeddings, attention and MLP outputs.

    The output projection shares its weight with the word embedding (GIT's tying).
    """

    def __init__(
        self,
        vocab_size: int,
        visual_dim: int,
        width: int = 768,
        depth: int = 6,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        max_len: int = 40,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.visual_proj = nn.Sequential(nn.Linear(visual_dim, width), nn.LayerNorm(width))
        self.word_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_len, width))
        self.embed_norm = nn.LayerNorm(width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(width, num_heads, mlp_ratio, qkv_bias=True, proj_drop=dropout, attn_drop=dropout)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.word_embed.weight, std=0.02)
        self.head.weight = self.word_embed.weight
        self.max_len = max_len

    def resize_vocab(self, vocab_size: int) -> None:
        """New (re-initialised) word embedding and output layer for ``vocab_size`` tokens."""
        p = self.head.weight
        self.word_embed = nn.Embedding(vocab_size, p.shape[1], device=p.device, dtype=p.dtype)
        nn.init.normal_(self.word_embed.weight, std=0.02)
        self.head = nn.Linear(p.shape[1], vocab_size, device=p.device, dtype=p.dtype)
        self.head.weight = self.word_embed.weight

    def forward(self, visual: Tensor, size: Tensor | None, tokens: Tensor) -> Tensor:
        """Next-token logits.

        Args:
            visual: [B, n, C_enc] encoder tokens.
            size: [B, n, 1] their sizes, or None (all 1).
            tokens: [B, T] input ids (BOS first), T <= max_len.

        Returns:
            logits [B, T, V] at the text positions.
        """
        n, T = visual.shape[1], tokens.shape[1]
        if T > self.max_len:
            raise ValueError(f"text of {T} tokens exceeds the decoder's max_len={self.max_len}")
        v = self.visual_proj(visual)
        t = self.embed_norm(self.word_embed(tokens) + self.pos_embed[:, :T])
        x = self.drop(torch.cat([v, t.to(v.dtype)], dim=1))
        mask = git_attention_mask(n, T, size).to(device=x.device, dtype=x.dtype)
        for blk in self.blocks:
            x = blk(x, attn_mask=mask)
        return self.head(self.norm(x[:, n:]))


Decoder = Callable[[Tensor, Tensor | None, Tensor], Tensor]  # (visual, size, ids [B, T]) -> logits [B, T, V]


def next_logp(
    decoder: Decoder, visual: Tensor, size: Tensor | None, seqs: Tensor, step: int, vocab: Vocabulary
) -> Tensor:
    """Log-probs [B, V] of the token after ``seqs`` [B, T]; padding and BOS never, EOS not as the first word."""
    logp = decoder(visual, size, seqs)[:, -1].float().log_softmax(-1)
    banned = [vocab.pad, vocab.bos] + ([vocab.eos] if step == 0 else [])
    logp[:, banned] = float("-inf")
    return logp


def greedy_decode(
    decoder: Decoder, visual: Tensor, size: Tensor | None, vocab: Vocabulary, max_len: int
) -> Tensor:
    """Greedy ids [B, 1 + T] (BOS first, padding after EOS) of encoded ``visual`` [B, n, C], T <= ``max_len``."""
    B = len(visual)
    seqs = torch.full((B, 1), vocab.bos, dtype=torch.long, device=visual.device)
    done = torch.zeros(B, dtype=torch.bool, device=visual.device)
    for t in range(max_len):
        tok = next_logp(decoder, visual, size, seqs, t, vocab).argmax(-1).masked_fill(done, vocab.pad)
        seqs = torch.cat([seqs, tok[:, None]], dim=1)
        done |= tok == vocab.eos
        if done.all():
            break
    return seqs


def beam_decode(
    decoder: Decoder, visual: Tensor, size: Tensor | None, vocab: Vocabulary, beam_size: int, max_len: int
) -> Tensor:
    """Beam-search ids [B, 1 + T] of encoded ``visual`` [B, n, C], all images and beams in one batch.

    Finished hypotheses stay in the beam (extended by padding at no cost); the one of highest log-prob in the
    final beam is returned. ``beam_size=1`` is greedy decoding.
    """
    K, B, dev = beam_size, len(visual), visual.device
    visual = visual.repeat_interleave(K, 0)
    size = size.repeat_interleave(K, 0) if size is not None else None
    seqs = torch.full((B * K, 1), vocab.bos, dtype=torch.long, device=dev)
    scores = torch.full((B, K), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # identical beams at the start: expand only the first
    done = torch.zeros(B * K, dtype=torch.bool, device=dev)
    rows = torch.arange(B, device=dev)[:, None]
    for t in range(max_len):
        logp = next_logp(decoder, visual, size, seqs, t, vocab)
        V = logp.shape[-1]
        logp[done] = float("-inf")
        logp[done, vocab.pad] = 0.0
        scores, idx = (scores.reshape(-1, 1) + logp).view(B, K * V).topk(K, dim=1)
        pick = (rows * K + idx // V).flatten()
        seqs = torch.cat([seqs[pick], (idx % V).flatten()[:, None]], dim=1)
        done = done[pick] | (seqs[:, -1] == vocab.eos)
        if done.all():
            break
    return seqs[(rows[:, 0] * K + scores.argmax(1))]


class LinearDecoder(nn.Module):
    """Segmenter's linear decoder: one Linear from patch features to class logits.

    Args:
        in_dim: encoder width.
        num_classes: classes.
    """

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(in_dim, num_classes)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """Patch features [B, h·w, C] -> logits [B, K, h, w]."""
        B = x.shape[0]
        return self.head(x).transpose(1, 2).reshape(B, -1, *grid)


class MaskTransformer(nn.Module):
    """Segmenter's mask transformer: learnable class embeddings attend jointly with the patches.

    The patch features are projected to ``dim``, concatenated with K class embeddings, passed through
    ``depth`` transformer blocks; the masks are the scalar products of the L2-normalised, projected patch and
    class features, followed by a LayerNorm over classes (Strudel et al., ICCV 2021).

    Args:
        in_dim: encoder width.
        num_classes: classes (K).
        dim: decoder width.
        depth: transformer blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / ``dim``.
        drop_path: stochastic depth rate (linearly increasing over the blocks).
        dropout: dropout after attention/MLP projections.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        dim: int,
        depth: int = 2,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.proj_in = nn.Linear(in_dim, dim)
        rates = [drop_path * i / max(1, depth - 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, qkv_bias=True, proj_drop=dropout, drop_path=dp) for dp in rates
        )
        self.cls_emb = nn.Parameter(torch.zeros(1, num_classes, dim))
        self.norm = nn.LayerNorm(dim)
        self.proj_patch = nn.Parameter(dim**-0.5 * torch.randn(dim, dim))
        self.proj_classes = nn.Parameter(dim**-0.5 * torch.randn(dim, dim))
        self.mask_norm = nn.LayerNorm(num_classes)
        trunc_normal_(self.cls_emb, std=0.02)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """Patch features [B, h·w, C] -> logits [B, K, h, w]."""
        B, n, _ = x.shape
        x = torch.cat([self.proj_in(x), self.cls_emb.expand(B, -1, -1)], dim=1)  # [B, n + K, D]
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        patches = F.normalize(x[:, :n] @ self.proj_patch, dim=-1)
        classes = F.normalize(x[:, n:] @ self.proj_classes, dim=-1)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # [B, n, K]
        return masks.transpose(1, 2).reshape(B, self.num_classes, *grid)
