"""A checkpoint never runs code unless the user opts in (issue 17, section 1).

Every payload here is harmless: unpickling or importing it creates a marker file under the test's tmp dir, and
each test asserts that the marker is absent. The remote checkpoint is served from 127.0.0.1 only.
"""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import make_image_tree
from test_cli import CONFIGS

from dtem_lightning.cli import main
from dtem_lightning.io import AtomicCheckpointIO


class Payload:
    """Unpickling it creates the file ``marker`` (what a malicious pickle would do with any command)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(last.ckpt of a tiny modular fit, its image root)."""
    base = tmp_path_factory.mktemp("fit")
    root = make_image_tree(base / "imgs")
    main(["fit", "-c", str(CONFIGS / "deit_s_modular.yaml"), "-c", str(CONFIGS / "debug.yaml"),
          f"--data.init_args.root={root}", f"--trainer.logger.init_args.save_dir={base / 'runs'}"])  # fmt: skip
    return next((base / "runs").rglob("last.ckpt")), root


def _test_args(root: Path, out: Path, ckpt: str) -> list[str]:
    return ["test", f"--ckpt_path={ckpt}", "--data=ImageFolderDataModule", f"--data.init_args.root={root}",
            "--data.init_args.img_size=32", "--data.init_args.max_per_class=4", "--trainer.limit_test_batches=1",
            "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={out}"]  # fmt: skip


def _with_hparams(ckpt: Path, out: Path, **hparams: object) -> Path:
    """A copy of ``ckpt`` whose task hyper-parameters are changed (what a shared checkpoint could carry)."""
    state = torch.load(ckpt, weights_only=True)
    state["hyper_parameters"] = {**state["hyper_parameters"], **hparams}
    torch.save(state, out)
    return out


def _exit_code(args: list[str]) -> int:
    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(URL of a pickled checkpoint with a payload served by 127.0.0.1, the payload's marker file)."""
    site, marker = tmp_path / "site", tmp_path / "payload-ran"
    site.mkdir()
    torch.save({"state_dict": {}, "x": Payload(marker)}, site / "evil.ckpt")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/evil.ckpt", marker
    finally:
        server.shutdown()
        server.server_close()


def test_remote_ckpt_path_is_refused_without_running_its_payload(
    served, fitted, tmp_path, capsys, monkeypatch
):
    """Lightning loads ``http(s)://`` checkpoints with ``weights_only=False``: dtem refuses URLs (one line), on the
    command line and in the checkpoint reader the trainer uses (a ``ckpt_path`` from a config file)."""
    monkeypatch.setenv(
        "TORCH_HOME", str(tmp_path / "torch_home")
    )  # a download would be cached here, not in ~
    url, marker = served
    _, root = fitted
    args = ["test", "-c", str(CONFIGS / "deit_s_modular.yaml"), "-c", str(CONFIGS / "debug.yaml"),
            f"--data.init_args.root={root}", f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--ckpt_path={url}"]  # fmt: skip
    assert _exit_code(args) == 2
    err = capsys.readouterr().err
    assert f"--ckpt_path {url} is a URL: dtem loads only local files" in err, err
    assert not marker.exists()
    with pytest.raises(ValueError, match="is a URL"):
        AtomicCheckpointIO().load_checkpoint(url)
    assert not marker.exists()


def test_checkpoint_cannot_grant_itself_trust(fitted, tmp_path, capsys):
    """A shared checkpoint with ``trust_checkpoint: true`` and a ``checkpoint_path`` to a pickle with a payload:
    neither is taken from it; the test runs on the checkpoint's own weights and the payload never runs."""
    ckpt, root = fitted
    marker = tmp_path / "payload-ran"
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    backbone = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    torch.save({**backbone, "x": Payload(marker)}, tmp_path / "weights.pth")  # loads once the pickle may run
    shared = _with_hparams(ckpt, tmp_path / "shared.ckpt", trust_checkpoint=True,
                           checkpoint_path=str(tmp_path / "weights.pth"))  # fmt: skip
    main(_test_args(root, tmp_path / "runs", str(shared)))
    assert not marker.exists()
    err = capsys.readouterr().err
    assert "trust_checkpoint: true; that is not carried over" in err, err
    assert f"checkpoint_path {tmp_path / 'weights.pth'} of --ckpt_path {shared} is not loaded" in err, err
    assert list((tmp_path / "runs").rglob("sweep.csv"))


def test_plain_weights_path_from_checkpoint_is_kept(fitted, tmp_path):
    """A researcher's own fit from a plain weights file: ``dtem test --ckpt_path`` needs no retyped path."""
    from safetensors.torch import save_file

    ckpt, root = fitted
    weights = tmp_path / "backbone.safetensors"
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    save_file({k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}, str(weights))
    own = _with_hparams(ckpt, tmp_path / "own.ckpt", checkpoint_path=str(weights))
    main(_test_args(root, tmp_path / "runs", str(own)))
    (config,) = (tmp_path / "runs").rglob("config_test.yaml")
    assert f"checkpoint_path: {weights}" in config.read_text()


@pytest.mark.parametrize(
    ("hparams", "where"),
    [
        ({"_class_path": "dtem_evil_module.Task"}, "(_class_path)"),
        ({"policy": {"class_path": "dtem_evil_module.Policy", "init_args": {}}}, "(policy.class_path)"),
        ({"optimizer": "dtem_evil_module.make_optimizer"}, "(optimizer)"),
    ],
    ids=["task", "nested_policy", "callable_string"],
)
def test_checkpoint_class_paths_outside_trusted_packages_are_refused(
    hparams, where, fitted, tmp_path, capsys, monkeypatch
):
    """A class or import path from a checkpoint decides what is imported (a module runs at import): only this
    package, torch, timm and lightning are accepted; anything else is refused in one line, before any import."""
    ckpt, root = fitted
    marker = tmp_path / "import-ran"
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "dtem_evil_module.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nclass Task: ...\nclass Policy: ...\ndef make_optimizer(p): ...\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    shared = _with_hparams(ckpt, tmp_path / "shared.ckpt", **hparams)
    assert _exit_code(_test_args(root, tmp_path / "runs", str(shared))) == 2
    err = capsys.readouterr().err
    assert f"refusing --ckpt_path {shared}: its hyper-parameters name 'dtem_evil_module." in err, err
    assert where in err and len(err.strip().splitlines()) == 1, err
    assert not marker.exists()


def test_pickled_ckpt_path_is_refused_in_one_line(tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    torch.save({"state_dict": {}, "x": Payload(marker)}, tmp_path / "evil.ckpt")
    assert _exit_code(["test", f"--ckpt_path={tmp_path / 'evil.ckpt'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs arbitrary pickled code (io.open)" in err, err
    assert not marker.exists()
