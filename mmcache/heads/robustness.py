"""`heads robustness --run RUN`: a trained head on its test split with imperfect features.

Conditions, each evaluated on every labelled test row (read in batches, never a whole split at once):

- `clean`: the features as stored;
- `missing:<modality>`: that modality absent from the features (as the heads accept it), each used one in turn
  (only when the run uses two or more);
- `noise`: Gaussian noise added to every float array of every modality (`pooled`, `tokens`), its standard deviation
  `level` times the array's own standard deviation over the test rows, at each of `levels`;
- `token_dropout`: each real token of every token store dropped from its mask with probability `level` (only for
  heads that read tokens; a row left with no token counts as missing).

Noise is drawn from a generator seeded by `--seed` and the level, so the same command gives the same numbers.

Robustness as MultiBench (Liang et al., 2021) defines it, per perturbation curve (the metric at levels 0, ..., 1):
`relative` robustness is the area under the curve (the trapezoid rule over the levels divided by the largest, so
the default 11 levels 0, 0.1, ..., 1 give MultiBench's value), and `effective` robustness is the sum over levels of
`f(l) - (ref(l) + f(0) - ref(0))`: how much better the run holds up than a reference run (`--reference REF`; MultiBench
uses late fusion) shifted to the same clean value. MultiBench further min-max normalises both across the methods it
compares; the raw values are written here.

Writes `robustness.csv` (one row per condition), `robustness.md`, `robustness.json` (rows and the robustness
summary) and `robustness.png` (the metric against the level per perturbation) into the run folder.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmcache.errors import MMCacheError
from mmcache.heads.base import Features
from mmcache.heads.metrics import classification_metrics
from mmcache.stats import boot_metric

LEVELS = tuple(round(0.1 * i, 1) for i in range(11))  # MultiBench's levels
KINDS = ("missing", "noise", "token_dropout")
BATCH = 4096

Perturb = Callable[[Features, int], Features]  # (features of a batch, batch number) -> features


def relative_robustness(levels: list[float], values: list[float]) -> float:
    """Area under the metric-vs-level curve, levels scaled to [0, 1] (MultiBench: trapezoids of width 0.1)."""
    x = np.asarray(levels, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    top = float(x.max()) or 1.0
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x / top) / 2))


def effective_robustness(values: list[float], reference: list[float]) -> float:
    """sum_l f(l) - (ref(l) + f(0) - ref(0)): MultiBench's effective robustness against a reference curve."""
    f = np.asarray(values, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    return float(np.sum(f - (ref + f[0] - ref[0])))


def _load(run_dir: Path, device: str | None) -> tuple[Any, dict[str, Any], Any, torch.Tensor, list[float] | None]:
    """The run's head, config, its data (the test split of the run's fold) and its logit offsets."""
    from mmcache.heads.data import load_cached
    from mmcache.heads.train import load_run, run_offsets
    from mmcache.utils import pick_device

    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise MMCacheError(f"{cfg_path} not found; is {run_dir} a run folder written by `heads train`?")
    cfg = json.loads(cfg_path.read_text())
    if "encoders" in cfg:
        raise MMCacheError(f"{run_dir} is a `finetune run`: its head reads live encoders, not stores. Extract its "
                           f"features (mmcache extract ... --image finetuned:{run_dir}), train a head on them with "
                           "`heads train`, and run `heads robustness` on that run")
    if "modalities" not in cfg or "cache_dir" not in cfg:
        raise MMCacheError(f"{run_dir} is not a `heads train` run folder (no stores in its config.json)")
    dev = pick_device(device)
    head, cfg = load_run(run_dir, dev)
    labels = cfg["resolved"]["labels"]["tasks"]
    data = load_cached(cfg["dataset"], cfg["modalities"], cfg["cache_dir"], keys=getattr(type(head), "uses", None),
                       tasks=list(labels), device=dev, seed=cfg["seed"], val_fraction=cfg.get("val_fraction", 0.1),
                       quiet=True)
    if cfg.get("folds") and cfg.get("fold") is not None:
        data = data.for_fold(cfg["fold"], cfg["folds"])
    for tag, h in cfg["resolved"].get("stores", {}).items():
        if data.specs.get(tag) and h and data.specs[tag] != h:
            raise MMCacheError(f"store {tag} was rebuilt with another spec since the run was trained on it; "
                               "restore the store or train the head again")
    task = cfg["resolved"]["select"]["task"]
    test = data.split_index.get("test")
    if test is None or not bool((data.targets[task][test] >= 0).any()):
        raise MMCacheError(f"{cfg['dataset']!r} has no labelled test row of task {task!r}: robustness is measured on "
                           "the test split")
    return head, cfg, data, test[data.targets[task][test] >= 0], run_offsets(cfg).get(task)


def _batches(data: Any, idx: torch.Tensor) -> Iterator[tuple[int, Features]]:
    for k, s in enumerate(range(0, len(idx), BATCH)):
        yield k, data.batch(idx[s:s + BATCH])


def _array_std(data: Any, idx: torch.Tensor) -> dict[tuple[str, str], float]:
    """Standard deviation of every float array over the rows `idx` (all its values), in batches."""
    acc: dict[tuple[str, str], list[float]] = {}
    for _, feats in _batches(data, idx):
        for m, d in feats.items():
            for k, v in d.items():
                if not v.is_floating_point():
                    continue
                x = v.double()
                if k == "tokens" and "mask" in d:
                    x = x[d["mask"].bool()]
                x = x[torch.isfinite(x)]
                a = acc.setdefault((m, k), [0.0, 0.0, 0.0])
                a[0] += float(x.numel())
                a[1] += float(x.sum())
                a[2] += float((x * x).sum())
    out = {}
    for key, (n, s, ss) in acc.items():
        out[key] = float(np.sqrt(max(ss / n - (s / n) ** 2, 0.0))) if n else 0.0
    return out


def evaluate(head: Any, data: Any, idx: torch.Tensor, task: str, offsets: list[float] | None,
             perturb: Perturb | None = None) -> dict[str, Any]:
    """classification_metrics of `task` on rows `idx`, each batch's features through `perturb` first."""
    outs = []
    head.eval()
    with torch.no_grad():
        for k, feats in _batches(data, idx):
            if perturb is not None:
                feats = perturb(feats, k)
            outs.append(head(feats)[task].float().cpu())
    logits = torch.cat(outs).numpy().astype(np.float64)
    if offsets:
        logits = logits - np.asarray(offsets)[None, :]
    return classification_metrics(data.targets[task][idx].cpu().numpy(), logits, data.labels.tasks[task])


def _drop(modality: str) -> Perturb:
    return lambda feats, k: {m: d for m, d in feats.items() if m != modality}


def _noise(level: float, std: dict[tuple[str, str], float], seed: int, li: int) -> Perturb:
    def f(feats: Features, k: int) -> Features:
        g = torch.Generator().manual_seed(seed * 1_000_003 + li * 1009 + k)
        out: Features = {}
        for m, d in feats.items():
            out[m] = {}
            for key, v in d.items():
                if v.is_floating_point() and level > 0:
                    eps = torch.randn(v.shape, generator=g, dtype=torch.float32).to(v.device, v.dtype)
                    v = v + level * std.get((m, key), 0.0) * eps
                out[m][key] = v
        return out
    return f


def _token_dropout(level: float, seed: int, li: int) -> Perturb:
    def f(feats: Features, k: int) -> Features:
        g = torch.Generator().manual_seed(seed * 1_000_003 + li * 1009 + k + 7)
        out: Features = {}
        for m, d in feats.items():
            d = dict(d)
            if "mask" in d and "tokens" in d:
                keep = torch.rand(d["mask"].shape, generator=g).to(d["mask"].device) >= level
                d["mask"] = d["mask"].bool() & keep
            out[m] = d
        return out
    return f


def robustness(run_dir: Path | str, levels: list[float] | None = None, kinds: list[str] | None = None,
               reference: Path | str | None = None, seed: int = 0, device: str | None = None,
               write: bool = True) -> dict[str, Any]:
    """Evaluate run `run_dir` under every condition; write robustness.{csv,md,json,png} in it (`write`) and return
    `{"metric", "rows", "summary"}`. `reference`: another run evaluated under the same perturbations, for effective
    robustness."""
    run = Path(run_dir)
    levels = sorted(set(levels if levels is not None else LEVELS))
    if not levels or any(not 0 <= x <= 1 for x in levels) or 0 not in levels:
        raise MMCacheError(f"--levels must be numbers from 0 to 1 including 0 (the clean point), got {levels}")
    asked = kinds is not None
    kinds = list(kinds or KINDS)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise MMCacheError(f"--kinds: unknown {unknown}; choose from {', '.join(KINDS)}")
    head, cfg, data, idx, offsets = _load(run, device)
    task = cfg["resolved"]["select"]["task"]
    metric = boot_metric(cfg["resolved"]["select"]["metric"])
    from mmcache.heads.linear import select_modalities

    hp = head.hparams
    used = list(getattr(head, "mods", None) or select_modalities(list(head.inputs), hp.get("modalities"),
                                                                  hp.get("ablation", 0) or 0))
    reads_tokens = getattr(type(head), "uses", None) is None or "tokens" in (getattr(type(head), "uses", None) or ())
    has_tokens = any("tokens" in data.inputs[m] and "mask" in data.inputs[m] for m in used)
    notes = []
    if "missing" in kinds and len(used) < 2:
        notes.append(f"missing: the head uses one modality ({used[0]}), nothing to leave out")
        kinds.remove("missing")
    if "token_dropout" in kinds and not (reads_tokens and has_tokens):
        notes.append("token_dropout: " + ("the head reads pooled features only" if not reads_tokens
                                          else "no store of the run holds tokens"))
        kinds.remove("token_dropout")
    if asked and not kinds:
        raise MMCacheError(f"heads robustness: nothing to evaluate for {run}: {'; '.join(notes)}")

    def row(condition: str, kind: str, level: float | None, m: dict[str, Any], modality: str | None = None
            ) -> dict[str, Any]:
        r: dict[str, Any] = {"condition": condition, "kind": kind, "level": level, "modality": modality,
                             "n": m["n"]}
        for k in ("accuracy", "macro_f1", "auroc"):
            r[k] = m.get(k)
        r[metric] = m.get(metric)
        return r

    def curves_of(h: Any, d: Any, ix: torch.Tensor, off: list[float] | None) -> dict[str, list[dict[str, Any]]]:
        std = _array_std(d, ix) if "noise" in kinds else {}
        out: dict[str, list[dict[str, Any]]] = {}
        clean = evaluate(h, d, ix, task, off)
        out["clean"] = [row("clean", "clean", 0.0, clean)]
        for kind in ("noise", "token_dropout"):
            if kind not in kinds:
                continue
            rs = []
            for li, lev in enumerate(levels):
                if lev == 0:
                    m = clean
                else:
                    p = _noise(lev, std, seed, li) if kind == "noise" else _token_dropout(lev, seed, li)
                    m = evaluate(h, d, ix, task, off, p)
                rs.append(row(f"{kind}@{lev:g}", kind, lev, m))
            out[kind] = rs
        if "missing" in kinds:
            out["missing"] = [row(f"missing:{mod}", "missing", None, evaluate(h, d, ix, task, off, _drop(mod)), mod)
                              for mod in used]
        return out

    mine = curves_of(head, data, idx, offsets)
    summary: dict[str, Any] = {"metric": metric, "task": task, "clean": mine["clean"][0][metric], "levels": levels,
                               "seed": seed, "notes": notes}
    ref_curves = None
    if reference is not None:
        rhead, rcfg, rdata, ridx, roff = _load(Path(reference), device)
        if rcfg["dataset"] != cfg["dataset"] or rcfg["resolved"]["select"]["task"] != task:
            raise MMCacheError(f"--reference {reference} was trained on {rcfg['dataset']!r} task "
                               f"{rcfg['resolved']['select']['task']!r}; give a run of {cfg['dataset']!r} task {task!r}")
        ref_curves = curves_of(rhead, rdata, ridx, roff)
        summary["reference"] = str(reference)
    for kind in ("noise", "token_dropout"):
        if kind not in mine:
            continue
        vals = [r[metric] for r in mine[kind]]
        if any(v is None for v in vals):
            continue
        entry = {"relative": relative_robustness(levels, vals)}
        if ref_curves is not None and kind in ref_curves:
            rv = [r[metric] for r in ref_curves[kind]]
            if all(v is not None for v in rv):
                entry["effective"] = effective_robustness(vals, rv)
                entry["reference_relative"] = relative_robustness(levels, rv)
        summary[kind] = entry
    if "missing" in mine:
        summary["missing"] = {r["modality"]: r[metric] for r in mine["missing"]}
    rows = [r for rs in mine.values() for r in rs]
    result = {"run": str(run), "metric": metric, "rows": rows, "summary": summary}
    if write:
        write_files(run, result)
    return result


def table(result: dict[str, Any], fmt: str = "text") -> str:
    """The conditions as a table: the selection metric (and accuracy, macro F1) and the change from clean."""
    from mmcache.tables import render

    metric = result["metric"]
    clean = result["summary"]["clean"]
    cols = ["condition", metric, "vs_clean", *(k for k in ("accuracy", "macro_f1") if k != metric), "n"]
    body = []
    for r in result["rows"]:
        v = r[metric]
        body.append([r["condition"], "-" if v is None else f"{v:.4f}",
                     "-" if v is None or clean is None else f"{v - clean:+.4f}",
                     *("-" if r.get(k) is None else f"{r[k]:.4f}" for k in cols[3:-1]), r["n"]])
    lines = [render(cols, body, fmt, right=cols[1:])]
    s = result["summary"]
    for kind in ("noise", "token_dropout"):
        if kind in s:
            e = s[kind]
            text = f"{kind}: relative robustness {e['relative']:.4f}"
            if "effective" in e:
                text += f", effective robustness {e['effective']:+.4f} (reference relative {e['reference_relative']:.4f})"
            lines.append(text)
    lines += [f"skipped {n}" for n in s.get("notes", [])]
    return "\n".join(lines) if fmt != "md" else "\n\n".join(lines)


def write_files(run: Path, result: dict[str, Any]) -> list[Path]:
    import csv
    import io

    from mmcache.utils import atomic_write_text, write_json

    buf = io.StringIO()
    cols = list(dict.fromkeys(k for r in result["rows"] for k in r))
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerows(result["rows"])
    atomic_write_text(run / "robustness.csv", buf.getvalue())
    atomic_write_text(run / "robustness.md", table(result, "md") + "\n")
    write_json(run / "robustness.json", result)
    from mmcache.plots import plot_robustness

    plot_robustness(result, run / "robustness.png")
    return [run / f"robustness.{x}" for x in ("csv", "md", "json", "png")]
