"""The ``dtem`` command: one LightningCLI over every task and data module, with short class paths."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

# Imported so YAML can name them by short class path (ClassificationTask, DTEMSoft, ImageFolderDataModule...).
from dtem_lightning import policy as _policy  # noqa: F401
from dtem_lightning.callbacks import FlopsLogger, SweepWriter
from dtem_lightning.data import BaseDataModule
from dtem_lightning.tasks import BaseTask
from dtem_lightning.tasks import base as _base  # noqa: F401

# Neutral trainer defaults (versioned run folders under runs/); checkpoint callbacks live in the configs.
TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "dtem"},
    },
}

# Hyper-parameters that are link targets: they always come from the data module, never from a checkpoint.
_LINK_TARGETS = ("img_size", "num_classes")


class DTEMCLI(LightningCLI):
    """LightningCLI with argument links, sweep/FLOPs callbacks and checkpoint hparams as mere defaults.

    Modifications: with ``--ckpt_path FILE`` the task's saved hyper-parameters become defaults, so config
    files and command-line values win over them (Lightning itself lets the checkpoint win).
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(SweepWriter, "sweep")
        parser.add_lightning_class_args(FlopsLogger, "flops")
        parser.link_arguments("model.init_args.backbone", "data.init_args.backbone")
        parser.link_arguments("data.init_args.img_size", "model.init_args.img_size")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        self._raw_args = args
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        sub = self.config.get("subcommand")
        if not sub:
            return
        ckpt_path = self.config[sub].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        hparams = dict(
            torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters", {})
        )
        class_path = hparams.pop("_class_path", None)
        hparams.pop("_instantiator", None)
        if class_path is None:
            return
        for key in _LINK_TARGETS:
            hparams.pop(key, None)
        self._subcommand_parsers[sub].set_defaults(
            {"model": {"class_path": class_path, "init_args": hparams}}
        )
        self.parse_arguments(self.parser, self._raw_args)


def main(args: list[str] | None = None) -> None:
    """Entry point of ``dtem`` and ``python -m dtem_lightning``; errors print one line unless DTEM_DEBUG=1."""
    try:
        DTEMCLI(
            BaseTask,
            BaseDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            trainer_defaults=TRAINER_DEFAULTS,
            args=args,
        )
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, FloatingPointError, KeyError) as e:
        if os.environ.get("DTEM_DEBUG"):
            raise
        print(f"dtem: error: {type(e).__name__}: {e} (set DTEM_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(2)
