"""Experiment tracking: `--track mlflow` or `--track tensorboard` on `heads train`, `heads sweep`, `finetune run`.

One small interface (`Tracker`) with a no-op default and two backends. A trained run is logged from its
`RunResult` once it is finished (`log_result`): the parameters (config, parameter counts, device), the
per-epoch curves (step = epoch), the final metrics of every split and task with their confusion counts and
prediction checks, and the run folder (whose `model.safetensors` is the best checkpoint). Groups of runs
(a sweep, the folds of a cross-validation) are logged as children of one parent run (`track`).

mlflow honours `MLFLOW_TRACKING_URI` (otherwise `sqlite:///<runs_dir>/mlflow.db`, artifacts under
`<runs_dir>/mlruns/`: nothing is written outside the runs folder) and `MLFLOW_EXPERIMENT_NAME` /
`MLFLOW_EXPERIMENT_ID` (default experiment: the dataset's name).
TensorBoard writes event files under `<runs_dir>/tensorboard/<dataset>/<run>/`.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmcache.errors import MMCacheError

if TYPE_CHECKING:
    from mmcache.engine import RunResult

TRACKERS = ("mlflow", "tensorboard")
_MODULES = {"mlflow": "mlflow", "tensorboard": "tensorboard"}
_PARAM_CHARS = 500  # the smallest value length every mlflow server accepts
_BATCH = 100  # mlflow's log_batch takes at most 100 params (1000 metrics) per call


def mlflow_telemetry_off() -> None:
    """mlflow's usage telemetry (and the installation id it keeps in ~/.config/mlflow/telemetry.json) stays off
    unless the user turned it on: MLFLOW_DISABLE_TELEMETRY=true, set before mlflow is imported, when neither it nor
    DO_NOT_TRACK is set already."""
    if "MLFLOW_DISABLE_TELEMETRY" not in os.environ and "DO_NOT_TRACK" not in os.environ:
        os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"


def require(kind: str | None) -> None:
    """Refuse an unknown `--track` value or a backend that is not installed, before any training."""
    if kind is None:
        return
    if kind == "mlflow":
        mlflow_telemetry_off()
    if kind not in TRACKERS:
        raise MMCacheError(f"unknown --track {kind!r}; choose one of {', '.join(TRACKERS)}")
    import importlib.util

    if importlib.util.find_spec(_MODULES[kind]) is None:
        raise MMCacheError(f"--track {kind} needs {kind}: pip install 'mmcache[track]'")


def clean_key(key: str) -> str:
    """A metric or parameter name both backends accept (letters, digits, `_ - . / : space`)."""
    return re.sub(r"[^\w\-./: ]", "_", key)


class Tracker:
    """One tracked run; this default logs nothing. `child()` gives a tracker whose run nests under this one."""

    def start(self, name: str, params: dict[str, Any], tags: dict[str, str] | None = None,
              seconds_ago: float = 0.0) -> None:
        """Open the run `name` (begun `seconds_ago`) with its parameters and tags."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Scalars at `step` (an epoch, or the chosen epoch for final values)."""

    def log_text(self, name: str, text: str) -> None:
        """A text document (`name` ends in .md or .json)."""

    def log_files(self, paths: Sequence[Path], under: str) -> None:
        """Files as artifacts under `under/` (a folder's files: directly under `under/`)."""

    def child(self) -> Tracker:
        """A tracker for a run nested under this one."""
        return Tracker()

    def end(self, ok: bool = True) -> None:
        """Close the run (failed when not `ok`)."""


class MLflowTracker(Tracker):
    """Runs in an mlflow tracking store, through `MlflowClient` (no global active run)."""

    def __init__(self, experiment: str, parent: str | None = None, client: Any = None,
                 experiment_id: str | None = None, runs_dir: str | Path | None = None) -> None:
        mlflow_telemetry_off()
        from mlflow import MlflowClient

        uri, artifacts = _default_store(runs_dir)
        self.client = client or MlflowClient(tracking_uri=uri)
        self.experiment_id = experiment_id or _experiment_id(self.client, experiment, artifacts)
        self.parent = parent
        self.run_id: str | None = None

    def start(self, name: str, params: dict[str, Any], tags: dict[str, str] | None = None,
              seconds_ago: float = 0.0) -> None:
        from mlflow.entities import Param

        all_tags = dict(tags or {})
        if self.parent:
            all_tags["mlflow.parentRunId"] = self.parent
        start_ms = int((time.time() - seconds_ago) * 1000)
        run = self.client.create_run(self.experiment_id, start_time=start_ms, tags=all_tags, run_name=name)
        self.run_id = run.info.run_id
        items = [Param(clean_key(k), _param_value(v)) for k, v in params.items()]
        for s in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[s:s + _BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(clean_key(k), float(v), now, int(step)) for k, v in metrics.items() if _finite(v)]
        for s in range(0, len(items), 1000):
            self.client.log_batch(self._id(), metrics=items[s:s + 1000])

    def log_text(self, name: str, text: str) -> None:
        self.client.log_text(self._id(), text, name)

    def log_files(self, paths: Sequence[Path], under: str) -> None:
        for p in paths:
            if p.is_dir():
                self.client.log_artifacts(self._id(), str(p), under or p.name)
            elif p.exists():
                self.client.log_artifact(self._id(), str(p), under or None)

    def child(self) -> Tracker:
        return MLflowTracker("", parent=self._id(), client=self.client, experiment_id=self.experiment_id)

    def end(self, ok: bool = True) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")

    def _id(self) -> str:
        if self.run_id is None:
            raise RuntimeError("start() the run first")
        return self.run_id


def _default_store(runs_dir: str | Path | None) -> tuple[str | None, str | None]:
    """Without `MLFLOW_TRACKING_URI`: the tracking database `<runs_dir>/mlflow.db` and artifacts under
    `<runs_dir>/mlruns/` (mlflow's own default would write both into the working folder); (None, None) when
    the variable is set or no runs folder is given."""
    if os.environ.get("MLFLOW_TRACKING_URI") or runs_dir is None:
        return None, None
    root = Path(runs_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}", (root / "mlruns").as_uri()


def _experiment_id(client: Any, name: str, artifact_location: str | None = None) -> str:
    """`MLFLOW_EXPERIMENT_ID`, else the experiment `MLFLOW_EXPERIMENT_NAME` (default `name`), created if new
    (its artifacts under `artifact_location` when given)."""
    from mlflow.exceptions import MlflowException

    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or name
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    try:
        return str(client.create_experiment(name, artifact_location=artifact_location))
    except MlflowException:  # created by another process meanwhile
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return str(exp.experiment_id)


class TensorBoardTracker(Tracker):
    """Event files (torch's `SummaryWriter`): one folder per run, children in their parent's folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.writer: Any = None
        self.logdir: Path | None = None

    def start(self, name: str, params: dict[str, Any], tags: dict[str, str] | None = None,
              seconds_ago: float = 0.0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = self.root / _folder_name(name)
        self.writer = SummaryWriter(log_dir=str(self.logdir))
        self._params = {clean_key(k): _hparam_value(v) for k, v in params.items()}
        self._finals: dict[str, float] = {}
        if tags:
            self.writer.add_text("tags", _md_table(["tag", "value"], [[k, v] for k, v in tags.items()]))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            if _finite(v):
                self.writer.add_scalar(clean_key(k), float(v), int(step))
                self._finals[clean_key(k)] = float(v)

    def log_text(self, name: str, text: str) -> None:
        body = f"```\n{text}\n```" if name.endswith(".json") else text
        self.writer.add_text(Path(name).stem, body)

    def log_files(self, paths: Sequence[Path], under: str) -> None:
        self.writer.add_text(under or "files", "\n".join(f"- `{p}`" for p in paths))

    def child(self) -> Tracker:
        if self.logdir is None:
            raise RuntimeError("start() the run first")
        return TensorBoardTracker(self.logdir)

    def end(self, ok: bool = True) -> None:
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        # The HPARAMS tab: this run's parameters next to its final values, in the run's own folder.
        finals = {k: v for k, v in self._finals.items() if not k.startswith("epoch/")}
        for summary in hparams(self._params, finals):
            self.writer.file_writer.add_summary(summary)
        self.writer.close()
        self.writer = None


def _folder_name(name: str) -> str:
    return "/".join(re.sub(r"[^\w\-.=+,]", "_", part) for part in name.split("/") if part) or "run"


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _param_value(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s if len(s) <= _PARAM_CHARS else s[:_PARAM_CHARS - 3] + "..."


def _hparam_value(v: Any) -> Any:
    return v if isinstance(v, (bool, int, float, str)) else _param_value(v)


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def open_tracker(kind: str | None, dataset: str, runs_dir: str | Path) -> Tracker:
    """The tracker of `--track KIND` (the no-op `Tracker` for None)."""
    require(kind)
    if kind == "mlflow":
        return MLflowTracker(dataset, runs_dir=runs_dir)
    if kind == "tensorboard":
        return TensorBoardTracker(Path(runs_dir) / "tensorboard" / dataset)
    return Tracker()


# ---------------------------------------------------------------- what a run logs


def _flatten(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# Resolved values worth a parameter each (the rest of `resolved` is in config.json, logged with the run folder).
_RESOLVED = ("device", "threads", "world_size", "head_hparams", "fold", "split_seed", "rows", "best_epoch", "select")


def run_params(result: RunResult) -> dict[str, Any]:
    """The config (flattened, `a.b` for nested keys), what it resolved to, and parameter counts."""
    cfg = dict(result.config)
    resolved = cfg.pop("resolved", {}) or {}
    params = _flatten(cfg)
    params.update(_flatten({k: resolved[k] for k in _RESOLVED if k in resolved}, "resolved."))
    head = result.head
    stats = resolved.get("train") or {}  # fine-tuning counts the whole model (encoders, head, loss)
    params["params_total"] = stats.get("total_params", sum(p.numel() for p in head.parameters()))
    params["params_trainable"] = stats.get("trainable_params",
                                           sum(p.numel() for p in head.parameters() if p.requires_grad))
    params["device"] = str(resolved.get("device", ""))
    return params


def curve_steps(curves: list[dict[str, Any]]) -> list[tuple[int, dict[str, float]]]:
    """Per-epoch scalars as (epoch, {"epoch/<column>": value}); an lbfgs grid logs one step per penalty."""
    out = []
    for i, row in enumerate(curves, 1):
        step = int(row.get("epoch", row.get("fit", i)))
        out.append((step, {f"epoch/{k}": v for k, v in row.items() if k not in ("epoch", "fit") and _finite(v)}))
    return out


def final_metrics(result: RunResult) -> dict[str, float]:
    """`<split>/<task>/<metric>`, `<split>/<task>/confusion/<true>/<predicted>` counts, `<split>/<task>/check/<name>`
    (1 passed, 0 failed), the selection value, best epoch and seconds."""
    out: dict[str, float] = {}
    for split, per_task in result.metrics.items():
        for task, m in per_task.items():
            p = f"{split}/{task}"
            for k, v in m.items():
                if _finite(v):
                    out[f"{p}/{k}"] = float(v)
            names = m.get("classes") or [str(i) for i in range(len(m.get("confusion_matrix", [])))]
            for i, row in enumerate(m.get("confusion_matrix", [])):
                for j, count in enumerate(row):
                    out[f"{p}/confusion/{names[i]}/{names[j]}"] = float(count)
            for name, c in m.get("checks", {}).items():
                out[f"{p}/check/{name}"] = 1.0 if c["ok"] else 0.0
    sel = result.select
    if sel and _finite(sel.get("value")):
        out[f"best/val_{sel['metric']}"] = float(sel["value"])
    out["best/epoch"] = float(result.best_epoch)
    out["seconds"] = float(result.seconds)
    out["fit_seconds"] = float(result.fit_seconds)
    return out


def checks_report(result: RunResult) -> dict[str, Any]:
    """Per split and task: each prediction check with its result and detail."""
    return {split: {task: m.get("checks", {}) for task, m in per_task.items()}
            for split, per_task in result.metrics.items()}


def confusion_report(result: RunResult) -> dict[str, Any]:
    """Per split and task: class names and the confusion matrix (rows true, columns predicted)."""
    return {split: {task: {"classes": m.get("classes"), "matrix": m["confusion_matrix"]}
                    for task, m in per_task.items() if "confusion_matrix" in m}
            for split, per_task in result.metrics.items()}


def log_result(tracker: Tracker, result: RunResult, name: str, tags: dict[str, str] | None = None) -> None:
    """Log one finished run: parameters, curves (step = epoch), final metrics, checks, confusion, run folder."""
    tracker.start(name, run_params(result), tags, seconds_ago=result.seconds)
    ok = False
    try:
        for step, values in curve_steps(result.curves):
            tracker.log_metrics(values, step)
        tracker.log_metrics(final_metrics(result), result.best_epoch)
        tracker.log_text("checks.json", json.dumps(checks_report(result), indent=1))
        tracker.log_text("confusion.json", json.dumps(confusion_report(result), indent=1))
        if result.run_dir is not None:  # its model.safetensors is the best checkpoint
            tracker.log_files([Path(result.run_dir)], "run")
        ok = True
    finally:
        tracker.end(ok)


def track(kind: str | None, dataset: str, runs_dir: str | Path, runs: Iterable[tuple[str, RunResult, dict[str, str]]],
          parent: tuple[str, dict[str, Any]] | None = None, files: Sequence[Path] = ()) -> None:
    """Log finished runs (name, result, tags) to `--track KIND`; with `parent` (name, params) they nest under one
    parent run, which also gets `files` (a sweep's tables and plot). Backend errors are one line."""
    if kind is None:
        return
    try:
        root = open_tracker(kind, dataset, runs_dir)
        if parent is None:
            for name, result, tags in runs:
                log_result(root, result, name, tags)
            return
        root.start(parent[0], parent[1], {"kind": "group"})
        ok = False
        try:
            for name, result, tags in runs:
                log_result(root.child(), result, name, tags)
            if files:
                root.log_files([Path(f) for f in files], "results")
            ok = True
        finally:
            root.end(ok)
    except MMCacheError:
        raise
    except Exception as e:  # a tracking server that refuses or is unreachable: the run folders are kept
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = " (MLFLOW_TRACKING_URI)" if kind == "mlflow" else ""
        raise MMCacheError(f"--track {kind}: logging failed ({first}); the run folders are written; "
                           f"check the tracking store{where}") from None
