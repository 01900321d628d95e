"""The ``dtem`` command: one LightningCLI over every task and data module, with short class paths."""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

# Imported so YAML can name them by short class path (ClassificationTask, DTEMSoft, ImageFolderDataModule...).
from dtem_lightning import policy as _policy  # noqa: F401
from dtem_lightning.callbacks import FinalCheckpoint, FlopsLogger, SweepWriter
from dtem_lightning.data import BaseDataModule
from dtem_lightning.io import AtomicCheckpointIO
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
_LINK_TARGETS = ("img_size", "num_classes", "vocab_size")


class _Parser(LightningArgumentParser):
    """Argument parser whose errors are a short message and a tip, not the whole usage text."""

    def error(self, message: str, ex: Exception | None = None) -> None:
        if not self.exit_on_error or os.environ.get("DTEM_DEBUG"):
            super().error(message, ex)
        lines = [ln for ln in message.splitlines() if ln.strip()]
        short = "\n  ".join(lines[:12]) + ("\n  ..." if len(lines) > 12 else "")
        sys.stderr.write(
            f"dtem: error: {short}\n(run with --help for the options; DTEM_DEBUG=1 for details)\n"
        )
        self.exit(2)


class DTEMCLI(LightningCLI):
    """LightningCLI with argument links, sweep/FLOPs/final-checkpoint callbacks and checkpoint hparams as mere
    defaults.

    Modifications: with ``--ckpt_path FILE`` the task's saved hyper-parameters become defaults before parsing,
    so no model arguments are needed and config files and command-line values win over them (Lightning itself
    lets the checkpoint win and still requires the model arguments). Checkpoints are written beside their
    destination and renamed over it (:class:`~dtem_lightning.io.AtomicCheckpointIO`). ``fit`` refuses a run
    folder that holds an earlier fit's checkpoints unless it resumes from one of them (:func:`check_run_folder`);
    other subcommands save their config as ``config_<subcommand>.yaml``, so a ``test`` in the fit's folder keeps
    the fit's ``config.yaml``.
    """

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        name = "config.yaml" if self.subcommand in (None, "fit") else f"config_{self.subcommand}.yaml"
        self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": name}
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default: no user plugin
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def before_fit(self) -> None:
        check_run_folder(self.trainer, self._get(self.config_init, "ckpt_path"))

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(SweepWriter, "sweep")
        parser.add_lightning_class_args(FlopsLogger, "flops")
        parser.add_lightning_class_args(FinalCheckpoint, "final_checkpoint")
        parser.link_arguments("model.init_args.backbone", "data.init_args.backbone")
        parser.link_arguments("data.init_args.img_size", "model.init_args.img_size")
        # jsonargparse skips an instantiation link whose source attribute the data module lacks (caption data
        # has no num_classes, class folders no vocab_size), so each task gets only its own.
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        raw = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else []
        if raw and raw[0] in getattr(self, "_subcommand_parsers", {}):
            self._ckpt_hparams_as_defaults(raw[0], _ckpt_path_arg(raw[1:]))
        super().parse_arguments(parser, args)

    def _ckpt_hparams_as_defaults(self, subcommand: str, ckpt_path: str | None) -> None:
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        ckpt = torch.load(ckpt_path, weights_only=True, map_location="cpu")
        hparams = dict(ckpt.get("hyper_parameters", {}))
        class_path = hparams.pop("_class_path", None)
        hparams.pop("_instantiator", None)
        if class_path is None:
            return
        for key in _LINK_TARGETS:
            hparams.pop(key, None)
        # The restored checkpoint's weights replace init_from's, which need not exist any more.
        hparams.pop("init_from", None)
        self._subcommand_parsers[subcommand].set_defaults(
            {"model": {"class_path": class_path, "init_args": hparams}}
        )

    def after_instantiate_classes(self) -> None:
        """Refuse a ``num_classes`` given for the model that contradicts the data (the link would hide it)."""
        super().after_instantiate_classes()
        cfg = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        init = cfg.get("model", {}).get("init_args", {}) or {}
        given, data_value = init.get("num_classes"), getattr(self.datamodule, "num_classes", None)
        default = inspect.signature(type(self.model).__init__).parameters.get("num_classes")
        if given is None or data_value is None or default is None or given == default.default:
            return
        if given != data_value:
            raise ValueError(
                f"num_classes={given} contradicts the data, which has {data_value} classes; drop the setting "
                "(it is taken from the data module)"
            )

    def _parse_ckpt_path(self) -> None:
        """Lightning re-applies checkpoint hparams over the parsed config here; ours are defaults already."""


def checkpoint_dirs(trainer: L.Trainer) -> list[Path]:
    """The folders the trainer's ``ModelCheckpoint`` callbacks write to, resolved as Lightning resolves them: the
    callback's ``dirpath``, else ``<save_dir>/<name>/<version>/checkpoints`` of the first logger, else
    ``<default_root_dir>/checkpoints``."""
    dirs = []
    for cb in trainer.checkpoint_callbacks:
        if not isinstance(cb, ModelCheckpoint):
            continue
        if cb.dirpath is not None:
            folder = Path(cb.dirpath)
        elif trainer.loggers:
            logger = trainer.loggers[0]
            version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
            save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
            folder = Path(save_dir, str(logger.name), version, "checkpoints")
        else:
            folder = Path(trainer.default_root_dir, "checkpoints")
        if folder not in dirs:
            dirs.append(folder)
    return dirs


def check_run_folder(trainer: L.Trainer, ckpt_path: str | None) -> None:
    """Refuse a fit whose checkpoints would mix with an earlier fit's.

    A fixed logger version (``--trainer.logger.init_args.version=run``) reuses the run folder: a second fit would
    write ``last-v1.ckpt`` beside the first run's ``last.ckpt``, and a later ``dtem test --ckpt_path …/last.ckpt``
    would test the first run. A fit into a folder that holds checkpoints must resume from one of them;
    ``--ckpt_path=last`` must find one (Lightning would train from scratch with a warning).

    Raises:
        ValueError: the folder holds checkpoints and ``ckpt_path`` is not one of them, or ``ckpt_path`` is
            ``last`` and there is no ``last*.ckpt`` to resume.
    """
    dirs = checkpoint_dirs(trainer)
    found = sorted(p for d in dirs if d.is_dir() for p in d.glob("*.ckpt") if not p.name.startswith("."))
    if ckpt_path == "last":
        if not any(p.stem.startswith("last") for p in found):
            where = " or ".join(str(d) for d in dirs) or "the run (it has no ModelCheckpoint callback)"
            raise ValueError(
                f"--ckpt_path=last but {where} holds no last.ckpt to resume: drop --ckpt_path to train from scratch"
            )
        return
    resuming = ckpt_path is not None and Path(ckpt_path).resolve().parent in {d.resolve() for d in dirs}
    if not found or resuming:
        return
    folder = found[0].parent
    last = folder / "last.ckpt"
    resume = last if last.is_file() else max(found, key=lambda p: p.stat().st_mtime)
    run = folder.parent if folder.name == "checkpoints" else folder
    names = ", ".join(p.name for p in found[:3]) + (", ..." if len(found) > 3 else "")
    raise ValueError(
        f"{folder} already holds checkpoints of an earlier fit ({names}): resume it with --ckpt_path={resume}, or "
        f"start clean: remove {run} (or choose another --trainer.logger.init_args.version)"
    )


def _ckpt_path_arg(args: list[str]) -> str | None:
    """The value of ``--ckpt_path`` in a command line, if any."""
    for i, a in enumerate(args):
        if a.startswith("--ckpt_path="):
            return a.split("=", 1)[1]
        if a == "--ckpt_path" and i + 1 < len(args):
            return args[i + 1]
    return None


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
            parser_class=_Parser,
            args=args,
        )
    except (ValueError, TypeError, OSError, RuntimeError, FloatingPointError, KeyError) as e:
        if os.environ.get("DTEM_DEBUG"):
            raise
        root = _root_cause(e)
        print(
            f"dtem: error: {type(root).__name__}: {root} (set DTEM_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        sys.exit(2)


def _root_cause(e: BaseException) -> BaseException:
    """The innermost exception: jsonargparse wraps a component's own error in "Does not validate ..." text."""
    while "Does not validate against" in str(e) and isinstance(
        inner := e.__cause__ or e.__context__, Exception
    ):
        e = inner
    return e
