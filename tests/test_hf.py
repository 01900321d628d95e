"""The Hugging Face backend (dtem_lightning/hf.py) on tiny random configs built here: nothing downloads.

r = 0 identity, token counts, ToMe on HF ViT = ToMe on the same weights in timm, DTEM soft -> hard limit, GIT's
generate with merging, refusals, and a CLI fit + test through an hf:<folder> backbone.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT, read_sweep
from timm.models.vision_transformer import VisionTransformer

from dtem_lightning import DTEMHard, DTEMSoft, NoMerge, ToMe, apply_policy
from dtem_lightning.encoder import MergingEncoder

tf = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
from dtem_lightning import hf  # noqa: E402

POLICIES = [NoMerge, ToMe, DTEMHard, DTEMSoft]
VISION = dict(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=3, num_attention_heads=2)


def vit_config(**kw: object) -> tf.ViTConfig:
    cfg = dict(VISION, intermediate_size=64, num_labels=5, layer_norm_eps=1e-6)
    return tf.ViTConfig(**{**cfg, **kw})


def git_config() -> tf.GitConfig:
    vision = dict(VISION, num_hidden_layers=2, intermediate_size=64)
    return tf.GitConfig(
        vision_config=vision,
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


MODELS = {
    "vit_cls": lambda: tf.ViTForImageClassification(vit_config()),
    "vit_pooler": lambda: tf.ViTModel(vit_config()),
    "vit_eager": lambda: tf.ViTModel(vit_config(attn_implementation="eager"), add_pooling_layer=False),
    "clip": lambda: tf.CLIPVisionModel(tf.CLIPVisionConfig(**VISION, intermediate_size=64)),
    "git": lambda: tf.GitForCausalLM(git_config()),
}


def make(name: str) -> torch.nn.Module:
    """Model ``name`` with seeded random weights; norms perturbed too (at init they are all equal, and a
    backend that swapped two of them would pass unseen)."""
    torch.manual_seed(0)
    m = MODELS[name]()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.normal_(1.0, 0.2), mod.bias.normal_(0.0, 0.2)
    return m.eval()


def features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The vision output of any model here (GIT: its image encoder's tokens; else the model's first output)."""
    if isinstance(model, tf.GitForCausalLM):
        return model.git.image_encoder(x).last_hidden_state
    return model(x)[0]


@pytest.mark.parametrize("name", list(MODELS))
def test_r0_is_bit_identical(name):
    model = make(name)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = features(model, x)
    keys = set(model.state_dict())
    for cls in POLICIES:
        m = make(name)
        policy = cls(r=0)
        hf.apply_policy(m, policy)
        assert set(m.state_dict()) == keys  # keys never change
        with torch.no_grad():
            assert torch.equal(features(m, x), ref), cls.__name__
        m.train(), policy.train()  # soft mode at r = 0: also the identity (no dropout in these configs)
        with torch.no_grad():
            assert torch.equal(features(m, x), ref), cls.__name__


@pytest.mark.parametrize("name", ["vit_cls", "clip", "git"])
def test_token_counts_follow_r(name):
    enc = MergingEncoder(make(name), ToMe(r=8))
    out = enc(torch.randn(2, 3, 32, 32))
    assert enc.last_token_counts == [57, 49, 41][: enc.depth]
    assert out.tokens.shape[1] == enc.last_token_counts[-1] == out.size.shape[1]
    assert out.size.sum(1).flatten().tolist() == [65.0, 65.0]
    with enc.running(enc.policy, 4):
        enc(torch.randn(2, 3, 32, 32))
        assert enc.last_token_counts == [61, 57, 53][: enc.depth]
    soft = DTEMSoft(r=8)
    enc.add_policies([soft])
    enc.use(soft)
    enc.backbone.train()
    assert enc(torch.randn(2, 3, 32, 32)).tokens.shape[1] == 65  # soft: length kept, active count drops
    assert enc.last_token_counts == [57, 49, 41][: enc.depth]


def _timm_twin(model: tf.ViTForImageClassification) -> VisionTransformer:
    """The timm ViT with the weights of an HF ViT (q, k, v fused into qkv; names mapped)."""
    cfg = model.config
    vit = VisionTransformer(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.hidden_size,
        depth=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads,
        mlp_ratio=cfg.intermediate_size / cfg.hidden_size,
        num_classes=cfg.num_labels,
    ).eval()
    s = model.state_dict()
    out = {
        "cls_token": s["vit.embeddings.cls_token"],
        "pos_embed": s["vit.embeddings.position_embeddings"],
        "patch_embed.proj.weight": s["vit.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": s["vit.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": s["vit.layernorm.weight"],
        "norm.bias": s["vit.layernorm.bias"],
        "head.weight": s["classifier.weight"],
        "head.bias": s["classifier.bias"],
    }
    for i in range(cfg.num_hidden_layers):
        h, t = f"vit.layers.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[t + f"attn.qkv.{kind}"] = torch.cat([s[h + f"attention.{p}_proj.{kind}"] for p in "qkv"])
            out[t + f"attn.proj.{kind}"] = s[h + f"attention.o_proj.{kind}"]
            out[t + f"norm1.{kind}"] = s[h + f"layernorm_before.{kind}"]
            out[t + f"norm2.{kind}"] = s[h + f"layernorm_after.{kind}"]
            out[t + f"mlp.fc1.{kind}"] = s[h + f"mlp.fc1.{kind}"]
            out[t + f"mlp.fc2.{kind}"] = s[h + f"mlp.fc2.{kind}"]
    vit.load_state_dict(out)
    return vit


@pytest.mark.parametrize("r", [0, 8])
def test_tome_on_hf_vit_equals_tome_on_timm(r):
    model = make("vit_cls")
    twin = _timm_twin(model)
    x = torch.randn(3, 3, 32, 32)
    p_hf, p_timm = ToMe(r=r), ToMe(r=r)
    hf.apply_policy(model, p_hf)
    apply_policy(twin, p_timm)
    with torch.no_grad():
        logits, ref = model(x).logits, twin(x)
    assert p_hf.state.tokens == p_timm.state.tokens == ([57, 49, 41] if r else [65] * 3)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p_hf.state.size, p_timm.state.size) if r else None


def test_soft_training_tends_to_hard_merging():
    """DTEMSoft in train mode at a tiny selection temperature gives the logits of hard merging with the same
    embedding (same split: soft_layout consistent): merged-away tokens stay in the sequence at ~0 size and drop
    out of the later blocks' attention through the proportional-attention bias. One merging block: over several,
    the two regimes order tied tokens differently (docs/soft_layout.md), so later splits differ."""
    model = make("vit_cls").double()
    soft = DTEMSoft(r=[6, 0, 0], tau2=1e-4, soft_layout="consistent")
    hf.apply_policy(model, soft)
    hard = DTEMHard(r=[6, 0, 0])
    hard.bind(hf.describe(model))
    hard.load_state_dict(soft.state_dict())
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        model.train()
        soft_logits = model(x).logits
        assert soft.state.size.shape[1] == 65 and soft.state.tokens == [59, 59, 59]
        model.eval()
        hf.use_policy(model, hard)
        hard_logits = model(x).logits
        assert hard.state.tokens == [59, 59, 59]
    torch.testing.assert_close(soft_logits, hard_logits, atol=1e-7, rtol=0)
    soft.tau2 = 0.1  # not the limit: the same check fails
    with torch.no_grad():
        hf.use_policy(model, soft)
        model.train()
        assert (model(x).logits - hard_logits).abs().max() > 1e-4


def _greedy_without_cache(model: torch.nn.Module, x: torch.Tensor, steps: int) -> tuple[torch.Tensor, list]:
    """Greedy decoding by full forwards (no cache): the reference for generate's cached steps."""
    ids = torch.ones(x.shape[0], 1, dtype=torch.long)
    scores = []
    for _ in range(steps):
        logits = model(input_ids=ids, pixel_values=x).logits[:, -1]
        scores.append(logits)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    return ids, scores


@pytest.mark.parametrize("r", [0, 8])
def test_git_generate_with_merging(r):
    model = make("git")
    with torch.no_grad():  # a decoder that reads the image: random GIT ignores it
        model.git.visual_projection.visual_projection[0].weight.mul_(30)
    policy = ToMe(r=r)
    hf.apply_policy(model, policy)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ids, scores = _greedy_without_cache(model, x, 5)
        out = model.generate(
            pixel_values=x,
            input_ids=torch.ones(2, 1, dtype=torch.long),
            max_new_tokens=5,
            min_new_tokens=5,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    visual = 65 - 2 * r
    assert policy.state.tokens[-1] == visual
    assert model.git.encoder.layer[1].attention.self.image_patch_tokens == visual
    assert torch.equal(out.sequences, ids)
    for a, b in zip(out.logits, scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # GIT's loss slices the text logits after image_patch_tokens: it must follow the merged count
    text = torch.tensor([[1, 5, 6, 7, 2]] * 2)
    with torch.no_grad():
        out = model(input_ids=text, pixel_values=x, labels=text)
    ref = torch.nn.functional.cross_entropy(out.logits[:, visual:-1].flatten(0, 1), text[:, 1:].flatten())
    torch.testing.assert_close(out.loss, ref)


def test_refusals():
    with pytest.raises(ValueError, match="model class BertModel"):
        hf.apply_policy(
            tf.BertModel(tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)), ToMe()
        )
    m = make("vit_cls")
    m.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="attn_implementation 'flex_attention'"):
        hf.apply_policy(m, ToMe())
    m = make("vit_cls")
    m.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        hf.apply_policy(m, ToMe())
    m = make("vit_cls")
    hf.apply_policy(m, ToMe())
    with pytest.raises(RuntimeError, match="already applied"):
        hf.apply_policy(m, ToMe())
    with pytest.raises(ValueError, match=r"timm.list_models\(\)\) nor hf:<hub id or folder>"):
        MergingEncoder("no_such_model")


def test_missing_extra_is_named_and_layers_import_downwards(monkeypatch):
    import ast
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the extra were not installed
    with pytest.raises(ImportError, match=r"pip install 'dtem-lightning\[hf\]'"):
        hf.create("hf:some/model", {})
    tree = ast.parse((ROOT / "dtem_lightning" / "hf.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert {m for m in imported if m.startswith("dtem_lightning")} == {"dtem_lightning.policy"}
    top = [
        n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)
    ]  # module level: no transformers
    assert not [n for n in top if "transformers" in ast.dump(n)]


def test_created_from_a_local_folder(tmp_path):
    make("vit_cls").save_pretrained(tmp_path)
    enc = MergingEncoder(f"hf:{tmp_path}", ToMe(r=4), create_kwargs={"num_classes": 5, "img_size": 32})
    assert (enc.depth, enc.width, enc.num_heads, enc.patch_size, enc.img_size) == (3, 32, 2, (4, 4), (32, 32))
    assert enc.num_tokens() == 65 and enc.global_pool == "token"
    assert enc.forward_head(enc(torch.randn(1, 3, 32, 32))).shape == (1, 5)
    assert hf.data_backbone(f"hf:{tmp_path}") == "vit_base_patch16_224.augreg_in21k"
    with pytest.raises(ValueError, match="has 5 labels but the task has num_classes=10"):
        MergingEncoder(f"hf:{tmp_path}", create_kwargs={"num_classes": 10})
    with pytest.raises(ValueError, match="image_size=32, got img_size=64"):
        MergingEncoder(f"hf:{tmp_path}", create_kwargs={"img_size": 64})


def test_cli_fit_then_test_sweeps_and_loads_back(tmp_path, image_root):
    from dtem_lightning.cli import main

    folder = tmp_path / "hf_vit"
    torch.manual_seed(0)
    tf.ViTForImageClassification(vit_config(num_labels=10)).save_pretrained(folder)
    args = [
        "--model=ClassificationTask",
        f"--model.init_args.backbone=hf:{folder}",
        "--model.init_args.num_classes=10",
        "--model.init_args.train=policy",
        "--model.init_args.policy=DTEMSoft",
        "--model.init_args.policy.r=4",
        "--model.init_args.test_r=[0,4,8]",
        "--model.init_args.test_policies+=ToMe",
        "--data=ImageFolderDataModule",
        f"--data.init_args.root={image_root}",
        "--data.init_args.img_size=32",
        "--data.init_args.batch_size=8",
        "--data.init_args.max_per_class=4",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=2",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
    ]
    main(["fit", *args])
    ckpt = next((tmp_path / "runs").rglob("last.ckpt"))
    main(["test", *args, f"--ckpt_path={ckpt}"])
    rows = read_sweep(tmp_path / "runs")
    got = [(r["policy"], int(r["r"]), int(r["tokens"])) for r in rows]
    assert got == [
        ("DTEM (trained)", 4, 53),
        ("DTEM (trained)", 8, 41),
        ("ToMe", 4, 53),
        ("ToMe", 8, 41),
        ("NoMerge", 0, 65),
    ]
    assert float(rows[1]["gflops"]) < float(rows[0]["gflops"]) < float(rows[-1]["gflops"])
    # the checkpoint loads back into a task: the trained embedding is in it
    from dtem_lightning.tasks import ClassificationTask

    state = torch.load(ckpt, weights_only=True)["state_dict"]
    task = ClassificationTask(backbone=f"hf:{folder}", num_classes=10, policy=DTEMSoft(r=4))
    task.load_state_dict(state)
    assert torch.equal(task.policy.embed[0].weight, state["policy.embed.0.weight"])


# ---------------------------------------------------------------------- pretrained GIT captioning
WORDS = "a dog cat man runs sits on the grass red ball".split()


@pytest.fixture(scope="module")
def git_folder(tmp_path_factory) -> str:
    """A tiny random GitForCausalLM with a BERT WordPiece tokenizer of WORDS, saved as a pretrained folder."""
    folder = tmp_path_factory.mktemp("git")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = tf.BertTokenizer(vocab=str(folder / "vocab.txt"))
    assert len(tok) == len(vocab)
    cfg = git_config()
    cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = len(vocab), 2, 3, 0
    torch.manual_seed(0)
    model = tf.GitForCausalLM(cfg)
    with torch.no_grad():  # a decoder that reads the image (random GIT barely does)
        model.git.visual_projection.visual_projection[0].weight.mul_(30)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def caption_root(tmp_path_factory) -> str:
    """20 random 40x48 images with two captions each from WORDS, in the Karpathy layout (12 train / 4 / 4)."""
    import json

    from PIL import Image

    root = tmp_path_factory.mktemp("captions")
    (root / "images").mkdir()
    g = torch.Generator().manual_seed(0)
    images = []
    for i in range(20):
        Image.fromarray((torch.rand(40, 48, 3, generator=g) * 255).byte().numpy()).save(
            root / "images" / f"{i}.jpg"
        )
        caps = [" ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (6,), generator=g)) for _ in range(2)]
        split = "train" if i < 12 else "val" if i < 16 else "test"
        images.append(
            {
                "filepath": "images",
                "filename": f"{i}.jpg",
                "split": split,
                "sentences": [{"raw": c} for c in caps],
            }
        )
    (root / "dataset_coco.json").write_text(json.dumps({"images": images}))
    return str(root)


def test_git_task_trains_only_the_embedding_and_decodes(git_folder):
    from dtem_lightning.tasks import GitCaptioningTask

    task = GitCaptioningTask(backbone=f"hf:{git_folder}", policy=DTEMSoft(r=8), train="policy", max_len=5)
    task.apply_train_mode()
    trainable = [n for n, p in task.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("policy.embed.") for n in trainable)
    x = torch.randn(2, 3, 32, 32)
    task.train()
    loss = task.caption_loss(x, [["a dog runs"], ["the red ball"]])
    loss.backward()
    assert task.encoder.last_token_counts == [57, 49]  # soft: active counts; the loss saw all 65 tokens
    assert task.policy.embed[0].weight.grad.abs().sum() > 0
    task.eval()
    for r, visual in ((0, 65), (8, 49)):
        with task.encoder.running(task.policy, r):
            caps = task.generate(x)
        assert task.backbone.git.encoder.layer[0].attention.self.image_patch_tokens == visual
        assert len(caps) == 2 and all(c and set(c.split()) <= {*WORDS, "[UNK]", "."} for c in caps), caps
    assert task.gmacs((3, 32, 32)) > 0


def test_git_sweep_through_the_cli(git_folder, caption_root, tmp_path):
    from dtem_lightning.cli import main

    args = [
        "-c", str(ROOT / "configs" / "hf" / "git_b_coco_pretrained.yaml"),
        f"--model.init_args.backbone=hf:{git_folder}",
        "--model.init_args.max_len=5", "--model.init_args.beam_size=2", "--model.init_args.use_meteor=false",
        "--model.init_args.test_r=[0,4,8]",
        f"--data.init_args.root={caption_root}", "--data.init_args.img_size=32", "--data.init_args.batch_size=4",
        "--data.init_args.num_workers=0", "--data.init_args.min_freq=1",
        "--trainer.max_epochs=1", "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]  # fmt: skip
    main(["fit", *args])
    ckpt = next(tmp_path.rglob("last.ckpt"))
    main(["test", *args, f"--ckpt_path={ckpt}"])
    rows = read_sweep(tmp_path)
    got = [(r["policy"], int(r["r"]), int(r["tokens"])) for r in rows]
    assert got == [
        ("DTEM (trained)", 4, 57), ("DTEM (trained)", 8, 49), ("NoMerge", 0, 65), ("ToMe", 4, 57), ("ToMe", 8, 49),
        ("DTEM (untrained)", 4, 57), ("DTEM (untrained)", 8, 49),
    ]  # fmt: skip
    assert {"cider", "bleu4", "rouge_l"} <= set(rows[0])
    assert float(rows[1]["gflops"]) < float(rows[0]["gflops"]) < float(rows[2]["gflops"])
