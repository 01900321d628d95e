"""The dtem CLI: every config runs fit + test with the debug overlay, checkpoints, sweeps, DDP, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CAMVID, FLICKR, ROOT, read_sweep

from dtem_lightning.cli import main

CONFIGS = ROOT / "configs"
# Caption configs: config stem -> data layout of their data root ("flickr": captions.txt + images/; "karpathy").
CAPTION_LAYOUTS = {"flickr8k_small": "flickr", "git_b_coco_dtem": "karpathy"}
EXPERIMENTS = sorted(p for p in CONFIGS.glob("*.yaml") if p.name not in ("debug.yaml", "trainer.yaml"))
# Segmentation configs: config stem -> data layout ({split folder: label folder}) of their data root.
SEG_LAYOUTS = {
    "camvid_small": {s: f"{s}annot" for s in ("train", "val", "test")},
    "segmenter_s_ade20k_dtem": {f"images/{s}": f"annotations/{s}" for s in ("training", "validation")},
    "seg_folder_example": {"images": "labels"},  # one flat set of 0/255 masks, split by ratio
}


@pytest.fixture(scope="module")
def seg_roots(tmp_path_factory) -> dict[str, str]:
    """Config stem -> data root: the CamVid zip when present, else small generated trees in each layout."""
    from PIL import Image

    roots = {}
    g = torch.Generator().manual_seed(0)
    for stem, layout in SEG_LAYOUTS.items():
        if stem == "camvid_small" and CAMVID.exists():
            roots[stem] = str(CAMVID)
            continue
        root = tmp_path_factory.mktemp(stem)
        for img_dir, label_dir in layout.items():
            (root / img_dir).mkdir(parents=True)
            (root / label_dir).mkdir(parents=True)
            binary = stem == "seg_folder_example"  # the config maps 0/255 masks: label_map {0: 0, 255: 1}
            for i in range(
                10 if binary else 4
            ):  # a flat set split 80/10/10 needs >= 5 images for a val split
                Image.fromarray((torch.rand(40, 48, 3, generator=g) * 255).byte().numpy()).save(
                    root / img_dir / f"{i}.jpg"
                )
                labels = torch.randint(0, 2 if binary else 12, (40, 48), generator=g) * (255 if binary else 1)
                Image.fromarray(labels.byte().numpy()).save(root / label_dir / f"{i}.png")
        roots[stem] = str(root)
    return roots


@pytest.fixture(scope="module")
def caption_roots(tmp_path_factory) -> dict[str, str]:
    """Config stem -> data root: the Flickr8k-1k zip when present, else small generated caption sets."""
    import json

    from PIL import Image

    roots, words = {}, "a dog cat man runs sits on the grass red ball".split()
    g = torch.Generator().manual_seed(0)
    for stem, layout in CAPTION_LAYOUTS.items():
        if layout == "flickr" and FLICKR.exists():
            roots[stem] = str(FLICKR)
            continue
        root = tmp_path_factory.mktemp(stem)
        (root / "images").mkdir()
        rows, images = [], []
        for i in range(20):
            Image.fromarray((torch.rand(40, 48, 3, generator=g) * 255).byte().numpy()).save(
                root / "images" / f"{i}.jpg"
            )
            caps = [
                " ".join(words[j] for j in torch.randint(0, len(words), (6,), generator=g)) for _ in range(2)
            ]
            rows += [f"{i}.jpg,{c} ." for c in caps]
            split = "train" if i < 12 else "val" if i < 16 else "test"
            images.append({"filepath": "images", "filename": f"{i}.jpg", "split": split,
                           "sentences": [{"raw": c} for c in caps]})  # fmt: skip
        (root / "captions.txt").write_text("image,caption\n" + "\n".join(rows) + "\n")
        (root / "dataset_coco.json").write_text(json.dumps({"images": images}))
        roots[stem] = str(root)
    return roots


def run(args: list[str]) -> None:
    main(args)


def debug_args(cfg: Path, image_root: str, out: Path) -> list[str]:
    return [
        "-c", str(cfg), "-c", str(CONFIGS / "debug.yaml"),
        f"--data.init_args.root={image_root}",
        f"--trainer.logger.init_args.save_dir={out}",
    ]  # fmt: skip


def _short(policy: str | dict) -> str:
    """Class name of a policy given in YAML as a (short or full) class path or as {class_path: ...}."""
    return (policy if isinstance(policy, str) else policy["class_path"]).rsplit(".", 1)[-1]


@pytest.mark.parametrize("cfg", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_config_fits_and_tests(cfg, image_root, seg_roots, caption_roots, tmp_path):
    args = debug_args(cfg, {**seg_roots, **caption_roots}.get(cfg.stem, image_root), tmp_path)
    if cfg.stem in CAPTION_LAYOUTS:
        args += ["--model.init_args.use_meteor=false", "--data.init_args.min_freq=1",  # no Java in this test
                 "--model.init_args.decoder_width=32", "--model.init_args.decoder_depth=1",
                 "--model.init_args.decoder_heads=2", "--model.init_args.max_len=6"]  # fmt: skip
    run(["fit", *args])
    ckpts = list(tmp_path.rglob("last.ckpt"))
    assert ckpts, "fit wrote no last.ckpt"
    run(["test", *args, f"--ckpt_path={ckpts[0]}"])
    rows = read_sweep(tmp_path)
    metrics = ["miou", "pixel_acc"] if cfg.stem in SEG_LAYOUTS else ["acc1", "acc5"]
    metrics = ["bleu1", "bleu2"] if cfg.stem in CAPTION_LAYOUTS else metrics
    assert list(rows[0])[:6] == ["policy", "r", "gflops", "tokens", *metrics]
    # The task's policy, then each test policy (in the YAML's order) at every non-zero r of the debug overlay's
    # test_r [0, 2, 4]; r = 0 once, as NoMerge's row (added at the end when the config lists no NoMerge).
    model = yaml.safe_load(cfg.read_text())["model"]["init_args"]
    names = [_short(model["policy"]), *map(_short, model.get("test_policies") or [])]
    names = [{"DTEMSoft": "DTEM", "DTEMHard": "DTEM"}.get(n, n) for n in names]
    names += [] if "NoMerge" in names else ["NoMerge"]
    swept: dict[str, list[int]] = {}
    for row in rows:
        swept.setdefault(row["policy"], []).append(int(row["r"]))  # e.g. "DTEM (trained)"
    assert [(label.split(" (")[0], r) for label, r in swept.items()] == [
        (n, [0] if n == "NoMerge" else [2, 4]) for n in names
    ]
    assert (tmp_path / "debug").exists()


def test_replicate_seg_overlays_run(seg_roots, tmp_path):
    """configs/replicate_seg: the backbone overlay fits; the DTEM overlay starts from that task checkpoint
    (init_from), trains only the policy, and its sweep carries paired intervals against ToMe."""
    base = debug_args(CONFIGS / "camvid_small.yaml", seg_roots["camvid_small"], tmp_path)
    backbone = ["-c", str(CONFIGS / "replicate_seg" / "backbone.yaml")]
    run(["fit", *base[:2], *backbone, *base[2:], "--trainer.max_epochs=1"])
    (task_ckpt,) = tmp_path.rglob("last.ckpt")
    dtem = [*base[:2], *backbone, "-c", str(CONFIGS / "replicate_seg" / "dtem.yaml"), *base[2:],
            f"--model.init_args.init_from={task_ckpt}", "--trainer.logger.init_args.name=dtem"]  # fmt: skip
    run(["fit", *dtem])
    (dtem_ckpt,) = (tmp_path / "dtem").rglob("last.ckpt")
    before, after = (torch.load(p, weights_only=True)["state_dict"] for p in (task_ckpt, dtem_ckpt))
    changed = {k for k, v in after.items() if k not in before or not torch.equal(v, before[k])}
    changed = {k for k in changed if not k.startswith("test_policies.")}
    assert changed and all(k.startswith("policy.") for k in changed), sorted(changed)[:5]
    run(["test", *dtem, f"--ckpt_path={dtem_ckpt}"])
    rows = read_sweep(tmp_path / "dtem")
    assert [r["policy"] for r in rows][:1] == ["DTEM (trained)"] and "d_miou" in rows[0]
    assert any(r["d_miou"] for r in rows if r["policy"] == "DTEM (trained)")


def test_trainer_yaml_stacks(image_root, tmp_path):
    args = [
        "-c",
        str(CONFIGS / "trainer.yaml"),
        *debug_args(CONFIGS / "deit_s_modular.yaml", image_root, tmp_path),
    ]
    run(["fit", *args])
    assert list(tmp_path.rglob("last.ckpt"))


def test_print_config_shows_paper_recipe(capsys):
    with pytest.raises(SystemExit) as e:
        run(["fit", "-c", str(CONFIGS / "deit_s_modular.yaml"), "--print_config"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for needle in ("class_path: dtem_lightning.DTEMSoft", "r: 16", "tau1: 0.1", "tau2: 0.1", "k: 3", "lr: 0.0001",
                   "weight_decay: 0.0001", "min_lr: 1.0e-06", "train: policy", "mixup: 0.8",
                   "cutmix: 1.0", "gradient_clip_val: 5.0", "max_epochs: 30", "batch_size: 128",
                   "backbone: deit_small_patch16_224", "train_transform: deit"):  # fmt: skip
        assert needle in out, needle


@pytest.fixture(scope="module")
def dtem_ckpt(image_root, tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("dtem_run")
    run(["fit", *debug_args(CONFIGS / "deit_s_modular.yaml", image_root, out)])
    return next(out.rglob("last.ckpt")), out


def test_ckpt_test_command_line_wins(dtem_ckpt, image_root, tmp_path):
    ckpt, _ = dtem_ckpt
    data = ["--data=ImageFolderDataModule", f"--data.init_args.root={image_root}", "--data.init_args.img_size=32",
            "--data.init_args.max_per_class=4", "--trainer.limit_test_batches=2",
            f"--trainer.logger.init_args.save_dir={tmp_path}"]  # fmt: skip
    run(["test", f"--ckpt_path={ckpt}", *data, "--model.init_args.test_r=[0,8]"])
    rows = read_sweep(tmp_path)
    # the checkpoint's own, trained policy; r = 0 is the NoMerge row
    assert [(r["policy"], int(r["r"])) for r in rows] == [("DTEM (trained)", 8), ("NoMerge", 0)]
    assert float(rows[0]["gflops"]) != float(rows[1]["gflops"])
    assert int(rows[0]["tokens"]) < int(rows[1]["tokens"])


def test_ckpt_tested_with_another_policy(dtem_ckpt, image_root, tmp_path):
    ckpt, _ = dtem_ckpt
    args = ["test", f"--ckpt_path={ckpt}", "--data=ImageFolderDataModule", f"--data.init_args.root={image_root}",
            "--data.init_args.img_size=32", "--data.init_args.max_per_class=4", "--trainer.limit_test_batches=2",
            f"--trainer.logger.init_args.save_dir={tmp_path}", "--model.init_args.policy=ToMe",
            "--model.init_args.policy.r=4", "--model.init_args.test_r=[0,4,8]",
            "--model.init_args.test_policies+=NoMerge", "--model.init_args.test_policies+=DTEMHard"]  # fmt: skip
    with pytest.warns(UserWarning, match="unused by ToMe"):
        run(args)
    rows = read_sweep(tmp_path)
    assert [r["policy"] for r in rows] == ["ToMe"] * 2 + ["NoMerge"] + ["DTEM (untrained)"] * 2
    gflops = [float(r["gflops"]) for r in rows if r["policy"] in ("ToMe", "NoMerge")]
    assert gflops[2] > gflops[0] > gflops[1]  # NoMerge (r = 0), then strictly decreasing in r


def test_modular_fit_leaves_backbone_bit_identical(image_root, tmp_path):
    from dtem_lightning.cli import DTEMCLI
    from dtem_lightning.data import BaseDataModule
    from dtem_lightning.tasks import BaseTask

    args = debug_args(CONFIGS / "deit_s_modular.yaml", image_root, tmp_path)
    cli = DTEMCLI(BaseTask, BaseDataModule, subclass_mode_model=True, subclass_mode_data=True,
                  auto_configure_optimizers=False, args=args, run=False)  # fmt: skip
    before = {k: v.clone() for k, v in cli.model.backbone.state_dict().items()}
    policy_before = {k: v.clone() for k, v in cli.model.policy.state_dict().items()}
    cli.trainer.fit(cli.model, cli.datamodule)
    after = cli.model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    changed = [k for k, v in cli.model.policy.state_dict().items() if not torch.equal(v, policy_before[k])]
    assert "embed.0.weight" in changed


def _cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("DTEM_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "dtem_lightning", *args], capture_output=True, text=True,
                          env=env, cwd=kw.get("cwd", ROOT), timeout=300)  # fmt: skip


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--model.init_args.policy=NoSuchPolicy"], "NoSuchPolicy"),
        (["--data.init_args.root=/no/such/folder"], "/no/such/folder"),
        (["--model.init_args.policy.r=-2"], "-2"),
        (["--model.init_args.backbone=resnet18"], "ResNet"),
        (["--model.init_args.checkpoint_path=/no/weights.pth"], "/no/weights.pth"),
        (["--model.init_args.test_r=[0,-1]"], "-1"),
    ],
    ids=[
        "unknown_policy",
        "missing_data",
        "negative_r",
        "unsupported_backbone",
        "missing_ckpt",
        "bad_test_r",
    ],
)
def test_bad_config_exits_with_clear_message(extra, needle, image_root, tmp_path):
    args = ["fit", *debug_args(CONFIGS / "deit_s_modular.yaml", image_root, tmp_path), *extra]
    proc = _cli(args)
    assert proc.returncode != 0
    assert needle in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) < 30


def test_num_classes_mismatch_with_checkpoint(dtem_ckpt, tmp_path):
    """A checkpoint trained on 10 classes tested on a 3-class data tree fails with a message naming both."""
    from PIL import Image

    ckpt, _ = dtem_ckpt
    for split in ("train", "val"):
        for c in range(3):
            (tmp_path / split / f"k{c}").mkdir(parents=True)
            Image.new("RGB", (32, 32)).save(tmp_path / split / f"k{c}" / "a.png")
    data = [
        "--data=ImageFolderDataModule",
        f"--data.init_args.root={tmp_path}",
        "--data.init_args.img_size=32",
    ]
    proc = _cli(
        ["test", f"--ckpt_path={ckpt}", *data, f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}"]
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "size mismatch" in proc.stderr or "num_classes" in proc.stderr, proc.stderr[-2000:]


def test_python_m_exit_code_zero(tmp_path):
    proc = _cli(["fit", "-c", str(CONFIGS / "deit_s_modular.yaml"), "--print_config"])
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_ddp_two_processes_match_one(image_root, tmp_path):
    """2-process CPU DDP (gloo) fit + test gives the same sweep as 1 process (test set split evenly)."""
    sweeps = {}
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        args = [*debug_args(CONFIGS / "deit_s_modular.yaml", image_root, out), "--trainer.limit_test_batches=1.0",
                "--data.init_args.batch_size=4", "--model.init_args.mixup=0", "--model.init_args.cutmix=0"]  # fmt: skip
        strategy = ["--trainer.devices=2", "--trainer.strategy=ddp"] if n == 2 else []
        proc = _cli(["fit", *args, *strategy])
        assert proc.returncode == 0, proc.stderr[-3000:]
        ckpt = next(out.rglob("last.ckpt"))
        proc = _cli(["test", *args, *strategy, f"--ckpt_path={ckpt}"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        sweeps[n] = read_sweep(out)
    for a, b in zip(sweeps[1], sweeps[2], strict=True):
        assert a["policy"] == b["policy"] and a["r"] == b["r"] and a["tokens"] == b["tokens"]
        for k in ("acc1", "acc5", "gflops"):
            assert float(a[k]) == pytest.approx(float(b[k]), abs=1e-6), (k, a, b)


def test_fit_resumes_from_checkpoint(image_root, tmp_path):
    args = debug_args(CONFIGS / "deit_s_modular.yaml", image_root, tmp_path)
    run(["fit", *args])
    first = next(tmp_path.rglob("last.ckpt"))
    assert torch.load(first, weights_only=True)["global_step"] == 2
    run(["fit", *args, "--trainer.max_epochs=2", f"--ckpt_path={first}"])
    resumed = sorted(tmp_path.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)[-1]
    assert resumed != first  # a new version folder: the first run is not overwritten
    ckpt = torch.load(resumed, weights_only=True)
    # Written at the end of training (FinalCheckpoint): both epochs done, so the epoch counter reads 2.
    assert ckpt["global_step"] == 4 and ckpt["epoch"] == 2
