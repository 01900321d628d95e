"""The modular regime from a whole task checkpoint (``init_from``) with ``train: policy | policy+head | all``, for
classification (through the CLI), segmentation and captioning; frozen parts in eval mode; refused mismatches."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import timm
import torch
from conftest import ROOT
from PIL import Image
from torch import Tensor

from dtem_lightning.cli import main
from dtem_lightning.data import CamVidDataModule, Flickr8kDataModule
from dtem_lightning.patch import MergeBlock
from dtem_lightning.policy import DTEMSoft
from dtem_lightning.tasks.captioning import CaptioningTask
from dtem_lightning.tasks.classification import ClassificationTask
from dtem_lightning.tasks.segmentation import SegmentationTask

CONFIGS = ROOT / "configs"
VIT = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2)  # 8x8 patches on 32x32 images


# ------------------------------------------------------------------ helpers
def weights(path: Path) -> dict[str, Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def changed(before: dict[str, Tensor], after: dict[str, Tensor]) -> set[str]:
    """Keys whose tensors differ (the key sets must be equal)."""
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


def cli_fit(image_root: str, out: Path, *extra: str) -> Path:
    """``dtem fit`` of the paper's modular DeiT-S config under the debug overlay; returns its last.ckpt."""
    main(["fit", "-c", str(CONFIGS / "deit_s_modular.yaml"), "-c", str(CONFIGS / "debug.yaml"),
          f"--data.init_args.root={image_root}", f"--trainer.logger.init_args.save_dir={out}", *extra])  # fmt: skip
    return next(out.rglob("last.ckpt"))


def fit(task: L.LightningModule, dm: L.LightningDataModule, ckpt: Path, *callbacks: L.Callback) -> Path:
    """Two training steps, then the checkpoint Lightning writes (what ``dtem fit`` saves)."""
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
    )  # fmt: skip
    trainer.fit(task, dm)
    trainer.save_checkpoint(ckpt)
    return ckpt


def image(g: torch.Generator, path: Path) -> None:
    Image.fromarray((torch.rand(40, 48, 3, generator=g) * 255).byte().numpy()).save(path)


@pytest.fixture(scope="module")
def camvid_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A CamVid-layout tree of 4 random 48x40 images per split with labels 0..11 (11 = void)."""
    root, g = tmp_path_factory.mktemp("camvid"), torch.Generator().manual_seed(0)
    for split in ("train", "val", "test"):
        (root / split).mkdir()
        (root / f"{split}annot").mkdir()
        for i in range(4):
            image(g, root / split / f"{i}.jpg")
            lab = torch.randint(0, 12, (40, 48), generator=g).byte().numpy()
            Image.fromarray(lab).save(root / f"{split}annot" / f"{i}.png")
    return str(root)


@pytest.fixture(scope="module")
def flickr_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Flickr8k-layout folder (captions.txt + images/) of 12 random images with 2 random captions each."""
    root, g = tmp_path_factory.mktemp("flickr"), torch.Generator().manual_seed(0)
    words = "a dog cat man runs sits on the grass red ball".split()
    (root / "images").mkdir()
    rows = []
    for i in range(12):
        image(g, root / "images" / f"{i}.jpg")
        for _ in range(2):
            rows.append(
                f"{i}.jpg," + " ".join(words[j] for j in torch.randint(0, len(words), (5,), generator=g))
            )
    (root / "captions.txt").write_text("image,caption\n" + "\n".join(rows) + "\n")
    return str(root)


def seg_task(**kw: object) -> SegmentationTask:
    args = dict(
        num_classes=11, decoder="mask_transformer", decoder_dim=32, decoder_depth=1, decoder_heads=2,
        backbone="vit_tiny_patch16_224", img_size=32, backbone_kwargs=VIT, policy=DTEMSoft(r=4),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
    )  # fmt: skip
    return SegmentationTask(**{**args, **kw})


def seg_data(root: str) -> CamVidDataModule:
    return CamVidDataModule(root, img_size=32, batch_size=2, backbone="vit_tiny_patch16_224")


def cap_task(**kw: object) -> CaptioningTask:
    args = dict(
        backbone="vit_tiny_patch16_224", backbone_kwargs=dict(img_size=32, **VIT), policy=DTEMSoft(r=4),
        decoder_width=32, decoder_depth=1, decoder_heads=2, max_len=6, use_meteor=False,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
    )  # fmt: skip
    return CaptioningTask(**{**args, **kw})


def cap_data(root: str) -> Flickr8kDataModule:
    return Flickr8kDataModule(root, min_freq=1, batch_size=2, img_size=32, backbone="vit_tiny_patch16_224")


TASKS = {
    "segmentation": (seg_task, seg_data, "camvid_root", "decoder."),
    "captioning": (cap_task, cap_data, "flickr_root", "decoder."),
}


@pytest.fixture(scope="module")
def first_fits(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Task -> checkpoint of an end-to-end fit (``train: all``) of a fresh tiny model with DTEMSoft."""
    out = {}
    for name, (make, data, root, _) in TASKS.items():
        torch.manual_seed(0)
        dm = data(request.getfixturevalue(root))
        out[name] = fit(make(train="all"), dm, tmp_path_factory.mktemp(name) / "task.ckpt")
    return out


@pytest.fixture(scope="module")
def cls_first(image_root: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """last.ckpt of an end-to-end ``dtem fit`` (backbone, head and policy train)."""
    return cli_fit(image_root, tmp_path_factory.mktemp("cls_first"), "--model.init_args.train=all")


# ------------------------------------------------------------------ classification, through the CLI
def test_cli_modular_fit_trains_only_the_policy(cls_first, image_root, tmp_path):
    first = weights(cls_first)
    ckpt = cli_fit(
        image_root, tmp_path, f"--model.init_args.init_from={cls_first}", "--model.init_args.train=policy"
    )
    diff = changed(first, weights(ckpt))
    assert diff and all(k.startswith("policy.") for k in diff), sorted(diff)
    assert "policy.embed.0.weight" in diff  # continued from the checkpoint's embedding, and trained


def test_cli_policy_and_head_trains_the_classifier_head(cls_first, image_root, tmp_path):
    first = weights(cls_first)
    ckpt = cli_fit(
        image_root, tmp_path, f"--model.init_args.init_from={cls_first}", "--model.init_args.train=policy+head",
        "--model.init_args.checkpoint_path=/no/such/weights.pth",  # not read: init_from's weights replace it
    )  # fmt: skip
    diff = changed(first, weights(ckpt))
    head = {"backbone.head.weight", "backbone.head.bias"}
    assert head <= diff and "policy.embed.0.weight" in diff
    assert all(k.startswith("policy.") or k in head for k in diff), sorted(diff)


def test_cli_refuses_init_from_of_another_architecture(cls_first, image_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_fit(image_root, tmp_path, f"--model.init_args.init_from={cls_first}",
                "--model.init_args.backbone_kwargs.embed_dim=32")  # fmt: skip
    assert e.value.code == 2
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("dtem: error:")]
    assert f"init_from {cls_first} does not match the model: backbone." in line
    assert "48] in the file, [" in line and "32] in the model" in line, line


# ------------------------------------------------------------------ segmentation and captioning
@pytest.mark.parametrize("name", list(TASKS))
def test_modular_fit_trains_only_the_policy(name, first_fits, request, tmp_path):
    make, data, root, _ = TASKS[name]
    first = weights(first_fits[name])
    task = make(init_from=str(first_fits[name]), train="policy")
    diff = changed(first, weights(fit(task, data(request.getfixturevalue(root)), tmp_path / "m.ckpt")))
    assert diff and all(k.startswith("policy.") for k in diff), sorted(diff)
    assert "policy.embed.0.weight" in diff


@pytest.mark.parametrize("name", list(TASKS))
def test_policy_and_head_trains_the_decoder_not_the_encoder(name, first_fits, request, tmp_path):
    make, data, root, head = TASKS[name]
    first = weights(first_fits[name])
    task = make(init_from=str(first_fits[name]), train="policy+head")
    diff = changed(first, weights(fit(task, data(request.getfixturevalue(root)), tmp_path / "m.ckpt")))
    assert any(k.startswith(head) for k in diff) and "policy.embed.0.weight" in diff
    assert all(k.startswith(("policy.", head)) for k in diff), sorted(diff)


@pytest.mark.parametrize(
    "name,other,needle",
    [
        ("segmentation", dict(decoder_depth=2), "it lacks decoder.blocks.1."),
        ("captioning", dict(decoder_width=16), "decoder."),
        ("captioning", dict(backbone_kwargs=dict(img_size=32, **{**VIT, "embed_dim": 16})), "backbone."),
    ],
    ids=["seg_decoder_depth", "cap_decoder_width", "cap_embed_dim"],
)
def test_init_from_of_another_architecture_is_one_line_error(name, other, needle, first_fits):
    make = TASKS[name][0]
    task = make(init_from=str(first_fits[name]), **other)
    with pytest.raises(ValueError, match="does not match the model") as e:
        task.configure_model()
    msg = str(e.value)
    assert "\n" not in msg and needle in msg and str(first_fits[name]) in msg
    if "lacks" not in msg:  # a shape mismatch names both shapes
        assert "in the file, [" in msg and "in the model" in msg


def test_init_from_loads_the_policy_when_it_fits_else_keeps_its_init(first_fits):
    path = first_fits["segmentation"]
    first = weights(path)
    task = seg_task(init_from=str(path), train="policy")
    task.configure_model()
    assert not changed(first, task.state_dict())  # every tensor, the policy's included
    other = seg_task(init_from=str(path), train="policy", policy=DTEMSoft(r=4, embed_dim=8))
    init = {k: v.clone() for k, v in other.policy.state_dict().items()}
    with pytest.warns(UserWarning, match=r"\[16, 32\] in the checkpoint, \[8, 32\] here"):
        with pytest.warns(UserWarning, match="keep their initialisation"):
            other.configure_model()
    assert not changed(init, other.policy.state_dict())
    rest = {k: v for k, v in other.state_dict().items() if not k.startswith("policy.")}
    assert not changed({k: first[k] for k in rest}, rest)


# ------------------------------------------------------------------ eval mode of what does not train
class ModeProbe(L.Callback):
    """At the first training batch (after a ``train()`` call, as Lightning versions that call it each epoch do):
    runs the task twice under different seeds and records whether the outputs agree."""

    def on_train_epoch_start(self, trainer: L.Trainer, task: L.LightningModule) -> None:
        task.train()

    def on_train_batch_start(
        self, trainer: L.Trainer, task: L.LightningModule, batch: object, i: int
    ) -> None:
        if i:
            return
        x = batch[0]
        outs = []
        with torch.no_grad():
            for seed in (1, 2):
                torch.manual_seed(seed)
                outs.append(task(x))
        self.same = torch.equal(*outs)
        self.soft = task.policy.state.training  # DTEM-soft still merges softly
        self.training_backbone = [
            n for n, m in task.backbone.named_modules() if m.training and not isinstance(m, MergeBlock)
        ]


@pytest.mark.parametrize("train", ["policy", "policy+head"])
def test_frozen_modules_are_in_eval_mode_during_training(train, camvid_root):
    """Drop-path and dropout in the frozen encoder (and, with ``policy``, in the frozen decoder) are off."""
    task = seg_task(
        train=train,
        decoder_dropout=0.5,
        backbone_kwargs={**VIT, "drop_path_rate": 0.5, "proj_drop_rate": 0.3},
    )
    probe = ModeProbe()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[probe],
    )  # fmt: skip
    trainer.fit(task, seg_data(camvid_root))
    assert probe.soft and task.policy.training
    assert probe.training_backbone == []
    assert probe.same is (train == "policy")  # the trained decoder keeps its dropout
    assert task.decoder.training is (train == "policy+head")


def test_classifier_dropout_and_drop_path_off_when_frozen():
    """Head dropout (drop_rate) and drop-path: off with ``policy``; the head's dropout on with ``policy+head``."""
    vit = {**VIT, "drop_rate": 0.5, "drop_path_rate": 0.5}
    x = torch.randn(2, 3, 32, 32)
    for train, deterministic in [("policy", True), ("policy+head", False), ("all", False)]:
        task = ClassificationTask(
            num_classes=3, img_size=32, policy=DTEMSoft(r=4), train=train, backbone_kwargs=vit
        )
        task.train()
        torch.manual_seed(1)
        a = task(x)
        torch.manual_seed(2)
        assert torch.equal(a, task(x)) is deterministic, train
        assert task.policy.state.training and task.training  # soft merging in training
    # the last task is end-to-end; one more with policy+head for its flags and trainable parameters
    task = ClassificationTask(
        num_classes=3, img_size=32, policy=DTEMSoft(r=4), train="policy+head", backbone_kwargs=vit
    ).train()
    assert task.backbone.head_drop.training and not task.backbone.blocks[0].drop_path1.training
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    policy = {n for n, _ in task.policy.named_parameters("policy")}
    assert trainable == policy | {"backbone.head.weight", "backbone.head.bias"}


# ------------------------------------------------------------------ checkpoint_path of another patch size
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_checkpoint_path_of_another_patch_size_is_an_error(suffix, tmp_path):
    p8 = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3, **{**VIT, "patch_size": 8})
    path = tmp_path / f"p8{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(p8.state_dict(), str(path))
    else:
        torch.save(p8.state_dict(), path)
    with pytest.raises(
        ValueError, match=r"patch size 8x8 .*\[32, 3, 8, 8\].* model has 4x4 \(\[32, 3, 4, 4\]\)"
    ):
        ClassificationTask(num_classes=3, img_size=32, checkpoint_path=str(path), backbone_kwargs=VIT)
    same = ClassificationTask(
        num_classes=3, img_size=32, checkpoint_path=str(path), backbone_kwargs={**VIT, "patch_size": 8}
    )
    assert torch.equal(same.backbone.patch_embed.proj.weight, p8.patch_embed.proj.weight)
