"""Paper targets evaluate the way the paper's models were trained: data statistics, crop, proportional attention.

Each check goes through what ``make <target>`` runs: its ``dtem`` command lines are parsed by the CLI
(``--print_config``, nothing instantiated but the data module), so config stacking, overlays and the Makefile's own
arguments are all covered.
"""

from __future__ import annotations

import csv
import importlib
import inspect
from pathlib import Path

import pytest
import torch
import yaml
from test_benchmarks import dtem_commands, make_n, print_config

from dtem_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = sorted((ROOT / "configs" / "paper").glob("*.yaml"))

# What the models were trained and evaluated with (written from the papers, not read from timm).
# DeiT (Touvron et al. 2021) and MAE fine-tuning (He et al. 2022): ImageNet mean/std, bicubic, resize 256 ->
# center crop 224 (crop 0.875). The CIFAR backbones of this repository (configs/cifar10_vit_pretrain.yaml, its
# patch-2 overlay): vit_tiny_patch16_224's statistics (mean = std = 0.5), bicubic, 32 px images without crop.
IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "interpolation": "bicubic",
            "crop_pct": 0.875, "input_size": (3, 224, 224)}  # fmt: skip
CIFAR = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic", "crop_pct": 1.0,
         "input_size": (3, 32, 32)}  # fmt: skip
EXPECTED = {
    "table1-deit-s": IMAGENET,
    "table1-deit-b": IMAGENET,
    "table1-mae-b": IMAGENET,
    "table1-mae-l": IMAGENET,
    "tome-offshelf": IMAGENET,
    "e2e-deit-s": IMAGENET,
    "pretrain-small": CIFAR,
    "demo": CIFAR,
    "replicate-small": CIFAR,
}
MAE_TARGETS = ["table1-mae-b", "table1-mae-l"]


@pytest.fixture(scope="module")
def commands() -> dict[str, list[list[str]]]:
    return {t: dtem_commands(make_n(t, "IMAGENET=/data/imagenet", "DEVICES=8")) for t in EXPECTED}


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A minimal class-folder tree: data modules check their root at construction."""
    from PIL import Image

    root = tmp_path_factory.mktemp("tree")
    for split in ("train", "val"):
        for c in range(2):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (32, 32), (100 * c, 50 * i, 0)).save(root / split / f"c{c}" / f"{i}.png")
    return root


def data_config(args: list[str], root: Path, capsys: pytest.CaptureFixture) -> dict | None:
    """The data module's resolved config for a dtem command line, built as the CLI builds it (backbone linked);
    None for a command that is not on class folders (the demo's CamVid stage: not an ImageNet/CIFAR model)."""
    cfg = yaml.safe_load(print_config(args, capsys))
    if not cfg["data"]["class_path"].endswith("ImageFolderDataModule"):
        return None
    module, _, name = cfg["data"]["class_path"].rpartition(".")
    init = {**cfg["data"]["init_args"], "root": str(root), "backbone": cfg["model"]["init_args"]["backbone"]}
    return getattr(importlib.import_module(module), name)(**init).data_config


def test_every_paper_config_is_checked(commands):
    used = {Path(w).resolve() for cmds in commands.values() for c in cmds for w in c if w.endswith(".yaml")}
    assert set(PAPER_CONFIGS) <= used, sorted(set(PAPER_CONFIGS) - used)


@pytest.mark.parametrize("target", list(EXPECTED))
def test_data_config_is_what_the_model_was_trained_with(target, commands, image_tree, capsys):
    want = EXPECTED[target]
    checked = 0
    for args in commands[target]:
        got = data_config(args, image_tree, capsys)
        if got is not None:
            assert {k: _rounded(got[k]) for k in want} == want, (target, args)
            checked += 1
    assert checked, f"{target}: no classification command checked"


def _rounded(v: object) -> object:
    """Values as the table above writes them: tuples, floats to 4 decimals."""
    if isinstance(v, tuple | list):
        return tuple(_rounded(x) for x in v)
    return round(v, 4) if isinstance(v, float) else v


def _default(cls: type, arg: str) -> object:
    return inspect.signature(cls).parameters[arg].default


def _rows(model: dict) -> list[tuple[str, object]]:
    """(class name, effective prop_attn) of the task's policy and of each comparison policy."""
    out = []
    for p in [model["policy"], *(model.get("test_policies") or [])]:
        module, _, name = p["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        out.append((name, (p.get("init_args") or {}).get("prop_attn", _default(cls, "prop_attn"))))
    return out


@pytest.mark.parametrize("target", MAE_TARGETS)
def test_mae_rows_use_proportional_attention_as_published(target, commands, capsys):
    """ToMe on MAE models runs without proportional attention (ToMe's MAE setting); DTEM rows use it in training
    only (official DTEM); the comparison rows come from the config, not from the Makefile."""
    test_cmds = [c for c in commands[target] if c[0] == "test"]
    assert test_cmds
    for args in commands[target]:
        assert not any(a.startswith("--model.init_args.test_policies") for a in args), args
        rows = _rows(yaml.safe_load(print_config(args, capsys))["model"]["init_args"])
        for name, prop_attn in rows:
            want = False if name == "ToMe" else "train" if name.startswith("DTEM") else prop_attn
            assert prop_attn == want, (target, name, prop_attn)
        if args in test_cmds:
            assert [n for n, _ in rows] == ["DTEMSoft", "NoMerge", "ToMe", "DTEMHard"], rows


def test_every_mae_config_has_a_target():
    maes = {p.resolve() for p in PAPER_CONFIGS if p.stem.startswith("mae_")}
    used = {Path(w).resolve() for t in MAE_TARGETS for c in make_n(t) for w in c if w.endswith(".yaml")}
    assert maes and maes <= used


@pytest.mark.parametrize("name", ["mae_vit_b", "mae_vit_l"])
def test_mae_config_runs_with_debug_overlay(name, image_tree, tmp_path):
    """The MAE overlays test end to end on a tiny model: one row set per policy, ToMe without the size bias."""
    from dtem_lightning.cli import DTEMCLI
    from dtem_lightning.data import BaseDataModule
    from dtem_lightning.tasks import BaseTask

    configs = ["-c", str(ROOT / "configs/deit_s_modular.yaml"), "-c", str(ROOT / f"configs/paper/{name}.yaml"),
               "-c", str(ROOT / "configs/debug.yaml")]  # fmt: skip
    args = ["test", *configs, f"--data.init_args.root={image_tree}",
            f"--trainer.logger.init_args.save_dir={tmp_path}"]  # fmt: skip
    main(args)
    (sweep,) = tmp_path.rglob("sweep.csv")
    with sweep.open() as f:
        rows = [(r["policy"], r["r"]) for r in csv.DictReader(f)]
    own = [("DTEM (untrained)", r) for r in ("2", "4")]  # tested without a checkpoint; r = 0 is NoMerge's row
    control = rows[-1][0]  # the DTEMHard control: told apart from the untrained main policy by its label
    assert control.startswith("DTEM (untrained") and control != own[0][0]
    assert rows == [*own, ("NoMerge", "0"), *[("ToMe", r) for _, r in own], *[(control, r) for _, r in own]]
    cli = DTEMCLI(BaseTask, BaseDataModule, subclass_mode_model=True, subclass_mode_data=True,
                  auto_configure_optimizers=False, args=args[1:], run=False)  # fmt: skip
    tome = next(p for p in cli.model.test_policies if type(p).__name__ == "ToMe")
    cli.model.eval()
    with cli.model.running(tome, 4):
        cli.model.backbone(torch.randn(1, 3, 32, 32))
        assert tome.state.size is not None and tome.attn_bias() is None  # merged, yet no log(size) bias
