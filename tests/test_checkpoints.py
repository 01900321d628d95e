"""``last.ckpt`` always holds the final weights of a fit, whatever the monitored metric did."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import read_sweep

from dtem_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def _args(image_root: str, out: Path, *extra: str) -> list[str]:
    return [
        "-c", str(CONFIGS / "deit_s_modular.yaml"), "-c", str(CONFIGS / "debug.yaml"), *extra,
        f"--data.init_args.root={image_root}", f"--trainer.logger.init_args.save_dir={out}",
        "--trainer.max_epochs=2", "--data.init_args.max_per_class=8", "--model.init_args.optimizer.init_args.lr=0.05",
    ]  # fmt: skip


def _policy_weights(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("policy.")}


@pytest.mark.parametrize("save_last", [True, "link"])
def test_last_ckpt_is_final_when_metric_stops_improving(image_root, tmp_path, save_last):
    # Monitoring "epoch" in min mode makes epoch 0 the best forever: the second epoch never improves it.
    callbacks = {
        "trainer": {
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "monitor": "epoch",
                        "mode": "min",
                        "save_last": save_last,
                        "filename": "best-{step}",
                    },
                },
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"every_n_train_steps": 4, "save_top_k": -1, "filename": "step-{step}"},
                },
            ]  # fmt: skip
        }
    }
    cfg = tmp_path / "callbacks.yaml"
    cfg.write_text(yaml.safe_dump(callbacks))
    main(["fit", *_args(image_root, tmp_path / "fit", "-c", str(cfg))])
    ckpts = {p.name: p for p in (tmp_path / "fit").rglob("*.ckpt")}
    assert {"last.ckpt", "best-step=2.ckpt", "step-step=4.ckpt"} == set(ckpts), sorted(ckpts)
    assert not ckpts["last.ckpt"].is_symlink()
    last = torch.load(ckpts["last.ckpt"], weights_only=True)
    assert last["global_step"] == 4, f"last.ckpt is at step {last['global_step']}, the fit ended at step 4"
    final, best = _policy_weights(ckpts["step-step=4.ckpt"]), _policy_weights(ckpts["best-step=2.ckpt"])
    got = _policy_weights(ckpts["last.ckpt"])
    assert all(torch.equal(got[k], final[k]) for k in final)
    assert any(not torch.equal(got[k], best[k]) for k in best), "training did not change the embedding"
    assert torch.load(ckpts["best-step=2.ckpt"], weights_only=True)["global_step"] == 2  # best is untouched

    # `dtem test` on last.ckpt evaluates those final weights: the same sweep as the step-4 checkpoint's.
    sweeps = []
    for name in ("last.ckpt", "step-step=4.ckpt"):
        out = tmp_path / f"test_{name}"
        main(["test", *_args(image_root, out), f"--ckpt_path={ckpts[name]}"])
        sweeps.append(read_sweep(out))
    assert sweeps[0] == sweeps[1]


def test_cli_defaults_write_final_last_ckpt(image_root, tmp_path):
    # No checkpoint callback configured: Lightning's default one is used and still gets a final last.ckpt.
    cfg = tmp_path / "no_callbacks.yaml"
    cfg.write_text(yaml.safe_dump({"trainer": {"callbacks": []}}))
    main(["fit", *_args(image_root, tmp_path, "-c", str(cfg))])
    last = list(tmp_path.rglob("last.ckpt"))
    assert len(last) == 1, last
    assert torch.load(last[0], weights_only=True)["global_step"] == 4
