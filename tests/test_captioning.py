"""Captioning: GIT's attention mask, r=0 identity, metrics by hand and vs pycocoevalcap, vocabulary, decoding, data."""

from __future__ import annotations

import math
import random
import zipfile

import pytest
import torch
from conftest import FLICKR, needs_shared
from torch import nn

from dtem_lightning.data.captions import Flickr8kDataModule, split_by_name
from dtem_lightning.policy import DTEMHard, NoMerge, ToMe
from dtem_lightning.tasks.captioning import CaptioningTask
from dtem_lightning.tasks.decoders import git_attention_mask
from dtem_lightning.text import SPECIALS, CaptionMetrics, Vocabulary, bleu, cider_d, rouge_l, tokenize

CAPTIONS = ["a dog runs on the grass .", "a man sits on a red bench", "two dogs play with a ball", "a dog ."]


def tiny_task(policy=None, **kw) -> CaptioningTask:
    task = CaptioningTask(
        backbone="vit_tiny_patch16_224",
        backbone_kwargs=dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=2),
        policy=policy,
        decoder_width=32,
        decoder_depth=2,
        decoder_heads=2,
        decoder_dropout=0.0,
        max_len=8,
        use_meteor=False,
        **kw,
    )
    task.set_vocab(Vocabulary.build(CAPTIONS, min_freq=1))
    return task.eval()


def test_attention_mask_is_gits():
    inf = float("-inf")
    expected = torch.tensor(
        [  # 2 visual tokens, 3 text tokens: visual<->visual full, visual->text none, text->visual full + causal
            [0, 0, inf, inf, inf],
            [0, 0, inf, inf, inf],
            [0, 0, 0, inf, inf],
            [0, 0, 0, 0, inf],
            [0, 0, 0, 0, 0],
        ]
    )
    assert torch.equal(git_attention_mask(2, 3)[0, 0], expected)
    size = torch.tensor([[[1.0], [3.0]]])
    biased = git_attention_mask(2, 3, size)[0, 0]
    bias = torch.tensor([math.log(1.0 + 1e-6), math.log(3.0 + 1e-6), 0.0, 0.0, 0.0])
    assert torch.allclose(biased, expected + bias, atol=1e-6)  # log(size) on the visual key columns only


def test_r0_changes_nothing():
    x = torch.randn(2, 3, 32, 32)
    tokens = torch.tensor([[1, 4, 5, 6], [1, 7, 8, 2]])
    ref = tiny_task(NoMerge())
    for policy in (ToMe(r=0), DTEMHard(r=0)):
        task = tiny_task(policy)
        task.load_state_dict(ref.state_dict(), strict=False)
        assert torch.equal(task(x, tokens), ref(x, tokens))
    merged = tiny_task(ToMe(r=8))
    merged.load_state_dict(ref.state_dict(), strict=False)
    assert not torch.allclose(merged(x, tokens), ref(x, tokens))
    assert merged.encode(x)[0].shape[1] == 65 - 16


def test_metrics_match_hand_computed_values():
    cand, ref = "a b c d".split(), "a b c e".split()
    b = bleu([cand], [[ref]])
    assert b[0] == pytest.approx(3 / 4) and b[1] == pytest.approx(math.sqrt(3 / 4 * 2 / 3))
    assert b[2] == pytest.approx((3 / 4 * 2 / 3 * 1 / 2) ** (1 / 3))
    assert b[3] < 1e-3  # no matching 4-gram
    assert bleu([["a", "b"]], [[["a", "b", "c", "d"]]])[0] == pytest.approx(math.exp(1 - 4 / 2))  # brevity
    assert rouge_l([cand], [[ref]]) == pytest.approx(0.75)
    p, r = 2 / 4, 2 / 2  # LCS "a b"; best precision and best recall over references
    assert rouge_l([cand], [[["a", "b"], ["x"]]]) == pytest.approx((1 + 1.44) * p * r / (r + 1.44 * p))
    # Two images with disjoint words: an exact match scores 10, a miss 0.
    same, other = "w x y z".split(), "p q r s".split()
    assert cider_d([same, same], [[same], [other]]) == pytest.approx(5.0)
    m = CaptionMetrics(use_meteor=False)
    m.update(["A dog runs."], [["a dog runs", "the dog is running ."]])
    out = m.compute()
    assert list(out) == ["bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider"]
    assert out["bleu1"] == pytest.approx(1.0) and out["rouge_l"] == pytest.approx(1.0)
    assert tokenize("A dog's toy, isn't it?") == ["a", "dog", "'s", "toy", "is", "n't", "it"]


def test_metrics_match_pycocoevalcap():
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    g = torch.Generator().manual_seed(0)
    words = "a dog cat man runs sits on the grass red ball with two".split()

    def sent(n: int) -> list[str]:
        return [words[i] for i in torch.randint(0, len(words), (n,), generator=g)]

    cands = [sent(int(torch.randint(3, 9, (1,), generator=g))) for _ in range(12)]
    refs = [[sent(int(torch.randint(3, 9, (1,), generator=g))) for _ in range(3)] for _ in range(12)]
    res = {i: [" ".join(c)] for i, c in enumerate(cands)}
    gts = {i: [" ".join(r) for r in rs] for i, rs in enumerate(refs)}
    ref_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    ref_cider, _ = Cider().compute_score(gts, res)
    assert bleu(cands, refs) == pytest.approx(ref_bleu, rel=1e-6)
    assert cider_d(cands, refs) == pytest.approx(ref_cider, rel=1e-6)


def test_vocabulary_round_trips_through_checkpoint(tmp_path):
    import lightning as L

    task = tiny_task()
    trainer = L.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu")
    trainer.strategy.connect(task)
    path = tmp_path / "c.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["vocab"]["itos"] == task.vocab.itos
    fresh = tiny_task()
    fresh.set_vocab(Vocabulary(["other"]))  # a different (smaller) vocabulary is replaced, layers resized
    fresh.on_load_checkpoint(ckpt)
    fresh.load_state_dict(ckpt["state_dict"])
    assert fresh.vocab == task.vocab
    assert fresh.decoder.head.weight.shape == task.decoder.head.weight.shape


def test_beam_size_one_equals_greedy_and_decoding_is_batched():
    task = tiny_task(ToMe(r=4))
    x = torch.randn(3, 3, 32, 32)
    greedy = task.greedy(x)
    assert task.beam_search(x, beam_size=1) == greedy
    assert [task.greedy(x[i : i + 1])[0] for i in range(3)] == greedy  # batching changes nothing
    beams = task.beam_search(x, beam_size=3)
    assert len(beams) == 3 and all(len(c.split()) <= 8 for c in beams)


class Bigram(nn.Module):
    """Decoder stand-in: next-token log-probs depend on the previous token only (``table[prev]``, [V, V])."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, visual: torch.Tensor, size: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
        return self.table[tokens].expand(len(visual), -1, -1)  # [B, T, V]


def test_beam_finds_the_better_caption_greedy_misses():
    """A bigram trap: greedy takes "a" (p .5), then stopping is likeliest (.1); "two dogs" scores .4 · .9 · 1."""
    task = tiny_task()
    v = task.vocab
    probs = torch.zeros(len(v), len(v))
    probs[:, v.eos] = 1.0  # any other word ends the caption
    probs[v.bos, [v.stoi["a"], v.stoi["two"], v.stoi["dog"], v.eos]] = torch.tensor([0.5, 0.4, 0.1, 0.0])
    probs[v.stoi["a"], len(SPECIALS) :] = 0.9 / (len(v) - len(SPECIALS))  # after "a": every word 0.06
    probs[v.stoi["a"], v.eos] = 0.1
    probs[v.stoi["two"], [v.stoi["dogs"], v.stoi["play"], v.eos]] = torch.tensor([0.9, 0.1, 0.0])
    assert torch.allclose(probs.sum(1), torch.ones(len(v)))
    task.decoder = Bigram((probs + 1e-9).log())
    x = torch.randn(2, 3, 32, 32)

    def logp(caption: str) -> float:
        t = torch.tensor([[v.bos, *v.encode(caption), v.eos]])
        return float(task(x[:1], t[:, :-1]).log_softmax(-1)[0].gather(1, t[0, 1:, None]).sum())

    greedy, beam = task.greedy(x), task.beam_search(x, beam_size=4)
    assert greedy == ["a", "a"] and task.beam_search(x, beam_size=1) == greedy
    assert beam == ["two dogs", "two dogs"] and logp(beam[0]) > logp(greedy[0])
    assert logp("a") == pytest.approx(math.log(0.5 * 0.1)) and logp("two dogs") == pytest.approx(
        math.log(0.36)
    )


def test_training_step_learns_and_freezes():
    """A few teacher-forced steps make greedy decoding return each image's own caption; the backbone stays fixed."""
    task = tiny_task(freeze_backbone=True, label_smoothing=0.0).train()
    images = torch.randn(2, 3, 32, 32)
    captions = [[CAPTIONS[1]], [CAPTIONS[2]]]  # differ from the first word on: the decoder must use the image
    assert not any(p.requires_grad for p in task.backbone.parameters())
    backbone = {k: t.clone() for k, t in task.backbone.state_dict().items()}
    opt = torch.optim.Adam([p for p in task.parameters() if p.requires_grad], lr=3e-3)
    with torch.no_grad():
        first = float(task.training_loss((images, captions)))
    for _ in range(60):
        opt.zero_grad()
        loss = task.training_loss((images, captions))
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first  # about 0.03 (several seeds tried): memorised
    task.eval()
    assert task.greedy(images) == ["a man sits on a red bench", "two dogs play with a ball"]
    assert all(torch.equal(t, backbone[k]) for k, t in task.backbone.state_dict().items())
    assert task.gmacs((3, 32, 32)) > 0


def test_bag_of_words_and_concept_mask():
    vocab = Vocabulary.build(CAPTIONS, min_freq=1)
    bow = vocab.bag_of_words([["A dog runs", "the zebra"], ["two dogs"]])
    assert {vocab.itos[i] for i in bow[0].nonzero()[:, 0]} == {"a", "dog", "runs", "the"}  # zebra is unknown
    assert {vocab.itos[i] for i in bow[1].nonzero()[:, 0]} == {"two", "dogs"}
    concepts = {vocab.itos[i] for i in vocab.concept_mask().nonzero()[:, 0]}
    assert {"dog", "grass", "red", "ball"} <= concepts and not {"a", "the", "on", "<bos>", "<unk>"} & concepts


def test_concept_loss_trains_the_encoder_and_survives_a_vocabulary_change():
    task = tiny_task(ToMe(r=4), concept_weight=0.5).train()
    batch = (torch.randn(2, 3, 32, 32), [CAPTIONS[:2], CAPTIONS[2:]])
    visual, size = task.encode(batch[0])
    caption = task.caption_loss(visual, size, batch[1], 1)
    concept = task.concept_loss(visual, size, batch[1])
    # A linear head at init: BCE ~ log 2 per concept word, divided by the image's positive words.
    assert concept > 0 and torch.isfinite(concept)
    random.seed(0)
    total = task.training_loss(batch)
    random.seed(0)
    task.hparams.concept_weight = 0.0
    off = task.training_loss(batch)
    task.hparams.concept_weight = 0.5
    assert float(total) > float(off)  # the tagging term is added (captions sampled the same way)
    total.backward()
    assert task.concept_head.weight.grad is not None
    assert task.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    task.set_vocab(Vocabulary(["dog", "cat"]))
    assert task.concept_head.out_features == len(task.vocab) == 6
    assert tiny_task().concept_head is None  # off by default: no extra parameters, GIT's loss only
    with pytest.raises(ValueError, match="concept_weight"):
        tiny_task(concept_weight=-1.0)
    assert float(caption) > 0


def test_split_by_name_is_deterministic():
    samples = [(f"{i:04d}.jpg", ["c"]) for i in range(1000)][::-1]
    s = split_by_name(samples, (0.8, 0.1))
    assert [len(s[k]) for k in ("train", "val", "test")] == [800, 100, 100]
    assert s["train"][0][0] == "0000.jpg" and s["test"][-1][0] == "0999.jpg"


@needs_shared(FLICKR)
def test_flickr8k_zip_layout():
    dm = Flickr8kDataModule(str(FLICKR), img_size=32, min_freq=3, batch_size=4)
    assert [len(dm.samples[k]) for k in ("train", "val", "test")] == [800, 100, 100]
    with zipfile.ZipFile(FLICKR) as zf:
        first = sorted(n for n in zf.namelist() if n.endswith(".jpg"))[0]
    assert dm.samples["train"][0][0] == first and len(dm.samples["train"][0][1]) == 5
    dm.setup("test")
    images, caps = next(iter(dm.test_dataloader()))
    assert images.shape == (4, 3, 32, 32) and len(caps) == 4 and len(caps[0]) == 5
    assert dm.vocab_size == len(dm.vocab) > 100
