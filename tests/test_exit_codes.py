"""Exit codes a scheduler can trust and one line instead of a traceback (issue 17, section 6); a test or predict
never overwrites an earlier one's results in a reused run folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image_tree
from PIL import Image
from test_cli import CONFIGS, ROOT

from dtem_lightning.cli import main

HELPERS = Path(__file__).parent / "helpers"
DEBUG = ["-c", str(CONFIGS / "deit_s_modular.yaml"), "-c", str(CONFIGS / "debug.yaml")]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 8 PNGs per split."""
    return make_image_tree(tmp_path_factory.mktemp("imgs"))


@pytest.fixture(scope="module")
def fitted(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """last.ckpt of a tiny modular fit on ``tree`` (3 classes)."""
    out = tmp_path_factory.mktemp("fit")
    main(["fit", *DEBUG, f"--data.init_args.root={tree}", f"--trainer.logger.init_args.save_dir={out}"])
    return next(out.rglob("last.ckpt"))


def dtem(*args: str) -> subprocess.CompletedProcess:
    """``python -m dtem_lightning ARGS`` in a subprocess, test helpers importable."""
    pythonpath = os.pathsep.join(filter(None, [str(HELPERS), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": pythonpath}
    env.pop("DTEM_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "dtem_lightning", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)  # fmt: skip


def one_error(capsys: pytest.CaptureFixture, args: list[str]) -> str:
    """Run ``main(args)``: it must exit 2 with exactly one ``dtem: error:`` line and no traceback; that line."""
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("dtem: error:")]
    assert e.value.code == 2 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return errors[0]


# ------------------------------------------------------------------ SIGTERM
def test_sigterm_mid_epoch_exits_143_with_a_resumable_checkpoint(tree, tmp_path):
    """SIGTERM after step 2 of 6 (mid epoch 0): exit 143 and a last.ckpt at step 2; resuming it gives the same
    weights as a run that was never stopped."""
    # max_per_split 12: 4 images per class, 3 steps per epoch
    fit = ["fit", *DEBUG, f"--data.init_args.root={tree}", "--trainer.max_epochs=2", "--data.init_args.batch_size=4",
           "--trainer.limit_train_batches=null", "--trainer.logger.init_args.version=run",
           "--data.init_args.max_per_split=12"]  # fmt: skip
    stopped = dtem(*fit, f"--trainer.logger.init_args.save_dir={tmp_path / 'a'}",
                   "--trainer.callbacks+=terminator.TermAtStep", "--trainer.callbacks.step=2")  # fmt: skip
    last = tmp_path / "a" / "debug" / "run" / "checkpoints" / "last.ckpt"
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert f"dtem: stopped by SIGTERM at step 2: resume with --ckpt_path={last}" in stopped.stderr
    assert torch.load(last, weights_only=True)["global_step"] == 2
    main([*fit, f"--trainer.logger.init_args.save_dir={tmp_path / 'a'}", f"--ckpt_path={last}"])
    main([*fit, f"--trainer.logger.init_args.save_dir={tmp_path / 'b'}"])
    resumed = torch.load(last, weights_only=True)
    whole = torch.load(tmp_path / "b" / "debug" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == whole["global_step"] == 6
    for k, v in whole["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), k


# ------------------------------------------------------------------ one line instead of a traceback
def _seg_tree(root: Path, bad_value: int) -> Path:
    """CamVid layout, 40x48 images; one test label map holds ``bad_value`` (neither a class nor ignored)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for i in range(2):
            Image.fromarray((rng.random((40, 48, 3)) * 255).astype("uint8")).save(root / split / f"{i}.png")
            label = rng.integers(0, 11, (40, 48)).astype("uint8")
            label[0, 0] = bad_value if split == "test" and i == 1 else 0
            Image.fromarray(label).save(root / f"{split}annot" / f"{i}.png")
    return root


def test_errors_in_loader_workers_are_one_line(tree, tmp_path, capsys):
    """The original exception of a worker (a corrupt image; a label value that is no class), not torch's
    "Caught ValueError in DataLoader worker process 0" with the worker's traceback."""
    bad = shutil.copytree(tree, tmp_path / "bad")
    png = bad / "test" / "c1" / "0.png"
    png.write_bytes(png.read_bytes()[:60])  # header intact (passes the setup check), pixels cut off
    error = one_error(capsys, ["test", *DEBUG, f"--data.init_args.root={bad}", "--data.init_args.num_workers=1",
                               f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}"])  # fmt: skip
    assert f"ValueError: cannot read image {bad / 'test' / 'c1' / '0.png'}" in error, error
    assert "(in a data-loader worker)" in error and "Caught" not in error, error
    seg = _seg_tree(tmp_path / "seg", bad_value=200)
    error = one_error(capsys, ["test", "-c", str(CONFIGS / "camvid_small.yaml"), "-c", str(CONFIGS / "debug.yaml"),
                               f"--data.init_args.root={seg}", "--data.init_args.num_workers=1",
                               "--data.init_args.batch_size=1", "--trainer.limit_test_batches=null",
                               f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}"])  # fmt: skip
    assert "label values [200] are neither a class nor the ignore value" in error, error
    assert "Caught" not in error, error


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--trainer.accelerator=gpu"], "MisconfigurationException: No supported gpu backend found!"),
        (["--trainer.max_steps=-5"], "`max_steps` must be a non-negative integer or -1"),
    ],
    ids=["gpu_on_cpu", "negative_max_steps"],
)
def test_lightning_misconfiguration_is_one_line(extra, needle, tree, tmp_path, capsys):
    if extra == ["--trainer.accelerator=gpu"] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    args = ["fit", *DEBUG, f"--data.init_args.root={tree}", f"--trainer.logger.init_args.save_dir={tmp_path}"]
    assert needle in one_error(capsys, [*args, *extra])


def test_ckpt_path_folder_is_one_line_naming_a_checkpoint(fitted, tree, tmp_path, capsys):
    run = fitted.parent.parent
    error = one_error(capsys, ["test", *DEBUG, f"--data.init_args.root={tree}", f"--ckpt_path={run}",
                               f"--trainer.logger.init_args.save_dir={tmp_path}"])  # fmt: skip
    assert f"--ckpt_path {run} is a folder, not a file: pass a checkpoint file such as {fitted}" in error, (
        error
    )


# ------------------------------------------------------------------ unclear messages made clear
def test_one_class_data_is_refused_in_words(tmp_path, capsys):
    root = make_image_tree(tmp_path / "one", classes=1, per_class=2)
    error = one_error(capsys, ["fit", *DEBUG, f"--data.init_args.root={root}",
                               f"--trainer.logger.init_args.save_dir={tmp_path}"])  # fmt: skip
    assert "ValueError: the data has num_classes=1: a task needs at least 2 classes" in error, error
    assert "compute_fn" not in error


def test_legacy_weights_load_and_a_text_file_is_named(fitted, tmp_path):
    """A valid legacy-format ``.pth`` (``_use_new_zipfile_serialization=False``) loads (``mmap`` refused it); a
    text file is "not a PyTorch file", not an mmap message."""
    from dtem_lightning.tasks import ClassificationTask

    state = torch.load(fitted, weights_only=True)["state_dict"]
    backbone = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    torch.save(backbone, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    kwargs = dict(backbone="deit_small_patch16_224", img_size=32, num_classes=3,
                  backbone_kwargs=dict(patch_size=4, embed_dim=48, depth=2, num_heads=2))  # fmt: skip
    task = ClassificationTask(checkpoint_path=str(tmp_path / "legacy.pth"), **kwargs)
    assert torch.equal(task.backbone.head.weight, backbone["head.weight"])
    (tmp_path / "text.pth").write_text("weights: none\n")
    with pytest.raises(ValueError, match="text.pth is not a PyTorch file"):
        ClassificationTask(checkpoint_path=str(tmp_path / "text.pth"), **kwargs)


def test_checkpoint_of_other_class_count_names_both_counts(fitted, tmp_path, capsys):
    """A checkpoint trained on 3 classes with data of 2 (a CamVid model with other data: the error named a
    task default such as ``num_classes=150`` the user never set, in a size-mismatch dump)."""
    root = make_image_tree(tmp_path / "two", classes=2, per_class=2)
    error = one_error(capsys, ["test", f"--ckpt_path={fitted}", "--data=ImageFolderDataModule",
                               f"--data.init_args.root={root}", "--data.init_args.img_size=32",
                               f"--trainer.logger.init_args.save_dir={tmp_path}"])  # fmt: skip
    assert (
        f"--ckpt_path {fitted} was trained with num_classes=3 on ImageFolderDataModule, but the data "
        in error
    )
    assert "(ImageFolderDataModule) has 2 classes" in error and "size mismatch" not in error, error


@pytest.mark.parametrize(
    "option", ["--model.init_args.policy=DTEMSfot", "--model.init_args.test_policies+=ToMee"]
)
def test_misspelled_policy_is_one_line_with_the_valid_names(option, tree, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", *DEBUG, f"--data.init_args.root={tree}", option])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 2, err
    bad = option.split("=")[1]
    assert err[0].startswith(
        f"dtem: error: unknown {'test_policies' if '+=' in option else 'policy'} {bad!r}"
    )
    assert "expected one of ATM, DTEMHard, DTEMSoft, NoMerge, PiToMe, ToFu, ToMe, ToMeSoft (" in err[0], err


# ------------------------------------------------------------------ fail before training
def test_bad_images_are_found_at_setup(tree, tmp_path):
    """data/checks.py: every image of a split is opened (header only) in setup; a corrupt image or a caption's
    missing image is named before any training or sweep."""
    from dtem_lightning.data.checks import check_images
    from dtem_lightning.data.store import Store

    bad = shutil.copytree(tree, tmp_path / "bad")
    (bad / "test" / "c2" / "5.png").write_bytes(b"\x89PNG but not really")
    names = [n for c in ("c0", "c1", "c2") for n in Store(bad).files("test", c, recursive=True)]
    missing = str(bad / "test" / "c0" / "gone.png")  # a caption naming an image that is not there
    with pytest.raises(ValueError) as e:
        check_images(Store(bad), [*names, missing], "test")
    message = str(e.value)
    assert message.startswith("2 of 25 images of the test split cannot be read:"), message
    assert f"{bad / 'test' / 'c2' / '5.png'} (UnidentifiedImageError)" in message
    assert f"{missing} (no such file)" in message
    assert check_images(Store(bad), names, "test", strict=False) == [str(bad / "test" / "c2" / "5.png")]
    assert check_images(Store(tree), names[:3], "test") == []


def test_corrupt_eval_image_fails_the_fit_before_training(tree, tmp_path):
    """Through the CLI: a corrupt image of the split used for validation stops `dtem fit` at setup (one line,
    exit 2, no step trained), not after the first epoch."""
    bad = shutil.copytree(tree, tmp_path / "bad")  # no val/: validation uses test/
    (bad / "test" / "c1" / "2.png").write_bytes(b"not an image")  # debug.yaml keeps all 24 test images
    out = tmp_path / "out"
    proc = dtem("fit", *DEBUG, f"--data.init_args.root={bad}", f"--trainer.logger.init_args.save_dir={out}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("dtem: error")]
    assert len(err) == 1 and "1 of 24 images of the test split cannot be read" in err[0], proc.stderr[-2000:]
    assert f"{bad / 'test' / 'c1' / '2.png'} (UnidentifiedImageError)" in err[0]
    assert not list(out.rglob("*.ckpt"))  # nothing trained


def test_caption_naming_a_missing_image_fails_at_setup(tmp_path):
    """A test split whose captions name a missing image fails in setup, before the sweep."""
    from test_own_data import caption_root

    from dtem_lightning.data.captions import CocoCaptionDataModule

    root = caption_root(tmp_path / "coco")
    dm = CocoCaptionDataModule(str(root), ann_file="captions.json", val_ann_file=None, image_dir="images",
                               split=(0.6, 0.2), min_freq=1, img_size=32)  # fmt: skip
    gone = root / "images" / "018.jpg"  # in the test split, not its first image
    gone.unlink()
    with pytest.raises(
        ValueError, match=r"1 of 4 images of the test split cannot be read: .*018.jpg \(no such file\)"
    ):
        dm.setup("test")
    dm.setup("fit")  # the train and val images are all there


# ------------------------------------------------------------------ run folders
def test_second_test_into_a_used_run_folder_is_refused(fitted, tree, tmp_path, capsys):
    """A reused fixed version (the Makefile's pattern) never overwrites an earlier test's sweep."""
    args = ["test", f"--ckpt_path={fitted}", "--data=ImageFolderDataModule", f"--data.init_args.root={tree}",
            "--data.init_args.img_size=32", "--trainer.limit_test_batches=1",
            f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.logger.init_args.version=test"]  # fmt: skip
    main(args)
    (sweep,) = tmp_path.rglob("sweep.csv")
    before = {p.name: p.read_bytes() for p in sweep.parent.iterdir() if p.is_file()}
    capsys.readouterr()
    error = one_error(capsys, args)
    assert f"{sweep.parent} already holds the results of an earlier test (sweep.csv, sweep.md)" in error, (
        error
    )
    assert {n: b for n, b in before.items() if not n.startswith("events.")} == {
        p.name: p.read_bytes()
        for p in sweep.parent.iterdir()
        if p.is_file() and not p.name.startswith("events.")
    }
