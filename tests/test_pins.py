"""Private Lightning APIs that dtem relies on, pinned (issue 18).

Lightning has no public way to do these things (listed in docs/reliability.md "Pinned private APIs"). Each test
names the dtem code that uses the API, so an upgrade that changes one fails here with the reason instead of
somewhere inside a CLI run. When a test fails after an upgrade: re-check the named code against the new Lightning,
then update the pin in pyproject.toml.
"""

from __future__ import annotations

import inspect
import re
from importlib.metadata import version
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

ROOT = Path(__file__).resolve().parents[1]


def _pin(package: str) -> str:
    # A regex, not tomllib: the package supports Python 3.10, which has no tomllib.
    found = re.search(rf'"{package}(\[[\w,]+\])?==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    if found:
        return found.group(2)
    raise AssertionError(f"pyproject.toml does not pin {package} exactly (the private APIs below need a pin)")


@pytest.mark.parametrize("package", ["lightning", "jsonargparse"])
def test_installed_versions_are_the_pinned_ones(package: str) -> None:
    pinned, installed = _pin(package), version(package)
    assert installed == pinned, (
        f"{package} {installed} is installed but pyproject.toml pins {pinned}: the private APIs checked in "
        "tests/test_pins.py were verified for the pinned version only"
    )


def _fail(api: str, user: str) -> str:
    return f"Lightning {L.__version__} changed {api}, which {user} relies on: re-check it and update the pin"


def test_cli_applies_ckpt_hparams_in_parse_ckpt_path() -> None:
    """cli.py DTEMCLI overrides ``_parse_ckpt_path`` with a no-op: it has already made the checkpoint's
    hyper-parameters defaults (trusted keys only) in ``parse_arguments``; Lightning's version would re-apply them
    all over the parsed config."""
    init = inspect.getsource(LightningCLI.__init__)
    assert "self.parse_arguments(self.parser, args)" in init and "self._parse_ckpt_path()" in init, _fail(
        "LightningCLI.__init__ (no longer calls _parse_ckpt_path after parse_arguments)", "cli.py DTEMCLI"
    )
    assert init.index("self._parse_ckpt_path()") > init.index("self.parse_arguments("), _fail(
        "the order of parse_arguments and _parse_ckpt_path", "cli.py DTEMCLI"
    )
    assert "ckpt_path" in inspect.getsource(LightningCLI._parse_ckpt_path), _fail(
        "LightningCLI._parse_ckpt_path", "cli.py DTEMCLI"
    )


def test_cli_keeps_one_parser_per_subcommand() -> None:
    """cli.py ``_ckpt_hparams_as_defaults`` sets defaults on ``self._subcommand_parsers[subcommand]``."""
    source = inspect.getsource(LightningCLI._add_subcommands)
    assert "self._subcommand_parsers[subcommand] = subcommand_parser" in source, _fail(
        "LightningCLI._subcommand_parsers", "cli.py DTEMCLI._ckpt_hparams_as_defaults"
    )


def test_cli_instantiation_sets_given_hyperparameters() -> None:
    """tasks/base.py reads ``_given_hyperparameters`` to tell a CLI instantiation (hyper-parameters are the
    config) from a Python one (component objects are left out of the saved hyper-parameters)."""
    from lightning.pytorch.core.mixins import hparams_mixin

    var = getattr(hparams_mixin, "_given_hyperparameters", None)
    context = getattr(hparams_mixin, "_given_hyperparameters_context", None)
    assert var is not None and context is not None, _fail(
        "hparams_mixin._given_hyperparameters", "tasks/base.py"
    )
    assert var.get() is None
    with context({"a": 1}, "x"):
        assert var.get() is not None and var.get()["a"] == 1, _fail(
            "_given_hyperparameters_context", "tasks/base.py"
        )
    import lightning.pytorch.cli as cli

    assert "_given_hyperparameters_context(" in inspect.getsource(cli._InstantiatorFn.__call__), _fail(
        "the CLI instantiator (no longer sets _given_hyperparameters)", "tasks/base.py"
    )


def test_loop_progress_counters() -> None:
    """data/sampling.py reads ``fit_loop.epoch_loop.batch_progress.current.completed`` (exact resume) and
    callbacks.py ``fit_loop.epoch_progress.current.processed`` (the max_epochs < max_steps warning)."""
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert trainer.fit_loop.epoch_loop.batch_progress.current.completed == 0, _fail(
        "fit_loop.epoch_loop.batch_progress", "data/sampling.py samples_done_this_epoch"
    )
    assert trainer.fit_loop.epoch_progress.current.processed == 0, _fail(
        "fit_loop.epoch_progress", "callbacks.py FinalCheckpoint.on_train_end"
    )


def test_model_checkpoint_writes_last_through_private_methods() -> None:
    """callbacks.py ``FinalCheckpoint._write_last`` calls ``ModelCheckpoint._save_last_checkpoint(trainer,
    ModelCheckpoint._monitor_candidates(trainer))`` to write the final weights into last.ckpt."""
    save = getattr(ModelCheckpoint, "_save_last_checkpoint", None)
    candidates = getattr(ModelCheckpoint, "_monitor_candidates", None)
    assert save is not None and candidates is not None, _fail(
        "ModelCheckpoint._save_last_checkpoint/_monitor_candidates", "callbacks.py FinalCheckpoint"
    )
    assert list(inspect.signature(save).parameters) == ["self", "trainer", "monitor_candidates"], _fail(
        "the signature of ModelCheckpoint._save_last_checkpoint", "callbacks.py FinalCheckpoint"
    )
    assert list(inspect.signature(candidates).parameters) == ["self", "trainer"], _fail(
        "the signature of ModelCheckpoint._monitor_candidates", "callbacks.py FinalCheckpoint"
    )
