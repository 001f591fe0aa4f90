"""Several datasets as one: `mmhs150k,fakeddit` with a label map onto one label space.

Each named dataset is loaded by its own adapter, from its own folder:

- `root` None: `data/<name>/` for each;
- a folder: `<folder>/<name>/` for each;
- `NAME=PATH,NAME=PATH`: that folder for each named dataset (the others: `data/<name>/`).

Ids become `<source>/<id>` (they never collide), every sample records its `source`, and each
source keeps its own splits. The label map (a JSON file or dict) sends each source's class names
to one class of the combined task `label`:

    {"mmhs150k": {"NotHate": "not_hate", "Racist": "hate", ...},
     "fakeddit": {"true": "true", "satire_parody": "satire_parody", ..., "misleading_content": null}}

The mapped task of a source is its first task (primary first) whose class names hold every key of
its map (case-insensitive). A class mapped to null drops its rows (counted); a label that the map
lacks is an error naming the map file, the source, the label and a row; rows without a label in
that task are left out (counted). The combined classes are the map's targets in first-seen order.

Options `SOURCE.KEY=VALUE` go to that source's adapter, options without a prefix to every source.
`epoch_pool` repeats a source's training rows K times (`--upsample NAME=K`).
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from mmcache.data.base import DATASETS, Dataset, LabelSpace, Sample, check_name, default_root, load_dataset
from mmcache.data.io import decode_bytes, parse_json
from mmcache.errors import MMCacheError

SEP = "/"  # between the source name and the source's own id
TASK = "label"  # the combined task


def is_combined(name: str) -> bool:
    """Whether a dataset name names several datasets (`mmhs150k,fakeddit`)."""
    return "," in name


def source_names(name: str) -> list[str]:
    """The dataset names of `a,b,...`, checked: known, each once."""
    names = [n.strip() for n in name.split(",")]
    if any(not n for n in names):
        raise MMCacheError(f"--dataset {name!r}: an empty name between commas; write e.g. mmhs150k,fakeddit")
    dup = [n for n, k in Counter(names).items() if k > 1]
    if dup:
        raise MMCacheError(f"--dataset {name!r} names {dup[0]!r} twice; name each dataset once")
    for n in names:
        DATASETS.canonical(n)  # an unknown name: the registry's "unknown dataset; known: ..." error
        check_name(n)
    return names


def combined_name(name: str) -> str:
    """The folder name (cache/<name>/, runs/<name>/) of `a,b`: `a-b`; a single name stays as it is."""
    return "-".join(source_names(name)) if is_combined(name) else name


def source_roots(names: Sequence[str], root: Path | str | None) -> dict[str, Path]:
    """Each source's folder: `data/<name>`, `<root>/<name>`, or as named by `NAME=PATH,NAME=PATH`."""
    if root is None:
        return {n: default_root(n) for n in names}
    text = str(root)
    if "=" not in text:
        return {n: Path(text) / n for n in names}
    out = {n: default_root(n) for n in names}
    for item in text.split(","):
        key, sep, path = item.partition("=")
        key, path = key.strip(), path.strip()
        if not sep or not key or not path:
            raise MMCacheError(f"--data-dir {text!r}: {item!r} is not NAME=PATH; write e.g. "
                               "mmhs150k=/data/MMHS150K,fakeddit=/data/fakeddit, or one folder holding each dataset's")
        if key not in out:
            raise MMCacheError(f"--data-dir {text!r}: {key!r} is none of the datasets {', '.join(names)}")
        out[key] = Path(path)
    return out


def source_options(names: Sequence[str], options: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """`SOURCE.KEY` options to that source only; options without a known prefix to every source."""
    out: dict[str, dict[str, Any]] = {n: {} for n in names}
    for key, value in options.items():
        src, dot, sub = key.partition(".")
        if dot and src in out:
            out[src][sub] = value
        else:
            for n in names:
                out[n].setdefault(key, value)
    return out


def read_label_map(label_map: str | Path | Mapping[str, Any]) -> tuple[dict[str, dict[str, str | None]], str]:
    """The label map (a JSON file, or the dict itself) checked: source -> {class: target or null}; and its name
    for messages."""
    if isinstance(label_map, Mapping):
        obj: Any = label_map
        where = "the label map"
    else:
        path = Path(label_map)
        where = str(path)
        if not path.is_file():
            raise MMCacheError(f"label map {path} not found; write a JSON file {{source: {{class: target}}}} "
                               "(see docs/howto/several-datasets.md)")
        obj = parse_json(decode_bytes(path.read_bytes()), path)
    if not isinstance(obj, Mapping):
        raise MMCacheError(f"{where}: expected a JSON object {{source: {{class: target}}}}")
    out: dict[str, dict[str, str | None]] = {}
    for src, m in obj.items():
        if not isinstance(m, Mapping):
            raise MMCacheError(f"{where}: the entry of {src!r} must be an object {{class: target or null}}")
        for k, v in m.items():
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise MMCacheError(f"{where}: {src!r} maps {k!r} to {v!r}; a target is a class name or null (drop)")
        out[str(src)] = {str(k): (None if v is None else v.strip()) for k, v in m.items()}
    return out, where


def _fold(name: str) -> str:
    return name.casefold().strip()


def mapped_task(ds: Dataset, keys: Sequence[str], where: str, source: str) -> str:
    """The first task of `ds` whose classes hold every key of its map (case-insensitive)."""
    want = {_fold(k) for k in keys}
    for task, names in ds.labels.tasks.items():
        if want <= {_fold(n) for n in names}:
            return task
    have = "; ".join(f"{t}: {', '.join(names)}" for t, names in ds.labels.tasks.items())
    best = max(ds.labels.tasks.values(), key=lambda names: len(want & {_fold(n) for n in names}))
    stray = sorted(k for k in keys if _fold(k) not in {_fold(n) for n in best})
    raise MMCacheError(f"{where}: {source!r} maps {', '.join(map(repr, stray[:5]))}, not classes of one task of "
                       f"{source} ({have}); use the class names of one task")


def load_combined(name: str, root: Path | str | None = None, *, label_map: str | Path | Mapping[str, Any] | None = None,
                  progress: bool = True, **options: Any) -> Dataset:
    """Load the datasets of `name` (`a,b`) and combine them through `label_map` (see the module docstring)."""
    names = source_names(name)
    if label_map is None:
        raise MMCacheError(f"--dataset {name}: several datasets need a label map onto one label space; pass "
                           "--label-map FILE (-o label_map=FILE), a JSON object {source: {class: target}}")
    lmap, where = read_label_map(label_map)
    roots = source_roots(names, root)
    opts = source_options(names, options)
    targets: list[str] = []
    samples: list[Sample] = []
    notes: list[str] = []
    metrics: list[str] = []
    loaded: list[tuple[str, Dataset, str, dict[str, str | None]]] = []
    for n in names:
        ds = load_dataset(n, roots[n], progress=progress, **opts[n])
        m = lmap.get(n) or lmap.get(DATASETS.canonical(n))
        if not m:
            raise MMCacheError(f"{where} has no entry for {n!r}; add \"{n}\": {{class: target, ...}} for the "
                               f"classes of one of its tasks ({', '.join(ds.labels.tasks)})")
        task = mapped_task(ds, list(m), where, n)
        folded = {_fold(k): v for k, v in m.items()}
        for v in m.values():
            if v is not None and v not in targets:
                targets.append(v)
        loaded.append((n, ds, task, folded))
        metrics.append(ds.labels.metric)
    for n, ds, task, folded in loaded:
        classes = ds.labels.tasks[task]
        dropped: Counter[str] = Counter()
        unlabelled = 0
        for s in ds.samples:
            idx = s.labels.get(task)
            if idx is None:
                unlabelled += 1
                continue
            cls = classes[idx]
            key = _fold(cls)
            if key not in folded:
                raise MMCacheError(f"{where}: {n} label {cls!r} (task {task}, row {s.id!r} of {ds.root}, split "
                                   f"{s.split}) is not in the map of {n!r}; map it to a class, or to null to drop "
                                   "its rows")
            target = folded[key]
            if target is None:
                dropped[cls] += 1
                continue
            samples.append(replace(s, id=f"{n}{SEP}{s.id}", labels={TASK: targets.index(target)}, source=n))
        kept = sum(1 for s in samples if s.source == n)
        line = f"{n}: {kept} rows, task {task!r} mapped"
        if dropped:
            line += f"; {sum(dropped.values())} rows mapped to null dropped ({', '.join(f'{k} {v}' for k, v in dropped.items())})"
        if unlabelled:
            line += f"; {unlabelled} rows without a {task!r} label left out"
        notes.append(line)
        notes += [f"{n}: {note}" for note in ds.notes]
        if progress and (dropped or unlabelled):
            print(f"note: {line}", file=sys.stderr)
    if not targets:
        raise MMCacheError(f"{where}: every class is mapped to null; map some to a target class")
    metric = metrics[0] if len(set(metrics)) == 1 else "macro_f1"
    folds = {ds.fold for _, ds, _, _ in loaded}
    seeds = {ds.seed for _, ds, _, _ in loaded}
    base = Path(os.path.commonpath([str(Path(r).resolve()) for r in roots.values()]))
    return Dataset(name=combined_name(name), samples=samples, labels=LabelSpace({TASK: targets}, metric=metric),
                   root=base, notes=notes,
                   fold=folds.pop() if len(folds) == 1 else None, seed=seeds.pop() if len(seeds) == 1 else None)


def sources(samples: Sequence[Sample]) -> list[str]:
    """The source datasets of `samples`, in first-seen order (empty for a single dataset)."""
    return list(dict.fromkeys(s.source for s in samples if s.source is not None))


# An epoch holds K copies of a source's rows: past this, a typo (mmhs150k=20000) would exhaust memory, not train.
MAX_UPSAMPLE = 1000


def parse_upsample(items: Sequence[str] | str | None) -> dict[str, int]:
    """`NAME=K` (repeatable or comma-separated) -> {source: K}; K a whole number from 1 to `MAX_UPSAMPLE`."""
    out: dict[str, int] = {}
    for item in [items] if isinstance(items, str) else items or []:
        for part in item.split(","):
            key, sep, value = part.partition("=")
            key = key.strip()
            try:
                k = int(value.strip())
            except ValueError:
                k = 0
            if not sep or not key or not 1 <= k <= MAX_UPSAMPLE:
                raise MMCacheError(f"--upsample {part!r}: write NAME=K with K a whole number from 1 to {MAX_UPSAMPLE}, "
                                   "e.g. mmhs150k=2")
            if key in out:
                raise MMCacheError(f"--upsample names {key!r} twice; give it once")
            out[key] = k
    return out


def check_upsample_sources(upsample: Mapping[str, int], known: Sequence[str], of: str = "this run",
                           several: str = "a run over several (--dataset a,b)") -> None:
    """Refuse an `--upsample` name that is not one of the `known` source datasets (of `of`), listing them; with
    no source at all, say upsampling needs `several` datasets."""
    unknown = [n for n in upsample if n not in known]
    if unknown:
        raise MMCacheError(f"--upsample {unknown[0]}: not a source dataset of {of}"
                           + (f"; its sources are {', '.join(known)}" if known else
                              f"; upsampling weights the datasets of {several}"))


def epoch_pool(samples: Sequence[Sample], upsample: Mapping[str, int]) -> list[Sample]:
    """The training rows one epoch draws from: each row of source NAME `upsample[NAME]` times (others once), in
    dataset order; an epoch's order is a permutation of this pool."""
    if not upsample:
        return list(samples)
    check_upsample_sources(upsample, sources(samples))
    for n, k in upsample.items():
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_UPSAMPLE:
            raise MMCacheError(f"--upsample {n}={k!r}: K must be a whole number from 1 to {MAX_UPSAMPLE}")
    return [s for s in samples for _ in range(upsample.get(s.source or "", 1))]
