"""The ``dtem`` command: one LightningCLI over every task and data module, with short class paths."""

from __future__ import annotations

import difflib
import inspect
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

# Imported so YAML can name them by short class path (ClassificationTask, DTEMSoft, ImageFolderDataModule...).
from dtem_lightning import policy as _policy  # noqa: F401
from dtem_lightning.callbacks import FinalCheckpoint, FlopsLogger, SweepWriter, run_dir
from dtem_lightning.data import BaseDataModule
from dtem_lightning.io import (
    AtomicCheckpointIO,
    PickledCodeError,
    is_url,
    load_weights_only,
    untrusted_class_paths,
)
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
# ``--ckpt_path`` values Lightning resolves itself (to a local file of this run, loaded through our checkpoint IO).
_SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")
# Exit status of a run stopped by SIGTERM (128 + 15, what a shell reports for a process killed by it).
EXIT_SIGTERM = 143
# Result files of a subcommand: a run folder that holds them from an earlier run is not written into again.
RESULT_FILES: dict[str, tuple[str, ...]] = {
    "test": ("sweep.csv", "sweep.md"),
    "predict": ("predictions.csv", "predictions_rank0.csv", "predictions"),
}


class _Parser(LightningArgumentParser):
    """Argument parser whose errors are a short message and a tip, not the whole usage text."""

    def error(self, message: str, ex: Exception | None = None) -> None:
        if not self.exit_on_error or os.environ.get("DTEM_DEBUG"):
            super().error(message, ex)
        lines = [ln for ln in message.splitlines() if ln.strip()]
        short = _unknown_class_message(message) or (
            "\n  ".join(lines[:12]) + ("\n  ..." if len(lines) > 12 else "")
        )
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
    the fit's ``config.yaml``; a ``test`` or ``predict`` refuses a folder that holds an earlier one's results
    (:func:`check_results_folder`). A checkpoint never runs code: ``--ckpt_path`` is a local file loaded with
    ``weights_only=True``, and its hyper-parameters become defaults only after the security-relevant ones are
    dropped or checked (:meth:`_ckpt_hparams_as_defaults`; ``docs/reliability.md``). SIGTERM during a fit writes
    a resumable ``last.ckpt`` and :func:`main` exits 143.
    """

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        name = "config.yaml" if self.subcommand in (None, "fit") else f"config_{self.subcommand}.yaml"
        self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": name}
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default: no user plugin
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def before_fit(self) -> None:
        check_run_folder(
            self.trainer, self.config_init.get(str(self.subcommand), self.config_init).get("ckpt_path")
        )

    def before_test(self) -> None:
        check_results_folder(self.trainer, "test")

    def before_predict(self) -> None:
        check_results_folder(self.trainer, "predict")

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(SweepWriter, "sweep")
        parser.add_lightning_class_args(FlopsLogger, "flops")
        parser.add_lightning_class_args(FinalCheckpoint, "final_checkpoint")
        parser.link_arguments("model.init_args.backbone", "data.init_args.backbone")
        parser.link_arguments("data.init_args.img_size", "model.init_args.img_size")
        # jsonargparse skips an instantiation link whose source attribute the data module lacks (caption data
        # has no num_classes, class folders no vocab_size), so each task gets only its own.
        parser.link_arguments(
            "data.num_classes", "model.init_args.num_classes", _checked_num_classes, apply_on="instantiate"
        )
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        raw = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else []
        if raw and raw[0] in getattr(self, "_subcommand_parsers", {}):
            self._ckpt_hparams_as_defaults(raw[0], _ckpt_path_arg(raw[1:]))
        super().parse_arguments(parser, args)

    def _ckpt_hparams_as_defaults(self, subcommand: str, ckpt_path: str | None) -> None:
        """Make the task hyper-parameters of the checkpoint ``ckpt_path`` defaults of ``subcommand``'s parser.

        The checkpoint is loaded with ``weights_only=True``; nothing it says may run code or load a file with
        pickled code: ``trust_checkpoint`` is dropped (the user sets it), ``init_from`` is dropped (the restored
        weights replace its), ``checkpoint_path`` is kept only when it is a plain weights file, and a class or
        import path outside this package, torch, timm and Lightning is refused before anything imports it.

        Raises:
            ValueError: ``ckpt_path`` is a URL, a folder, not a PyTorch file, needs pickled code, or names an
                untrusted class path.
            FileNotFoundError: ``ckpt_path`` does not exist.
        """
        self._ckpt_info: dict[str, Any] | None = None
        if not ckpt_path or ckpt_path in _SPECIAL_CKPT_PATHS or ckpt_path.startswith("registry:"):
            return
        try:
            ckpt = load_weights_only(ckpt_path, "--ckpt_path")
        except PickledCodeError as e:
            raise PickledCodeError(
                f"{e}; dtem reads checkpoints with weights_only=True only (docs/reliability.md)"
            ) from e
        hparams = dict(ckpt.get("hyper_parameters") or {}) if isinstance(ckpt, dict) else {}
        class_path = hparams.pop("_class_path", None)
        hparams.pop("_instantiator", None)
        if class_path is None:
            return
        bad = untrusted_class_paths({"_class_path": class_path, **hparams})
        if bad:
            where, path = bad[0]
            raise ValueError(
                f"refusing --ckpt_path {ckpt_path}: its hyper-parameters name {path!r} ({where}), outside "
                "dtem_lightning, torch, timm and lightning, and importing it could run any code"
            )
        data = ckpt.get("datamodule_hyper_parameters") or {}
        self._ckpt_info = {
            "path": ckpt_path,
            "num_classes": hparams.get("num_classes"),
            "data": str(data.get("_class_path", "")).rsplit(".", 1)[-1] or None,
        }
        for key in _LINK_TARGETS:
            hparams.pop(key, None)
        # The restored checkpoint's weights replace init_from's, which need not exist any more.
        hparams.pop("init_from", None)
        # Consent to pickled code is the user's to give, never a shared checkpoint's.
        if hparams.pop("trust_checkpoint", False):
            _note(
                f"--ckpt_path {ckpt_path} was trained with trust_checkpoint: true; that is not carried over"
            )
        weights = hparams.get("checkpoint_path")
        if weights is not None and not _plain_weights_file(weights):
            hparams.pop("checkpoint_path")
            _note(
                f"checkpoint_path {weights} of --ckpt_path {ckpt_path} is not loaded (missing, or not a plain "
                "weights file); the backbone weights come from the checkpoint"
            )
        self._subcommand_parsers[subcommand].set_defaults(
            {"model": {"class_path": class_path, "init_args": hparams}}
        )

    def after_instantiate_classes(self) -> None:
        """Refuse a ``num_classes`` given for the model that contradicts the data (the link would hide it), and a
        ``--ckpt_path`` trained with another class count than the model now has (before its weights are loaded)."""
        super().after_instantiate_classes()
        self._check_ckpt_num_classes()
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

    def _check_ckpt_num_classes(self) -> None:
        """The checkpoint's class count against the model's: a one-line reason instead of a size-mismatch dump
        that names a class count (a task default such as 150) the user never set."""
        info = getattr(self, "_ckpt_info", None)
        trained = (info or {}).get("num_classes")
        have = getattr(getattr(self.model, "hparams", {}), "get", lambda _k: None)("num_classes")
        if trained is None or have is None or trained == have:
            return
        data = type(self.datamodule).__name__
        data_classes = getattr(self.datamodule, "num_classes", None)
        why = (
            f"the data ({data}) has {data_classes} classes"
            if data_classes is not None
            else f"{data} gives no num_classes, so {type(self.model).__name__} uses its default {have}"
        )
        on = f" on {info['data']}" if info.get("data") else ""
        raise ValueError(
            f"--ckpt_path {info['path']} was trained with num_classes={trained}{on}, but {why}: use it with data of "
            f"{trained} classes"
        )

    def _parse_ckpt_path(self) -> None:
        """Lightning re-applies checkpoint hparams over the parsed config here; ours are defaults already.

        A private Lightning method (as is ``_subcommand_parsers``), pinned by tests/test_pins.py."""


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


def check_results_folder(trainer: L.Trainer, subcommand: str) -> None:
    """Refuse a ``test`` or ``predict`` whose run folder already holds that subcommand's results.

    A fixed logger version (``--trainer.logger.init_args.version=test``) reuses the folder: a second ``test``
    would overwrite the first one's ``sweep.csv`` and ``config_test.yaml``, and anything that read them would
    silently get other numbers. A fit's folder (``config.yaml``, checkpoints) is fine for a first test or predict.

    Raises:
        ValueError: the folder (or the sweep writer's ``out_dir``) holds results of an earlier ``subcommand``.
    """
    names = RESULT_FILES.get(subcommand, ())
    folders = [run_dir(trainer)]
    if subcommand == "test":
        folders += [Path(cb.out_dir) for cb in trainer.callbacks if getattr(cb, "out_dir", None)]
    for folder in folders:
        found = [n for n in names if (folder / n).exists()]
        if found:
            raise ValueError(
                f"{folder} already holds the results of an earlier {subcommand} ({', '.join(found)}): remove it, or "
                "choose another --trainer.logger.init_args.version (unset: a new version_N folder)"
            )


def _note(message: str) -> None:
    """One ``dtem: note:`` line on stderr."""
    print(f"dtem: note: {message}", file=sys.stderr)


def _plain_weights_file(path: str) -> bool:
    """Whether ``path`` is a local weights file that loads without pickled code (safetensors, or a PyTorch file
    that loads with ``weights_only=True``)."""
    if is_url(path) or not Path(path).is_file():
        return False
    if str(path).endswith(".safetensors"):
        return True  # a safetensors file holds tensors and a JSON header only
    try:
        load_weights_only(path, "checkpoint_path", mmap=True)
    except (ValueError, OSError):
        return False
    return True


def _checked_num_classes(num_classes: int) -> int:
    """The data module's class count for the model, refused when it is below 2 (nothing to tell apart)."""
    if num_classes is not None and num_classes < 2:
        raise ValueError(
            f"the data has num_classes={num_classes}: a task needs at least 2 classes to learn or score anything "
            "(check the data root: one class folder?)"
        )
    return num_classes


def _known_classes(key: str) -> list[str]:
    """Short class names ``key`` (``policy``, ``test_policies``, ``model``, ``data``) accepts."""
    from dtem_lightning.policy import MergePolicy

    base = {
        "policy": MergePolicy,
        "test_policies": MergePolicy,
        "model": BaseTask,
        "data": BaseDataModule,
    }.get(key)
    if base is None:
        return []
    found, todo = [], list(base.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if cls.__module__.startswith("dtem_lightning.") and not inspect.isabstract(cls):
            found.append(cls.__name__)
    # What the packages export: helpers (a private base, the Table 7 recorder) are not choices.
    import dtem_lightning
    from dtem_lightning import data, tasks

    exported = {name for package in (dtem_lightning, tasks, data) for name in getattr(package, "__all__", [])}
    return sorted(set(found) & exported)


def _unknown_class_message(message: str) -> str | None:
    """One line for jsonargparse's union dump about a class name it cannot resolve (a misspelled policy, task or
    data module): the bad name, the argument, a close match and the valid names; None for other errors."""
    match = re.search(
        r"Expected a dot import path string: (\S+)|Expected a path but (\S+) either not accessible", message
    )
    if match is None:
        return None
    name = match.group(1) or match.group(2)
    keys = re.findall(r'Parser key "([\w.]+)"', message[: match.start()])
    key = keys[-1].rsplit(".", 1)[-1] if keys else "class"
    known = _known_classes(key)
    if not known:
        return f"unknown class {name!r} for {key}"
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown {key} {name!r}{hint}: expected one of {', '.join(known)} (or a full import path)"


def _worker_error(e: BaseException) -> str | None:
    """ "Type: message" of the original exception of a data-loader worker, from the text torch re-raises in the
    main process ("Caught ValueError in DataLoader worker process 0. Original Traceback ..."); None otherwise."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    first, _, rest = text.partition("\n")
    if not (first.startswith("Caught ") and "DataLoader worker" in first):
        return None
    lines = rest.rstrip().splitlines()
    # The exception line follows the last indented line of the traceback (frames and code are indented).
    last_frame = max((i for i, line in enumerate(lines) if line.startswith(" ")), default=-1)
    tail = " ".join(line.strip() for line in lines[last_frame + 1 :] if line.strip())
    name, sep, message = tail.partition(": ")
    if not sep or not re.fullmatch(r"[\w.]+", name):
        return f"{first.split()[1]}: {tail}"
    return f"{name.rsplit('.', 1)[-1]}: {message}"


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
    except SIGTERMException as e:
        step, ckpt = getattr(e, "dtem_step", None), getattr(e, "dtem_checkpoint", None)
        where = f" at step {step}" if step is not None else ""
        saved = f": resume with --ckpt_path={ckpt}" if ckpt else " (no checkpoint written)"
        print(f"dtem: stopped by SIGTERM{where}{saved}", file=sys.stderr)
        sys.exit(EXIT_SIGTERM)
    except Exception as e:
        if os.environ.get("DTEM_DEBUG"):
            raise
        message = _one_line(e)
        if message is None:
            raise  # a bug, not bad input: the traceback is what helps
        print(f"dtem: error: {message} (set DTEM_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(2)


# Errors that come from input (arguments, files, data, machine), printed as one line; others keep the traceback.
_ONE_LINE_ERRORS = (
    ValueError,
    TypeError,
    OSError,
    RuntimeError,
    FloatingPointError,
    KeyError,
    MisconfigurationException,
    pickle.UnpicklingError,
)


def _one_line(e: Exception) -> str | None:
    """The "Type: message" line for an error of the input; None for one that should show its traceback. Every
    error raised in a data-loader worker is the data's (a corrupt image, a bad label value)."""
    worker = _worker_error(e)
    if worker is not None:
        return f"{worker} (in a data-loader worker)"
    if not isinstance(e, _ONE_LINE_ERRORS):
        return None
    root = _root_cause(e)
    return f"{type(root).__name__}: {root}"


def _root_cause(e: BaseException) -> BaseException:
    """The innermost exception: jsonargparse wraps a component's own error in "Does not validate ..." text."""
    while any(w in str(e) for w in _WRAPPERS) and isinstance(
        inner := e.__cause__ or e.__context__, Exception
    ):
        e = inner
    return e


# jsonargparse's wrappers of a component's own error (a failed link compute_fn: the one-class check).
_WRAPPERS = ("Does not validate against", "Call to compute_fn of link")
