"""Caption text: a PTB-like tokenizer, an offline word vocabulary and COCO caption metrics (BLEU, ROUGE-L, CIDEr-D)."""

from __future__ import annotations

import math
import re
import shutil
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
# Function words no image shows; they are not visual concepts (CaptioningTask's word-tagging loss skips them).
STOPWORDS = frozenset(
    "a an the is are was were be been being of in on at to into onto by with for from up down out over under "
    "and or but while as its it 's their his her he she they them this that these those there here some one "
    "who which what near next front other another each".split()
)

# Words, numbers and English clitics ('s, 're, n't ...) as the Penn Treebank tokenizer splits them; punctuation is
# dropped, as the COCO evaluation's PTBTokenizer does before scoring.
_TOKEN = re.compile(r"[a-z0-9]+(?=n't\b)|n't\b|'[a-z]+\b|[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lower-case ``text`` and split it into words and clitics, punctuation removed ("A dog's toy." -> a dog 's toy)."""
    return _TOKEN.findall(text.lower())


class Vocabulary:
    """Word-level vocabulary: special tokens first, then words by descending frequency (ties alphabetical).

    Args:
        words: the non-special words, in index order (index = position + number of specials).
    """

    def __init__(self, words: Sequence[str]) -> None:
        self.itos = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.pad, self.bos, self.eos, self.unk = (self.stoi[s] for s in SPECIALS)

    @classmethod
    def build(cls, captions: Iterable[str], min_freq: int = 5) -> Vocabulary:
        """Vocabulary of the words occurring at least ``min_freq`` times in ``captions`` (after :func:`tokenize`)."""
        if min_freq < 1:
            raise ValueError(f"min_freq must be >= 1, got {min_freq}")
        counts = Counter(w for c in captions for w in tokenize(c))
        words = sorted((w for w, n in counts.items() if n >= min_freq), key=lambda w: (-counts[w], w))
        return cls(words)

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    def encode(self, text: str, max_len: int | None = None) -> list[int]:
        """Token ids of ``text`` (unknown words -> ``<unk>``), truncated to ``max_len`` words; no BOS/EOS."""
        ids = [self.stoi.get(w, self.unk) for w in tokenize(text)]
        return ids if max_len is None else ids[:max_len]

    def decode(self, ids: Iterable[int]) -> str:
        """Words of ``ids`` up to the first ``<eos>``, special tokens skipped, joined by spaces."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos:
                break
            if i >= len(SPECIALS):
                out.append(self.itos[i])
        return " ".join(out)

    def concept_mask(self) -> Tensor:
        """[V] bool: the words that can name something in an image (not special, not in :data:`STOPWORDS`)."""
        return torch.tensor([i >= len(SPECIALS) and w not in STOPWORDS for i, w in enumerate(self.itos)])

    def bag_of_words(self, captions: Sequence[Sequence[str]]) -> Tensor:
        """[B, V] float multi-hot: which words occur in any of each image's captions (unknown words skipped)."""
        out = torch.zeros(len(captions), len(self))
        for i, caps in enumerate(captions):
            ids = {j for c in caps for j in self.encode(c) if j != self.unk}
            out[i, list(ids)] = 1.0
        return out

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state (stored in Lightning checkpoints; loads with ``weights_only=True``)."""
        return {"itos": list(self.itos)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Vocabulary:
        """Inverse of :meth:`state_dict`."""
        itos = list(state["itos"])
        if tuple(itos[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"not a vocabulary state: specials {itos[: len(SPECIALS)]} != {list(SPECIALS)}")
        return cls(itos[len(SPECIALS) :])


# ---------------------------------------------------------------------------------------------- n-gram metrics
def ngrams(words: Sequence[str], n: int) -> Counter:
    """Counts of the n-grams (tuples) of ``words``."""
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def bleu(cands: Sequence[list[str]], refs: Sequence[list[list[str]]], max_n: int = 4) -> list[float]:
    """Corpus BLEU-1..max_n with COCO's conventions.

    Clipped n-gram precisions p_k = (matches + 1e-15) / (candidate n-grams + 1e-9) summed over the corpus; the
    reference length of an image is the one closest to its candidate (ties: the shorter); brevity penalty
    exp(1 - r / c) when the corpus candidate length c is below the reference length r; BLEU-n = BP (p_1 ... p_n)^(1/n).

    Args:
        cands: one word list per image.
        refs: reference word lists per image.
        max_n: highest order.

    Returns:
        [BLEU-1, ..., BLEU-max_n].
    """
    correct, total = [0] * max_n, [0] * max_n
    c_len = r_len = 0
    for cand, rs in zip(cands, refs, strict=True):
        c_len += len(cand)
        r_len += min((abs(len(r) - len(cand)), len(r)) for r in rs)[1]
        for n in range(1, max_n + 1):
            cn = ngrams(cand, n)
            best: Counter = Counter()
            for r in rs:
                best |= ngrams(r, n)  # max count over references
            correct[n - 1] += sum(min(c, best[g]) for g, c in cn.items())
            total[n - 1] += max(len(cand) - n + 1, 0)
    ratio = (c_len + 1e-15) / (r_len + 1e-9)
    bp = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    out, prod = [], 1.0
    for n in range(max_n):
        prod *= (correct[n] + 1e-15) / (total[n] + 1e-9)
        out.append(bp * prod ** (1 / (n + 1)))
    return out


def lcs(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(cands: Sequence[list[str]], refs: Sequence[list[list[str]]], beta: float = 1.2) -> float:
    """Mean over images of ROUGE-L F (COCO: best precision and best recall over references, beta = 1.2)."""
    scores = []
    for cand, rs in zip(cands, refs, strict=True):
        common = [lcs(cand, r) for r in rs]
        p = max(c / len(cand) if cand else 0.0 for c in common)
        r = max(c / len(ref) if ref else 0.0 for c, ref in zip(common, rs))
        scores.append((1 + beta**2) * p * r / (r + beta**2 * p) if p > 0 and r > 0 else 0.0)
    return sum(scores) / max(len(scores), 1)


def cider_d(
    cands: Sequence[list[str]], refs: Sequence[list[list[str]]], max_n: int = 4, sigma: float = 6.0
) -> float:
    """Corpus CIDEr-D (Vedantam et al. 2015; COCO's ``Cider`` scorer): the mean of :func:`cider_d_per_image`."""
    scores = cider_d_per_image(cands, refs, max_n, sigma)
    return sum(scores) / len(scores) if scores else 0.0


def cider_d_per_image(
    cands: Sequence[list[str]], refs: Sequence[list[list[str]]], max_n: int = 4, sigma: float = 6.0
) -> list[float]:
    """Per-image CIDEr-D with the document frequencies of the whole corpus ``refs``; their mean is the corpus score.

    A bootstrap resample of these scores keeps the test set's idf weights fixed (a resampled corpus with its own
    document frequencies would score each image slightly differently).

    Per order n, a sentence is a vector of tf-idf weights g = count(ngram) * (log N - log max(1, df)), N the
    number of images and df the number of images whose references contain the n-gram. Candidate vs reference:
    sum(min(g_c, g_r) g_r) / (|g_c| |g_r|) * exp(-(len_c - len_r)^2 / (2 sigma^2)); averaged over references
    and orders, times 10 (:func:`cider_d` averages these over images).

    Args:
        cands: one word list per image.
        refs: reference word lists per image.
        max_n: highest n-gram order.
        sigma: length penalty width.

    Returns:
        one score per image (about 0-10; 1.0 on COCO is a good captioner).
    """
    if not cands:
        return []
    df: Counter = Counter()
    for rs in refs:
        df.update({g for r in rs for n in range(1, max_n + 1) for g in ngrams(r, n)})
    log_n = math.log(float(len(refs)))

    def vectors(words: list[str]) -> tuple[list[dict], list[float]]:
        vecs, norms = [], []
        for n in range(1, max_n + 1):
            v = {g: c * (log_n - math.log(max(1.0, df[g]))) for g, c in ngrams(words, n).items()}
            vecs.append(v)
            norms.append(math.sqrt(sum(x * x for x in v.values())))
        return vecs, norms

    scores = []
    for cand, rs in zip(cands, refs, strict=True):
        vc, nc = vectors(cand)
        score = 0.0
        for r in rs:
            vr, nr = vectors(r)
            penalty = math.exp(-((len(cand) - len(r)) ** 2) / (2 * sigma**2))
            for n in range(max_n):
                if nc[n] and nr[n]:
                    dot = sum(min(x, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, x in vc[n].items())
                    score += dot / (nc[n] * nr[n]) * penalty
        scores.append(10.0 * score / (max_n * len(rs)))
    return scores


def meteor_available() -> bool:
    """Whether METEOR can run: pycocoevalcap is installed and Java is on the PATH."""
    return meteor_missing() is None


def meteor_missing() -> str | None:
    """Why METEOR cannot run here (what is missing), or None when it can."""
    try:
        import pycocoevalcap.meteor.meteor  # noqa: F401
    except ImportError:
        return "pycocoevalcap is not installed (pip install dtem-lightning[captioning-eval])"
    return None if shutil.which("java") else "Java is not on the PATH"


def meteor(cands: Sequence[list[str]], refs: Sequence[list[list[str]]]) -> float:
    """Corpus METEOR 1.5 through pycocoevalcap (Java); see :func:`meteor_available`."""
    from pycocoevalcap.meteor.meteor import Meteor

    res = {i: [" ".join(c)] for i, c in enumerate(cands)}
    gts = {i: [" ".join(r) for r in rs] for i, rs in enumerate(refs)}
    scorer = Meteor()
    try:
        score, _ = scorer.compute_score(gts, res)
    finally:
        with scorer.lock:
            scorer.meteor_p.stdin.close()
            scorer.meteor_p.kill()
            scorer.meteor_p.wait()
    return float(score)


# ---------------------------------------------------------------------------------------------- torchmetrics
def _pack(cands: Sequence[str], refs: Sequence[Sequence[str]]) -> Tensor:
    """Tokenised candidates and references as UTF-8 bytes: per image ``cand \\t ref \\t ref ... \\n``."""
    lines = []
    for c, rs in zip(cands, refs, strict=True):
        if not rs:
            raise ValueError("every image needs at least one reference caption")
        lines.append("\t".join(" ".join(tokenize(s)) for s in (c, *rs)) + "\n")
    return torch.frombuffer(bytearray("".join(lines).encode()), dtype=torch.uint8).clone()


def _unpack(data: Tensor) -> tuple[list[list[str]], list[list[list[str]]]]:
    cands, refs = [], []
    for line in bytes(data.cpu().numpy().tobytes()).decode().splitlines():
        c, *rs = line.split("\t")
        cands.append(c.split())
        refs.append([r.split() for r in rs])
    return cands, refs


class CaptionMetrics(Metric):
    """COCO caption metrics over a corpus: ``bleu1`` .. ``bleu4``, ``meteor`` (optional), ``rouge_l``, ``cider``.

    Captions are tokenised by :func:`tokenize` and kept as UTF-8 byte tensors, so DDP gathers the whole corpus
    (CIDEr-D's document frequencies need every reference) and each process computes the same corpus scores.
    After :meth:`compute`, ``cider_per_image`` holds the per-image CIDEr-D [n] (float64) of that corpus in its
    gathered order (rank by rank, each in update order); ``cider`` is their mean.

    Args:
        use_meteor: add METEOR (pycocoevalcap + Java); None: when :func:`meteor_available`.
        **kwargs: torchmetrics ``Metric`` options.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, use_meteor: bool | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.use_meteor = meteor_available() if use_meteor is None else use_meteor
        self.add_state("text", default=[], dist_reduce_fx="cat")
        self.cider_per_image = torch.zeros(0, dtype=torch.float64)  # not a state: a by-product of compute()

    def update(self, preds: Sequence[str], target: Sequence[Sequence[str]]) -> None:
        """Add candidates ``preds`` (one string per image) and their references ``target`` (strings per image)."""
        if len(preds):
            self.text.append(_pack(preds, target).to(self.device))

    def compute(self) -> dict[str, Tensor]:
        data = self.text if isinstance(self.text, Tensor) else torch.cat(self.text) if self.text else None
        cands, refs = _unpack(data) if data is not None else ([], [])
        values = dict(zip(("bleu1", "bleu2", "bleu3", "bleu4"), bleu(cands, refs) if cands else [0.0] * 4))
        if self.use_meteor:
            values["meteor"] = meteor(cands, refs) if cands else 0.0
        values["rouge_l"] = rouge_l(cands, refs)
        per_image = cider_d_per_image(cands, refs)
        self.cider_per_image = torch.tensor(per_image, dtype=torch.float64)
        values["cider"] = sum(per_image) / len(per_image) if per_image else 0.0  # = cider_d(cands, refs)
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()}
