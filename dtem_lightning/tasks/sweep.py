"""The r-sweep of the test loop: one row per (policy, r), their labels, and the hooks that run them."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import lightning as L
from torch import Tensor

from dtem_lightning.encoder import parse_r, r_key, r_label
from dtem_lightning.policy import MergePolicy, NoMerge


def policy_label(policy: MergePolicy, trained: bool) -> str:
    """Row name of a policy in sweep tables: its display name (``DTEM`` for DTEMSoft and DTEMHard, else the class
    name), marked "(trained)" or "(untrained)" when it has parameters."""
    name = type(policy).display_name or type(policy).__name__
    if not any(True for _ in policy.parameters()):
        return name
    return f"{name} ({'trained' if trained else 'untrained'})"


def distinct_labels(labels: list[str], policies: list[MergePolicy]) -> list[str]:
    """``labels`` made unique: a repeated label gets the init arguments in which its policy differs from the first
    policy of that label (``ToMe (prop_attn=False)``), else a running number (``DTEM (untrained #2)``); the first
    one stays bare unless it differs from its class's defaults there (``PiToMe (margin=0.5)``) and is not the task's
    own policy (row 0)."""

    def args(p: MergePolicy) -> dict[str, Any]:
        config = policy_config(p)
        return dict(config[1]) if config else {}

    def with_extra(label: str, extra: str) -> str:
        """``DTEM (untrained)`` + ``#2`` -> ``DTEM (untrained #2)``; ``ToMe`` + ``a=1`` -> ``ToMe (a=1)``."""
        if not label.endswith(")"):
            return f"{label} ({extra})"
        return f"{label[:-1]}{' ' if extra.startswith('#') else ', '}{extra})"

    def first_label(j: int, label: str) -> str:
        """The first policy of a repeated label keeps it bare only where it has its class's defaults; the task's
        own policy (row 0) keeps its label (notes and tools key on it)."""
        group = [policies[k] for k, other in enumerate(labels) if other == label]
        if len(group) < 2 or j == 0:
            return label
        mine = args(policies[j])
        varying = {k for p in group[1:] for k, v in args(p).items() if k in mine and mine[k] != v}
        defaults = inspect.signature(type(policies[j]).__init__).parameters
        own = [
            f"{k}={v}" for k, v in mine.items() if k in varying and k in defaults and defaults[k].default != v
        ]
        return with_extra(label, ", ".join(own)) if own else label

    out: list[str] = []
    for j, (label, p) in enumerate(zip(labels, policies)):
        first = labels.index(label)
        if first == j:
            out.append(first_label(j, label))
            continue
        mine, theirs = args(p), args(policies[first])
        extras = [", ".join(f"{k}={v}" for k, v in mine.items() if k in theirs and theirs[k] != v)]
        extras.append(f"#{labels[: j + 1].count(label)}")
        for extra in filter(None, extras):
            name = with_extra(label, extra)
            if name not in out:
                break
        out.append(name)
    return out


def policy_config(policy: MergePolicy) -> tuple[type, tuple[tuple[str, Any], ...]] | None:
    """(class, init arguments but ``r``) of a policy: what its sweep rows compute.

    ``r`` is left out because the sweep runs every policy at each ``test_r``. Arguments are read back from the
    attributes of the same name; None when one is not readable, and such a policy is never taken for a duplicate.
    """
    params = list(inspect.signature(type(policy).__init__).parameters.values())[1:]
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return None
    missing = object()
    args = tuple((p.name, getattr(policy, p.name, missing)) for p in params if p.name != "r")
    return None if any(v is missing for _, v in args) else (type(policy), args)


Rate = TypeVar("Rate")


def sweep_rows(
    policies: Sequence[tuple[str, MergePolicy]], rs: Sequence[Rate]
) -> list[tuple[int, str, MergePolicy, Rate]]:
    """(index, label, policy, r) of a sweep of labelled ``policies`` over the rates ``rs``.

    NoMerge is one row at r = 0 (every policy at r = 0 computes exactly it); every other policy has a row per r.
    """
    out: list[tuple[int, str, MergePolicy, Rate]] = []
    for i, (label, p) in enumerate(policies):
        out += [(i, label, p, 0)] if isinstance(p, NoMerge) else [(i, label, p, r) for r in rs]
    return out


class SweepMixin:
    """The test loop of :class:`~dtem_lightning.tasks.base.BaseTask`: every policy at every ``test_r`` in one pass.

    Rows are ``(index, label, policy, r)`` (:meth:`sweep`), each with its own metric collection
    (:meth:`sweep_key`); ``on_test_epoch_end`` leaves one dict per row in ``sweep_results`` and a
    ``sweep_note`` for ``sweep.md`` (written by :class:`~dtem_lightning.callbacks.SweepWriter`).
    """

    def _check_r(self, r: int | list[int] | str) -> int | list[int]:
        """One ``test_r`` entry parsed and checked against the backbone's depth (errors name the entry)."""
        try:
            r = parse_r(r)
            self.encoder.schedule(r)
        except (TypeError, ValueError) as e:
            raise ValueError(f"bad test_r entry {r!r}: {e}") from None
        return r

    def _without_duplicates(self, test_policies: list[MergePolicy]) -> list[MergePolicy]:
        """``test_policies`` minus entries whose rows the task's own policy or an earlier entry already writes."""
        own = (policy_label(self.policy, trained=True), policy_config(self.policy))
        seen = [(own, "the task's own policy")]
        kept = []
        for i, p in enumerate(test_policies):
            ident = (policy_label(p, trained=False), policy_config(p))
            twin = next((where for known, where in seen if ident[1] is not None and known == ident), None)
            if twin is not None:
                warnings.warn(
                    f"test_policies[{i}] {type(p).__name__}({p.extra_repr()}) repeats {twin}: dropped (its rows "
                    "would be written twice)",
                    stacklevel=3,
                )
                continue
            seen.append((ident, f"test_policies[{i}]"))
            kept.append(p)
        return kept

    def policies(self) -> list[tuple[str, MergePolicy]]:
        """(label, policy) pairs evaluated by the test loop: the task's own policy first, "(trained)" when a
        checkpoint (``ckpt_path``, ``init_from``) or a fit trained its parameters, test policies with parameters
        "(untrained)" (controls); repeated labels are told apart (:func:`distinct_labels`)."""
        policies = [self.policy, *self.test_policies]
        labels = [policy_label(self.policy, trained=self._policy_trained)]
        labels += [policy_label(p, trained=False) for p in self.test_policies]
        return list(zip(distinct_labels(labels, policies), policies))

    def sweep(self) -> list[tuple[int, str, MergePolicy, int | list[int]]]:
        """(index, label, policy, r) of every test-loop evaluation (r: constant or schedule).

        r = 0 is NoMerge whatever the policy (bit-identical), so it is one row: NoMerge's (added to the
        test policies when ``test_r`` holds a zero rate and no NoMerge is listed).
        """
        return sweep_rows(self.policies(), [r for r in self.test_r if any(self.encoder.schedule(r))])

    @staticmethod
    def sweep_key(i: int, r: int | list[int]) -> str:
        """Name of the metric collection of policy ``i`` at ``r`` (key-safe also for schedules)."""
        return f"p{i}_r{r_key(r)}"

    # ------------------------------------------------------------------ sizing a row (subclasses may override)
    def gmacs(self, input_size: tuple[int, int, int]) -> float:
        """GMACs per image of the current model (backbone and policy; subclasses add their heads)."""
        return self.encoder.gmacs(input_size)

    def input_size_of(self, batch: Any) -> tuple[int, int, int]:
        """(C, H, W) of the images in ``batch``."""
        return tuple(batch[0].shape[1:])

    def input_size_for_flops(self, trainer: L.Trainer) -> tuple[int, int, int]:
        """(C, H, W) the data module produces, else the backbone's own input size."""
        size = getattr(trainer.datamodule, "input_size", None)
        return tuple(size) if size else (3, *self.encoder.img_size)

    def num_input_tokens(self, input_size: tuple[int, int, int]) -> int:
        """Tokens entering block 0 for images of ``input_size``."""
        return self.encoder.num_tokens(tuple(input_size[1:]))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Let a checkpoint trained with one policy be tested with another (``ckpt_path``, ``init_from``).

        Policy weights the current policies do not have (or have in another shape, e.g. another embedding
        width) are dropped, and policy weights they need but the checkpoint lacks keep their initialisation;
        each case prints one line.
        """
        state = checkpoint.get("state_dict", {})
        own = self.state_dict()
        policy_keys = ("policy.", "test_policies.")
        other_shape = [
            k for k in state if k.startswith(policy_keys) and k in own and state[k].shape != own[k].shape
        ]
        extra = [k for k in state if k.startswith(policy_keys) and k not in own] + other_shape
        missing = [k for k in own if k.startswith(policy_keys) and k not in state] + other_shape
        first = extra[0] if extra else None
        if first in other_shape:
            first = f"{first}: {list(state[first].shape)} in the checkpoint, {list(own[first].shape)} here"
        for k in extra:
            del state[k]
        for k in missing:
            state[k] = own[k]
        if extra:
            warnings.warn(
                f"checkpoint policy weights unused by {type(self.policy).__name__}: {len(extra)} tensors "
                f"ignored ({first}, ...)",
                stacklevel=2,
            )
        self._policy_trained = not any(k.startswith("policy.") for k in missing)
        if not self._policy_trained:
            warnings.warn(
                f"checkpoint has no weights for {type(self.policy).__name__}: its parameters keep "
                "their initialisation",
                stacklevel=2,
            )

    def on_test_epoch_start(self) -> None:
        for _, policy in self.policies():
            policy.reset_measurements()  # FLOPs and tokens of this test run only
        self._reset_sample_stats()
        ref, labels = self.hparams.interval_reference, [label for label, _ in self.policies()]
        wanted = ref is not None and self.hparams.bootstrap > 0 and self.interval_metric is not None
        if wanted and ref not in labels and len(labels) > 1 and self.global_rank == 0:
            warnings.warn(
                f"interval_reference {ref!r} is none of this sweep's policies {labels}: no intervals (set "
                "--model.init_args.interval_reference to one of them, or bootstrap=0)",
                stacklevel=2,
            )
        self._keep_stats = bool(self.interval_pairs())
        if self._keep_stats:
            self._test_batches = self._sampler_batches()

    def test_step(self, batch: Any, batch_idx: int) -> None:
        if self._input_size is None:
            self._input_size = self.input_size_of(batch)
        keep = self._keep_stats
        for i, _, policy, r in self.sweep():
            with self.running(policy, r):
                preds, target = self.evaluate(batch)
            key = self.sweep_key(i, r)
            self.test_metrics[key].update(preds, target)
            if keep and (s := self.sample_stats(preds, target)) is not None:
                self._test_stats.setdefault(key, []).append(s.detach())
        if keep:
            self._test_index.append(self._sample_index(batch, batch_idx))

    def on_test_epoch_end(self) -> None:
        self.sweep_results = []
        pairs = self.interval_pairs() if self._keep_stats else {}
        paired = {j for pair in pairs.items() for j in pair}
        row_stats: dict[str, Tensor] = {}
        for j, (i, label, policy, r) in enumerate(self.sweep()):
            key = self.sweep_key(i, r)
            computed = self.test_metrics[key].compute()
            values = {k: float(v) for k, v in computed.items() if v.numel() == 1}  # scalar columns only
            if j in paired and (s := self.row_sample_stats(key)) is not None:
                row_stats[key] = s  # read before the reset: captioning's come from the computed metric
            self.test_metrics[key].reset()
            gf, tokens = float("nan"), -1  # no test batch seen: nothing to size the model with
            if self._input_size is not None:
                with self.running(policy, r):
                    gf = 0.0
                    for schedule, share in policy.measured_schedules():  # what ran (ATM: data-dependent)
                        with policy.replaying(schedule):
                            gf += share * self.gmacs(self._input_size)
                    tokens = self.encoder.token_counts(self.num_input_tokens(self._input_size))[-1]
            row = {"policy": label, "r": r_label(r), "gflops": gf, "tokens": tokens, **values}
            self.sweep_results.append(row)
        notes = [self.label_note(), self._add_intervals(row_stats) if pairs else ""]
        self.sweep_note = "\n\n".join(n for n in notes if n)
        self._test_stats, self._test_index = {}, []  # free the per-sample statistics

    def label_note(self) -> str:
        """What the learnable rows of the sweep are ("" when it has none)."""
        labels = [label for label, p in self.policies() if any(True for _ in p.parameters())]
        lines = []
        for label in labels:
            if "(trained" in label:
                lines.append(f"{label}: the learned policy of this run, evaluated with hard merging.")
            else:
                lines.append(
                    f"{label}: a policy with freshly initialised parameters (a control; no checkpoint or fit "
                    "trained it), evaluated with hard merging."
                )
        if lines:
            lines.append("NoMerge: no merging; every policy at r = 0 computes exactly this row.")
        return "\n".join(f"- {line}" for line in lines)

    @contextmanager
    def running(self, policy: MergePolicy, r: int | list[int]) -> Iterator[None]:
        """Run the backbone with ``policy`` at reduction ``r`` (constant or schedule); own policy back afterwards."""
        with self.encoder.running(policy, r):
            yield
