"""Contract 1: datasets in their native layouts become `Sample` records plus a `LabelSpace`."""

from __future__ import annotations

import inspect
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mmcache.errors import MMCacheError
from mmcache.registry import Registry

SPLITS = ("train", "val", "test")
# Feature stores keep ids as exact UTF-8 bytes in fixed-width slots; longer ids would bloat every slot.
MAX_ID_BYTES = 1024


def id_problem(sid: object) -> str | None:
    """Why `sid` cannot be a sample id, or None when it can (non-empty text, no NUL, valid Unicode, short)."""
    if not isinstance(sid, str):
        return f"is of type {type(sid).__name__}, not text"
    if not sid:
        return "is empty"
    if "\0" in sid:
        return "contains a NUL character"
    try:
        n = len(sid.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid Unicode (undecodable bytes in the source file?)"
    if n > MAX_ID_BYTES:
        return f"is {n} bytes long in UTF-8, over the {MAX_ID_BYTES}-byte limit"
    return None


@dataclass(frozen=True)
class Sample:
    """One example: paths to its raw media (never pixels), its text and its labels.

    `labels` maps a task name to a class index in the dataset's `LabelSpace`; an
    unlabeled sample (e.g. a hidden test split) has an empty dict.
    """

    id: str
    split: str
    text: str | None = None
    image: str | None = None
    video: str | None = None
    audio: str | None = None
    entity: str | None = None
    context: str | None = None
    labels: dict[str, int] = field(default_factory=dict)
    source: str | None = None  # the dataset a sample comes from, in a run over several (`mmhs150k,fakeddit`)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict of the sample."""
        return asdict(self)


@dataclass
class LabelSpace:
    """Task name -> ordered class names; the first task is the primary one."""

    tasks: dict[str, list[str]]
    metric: str = "accuracy"  # primary selection metric for this dataset (e.g. "auroc")

    @property
    def primary(self) -> str:
        """The task reported first and used for model selection by default."""
        return next(iter(self.tasks))

    def num_classes(self, task: str | None = None) -> int:
        """Number of classes of `task` (default: the primary task)."""
        return len(self.tasks[task or self.primary])

    def index(self, task: str, name: str, where: str = "") -> int:
        """Class index of `name` in `task`; a clear error names `where` it came from."""
        names = self.tasks.get(task)
        if names is None:
            raise MMCacheError(f"{where}unknown task {task!r}; tasks are {list(self.tasks)}")
        try:
            return names.index(str(name))
        except ValueError:
            raise MMCacheError(
                f"{where}label {name!r} is not in the label space of task {task!r} {names}; "
                "fix the row or the label list"
            ) from None

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (inverse of `from_json`)."""
        return {"tasks": self.tasks, "metric": self.metric}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> LabelSpace:
        """Rebuild from `to_json` output."""
        return cls(tasks={k: list(v) for k, v in obj["tasks"].items()}, metric=obj.get("metric", "accuracy"))


@dataclass
class Dataset:
    """The samples of a dataset, its label space, and where it lives on disk."""

    name: str
    samples: list[Sample]
    labels: LabelSpace
    root: Path
    # What the adapter dropped or assumed, one line each (printed by `mmcache data show`).
    notes: list[str] = field(default_factory=list)
    # How generated splits were drawn (None where the dataset has its own): recorded in the manifest.
    fold: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        for row, s in enumerate(self.samples):
            why = id_problem(s.id)
            if why is not None:
                raise MMCacheError(f"dataset {self.name!r} at {self.root}: sample {row} has id {s.id!r:.80} which "
                                   f"{why}; fix the id in the source (feature stores must keep ids exactly)")
        dup = [k for k, n in Counter(s.id for s in self.samples).items() if n > 1]
        if dup:
            raise MMCacheError(
                f"dataset {self.name!r} at {self.root}: duplicate sample ids {dup[:5]}"
                f"{' ...' if len(dup) > 5 else ''}; ids must be unique"
            )

    def split(self, name: str) -> list[Sample]:
        """The samples of one split, in dataset order."""
        return [s for s in self.samples if s.split == name]

    def ids(self, split: str | None = None) -> list[str]:
        """Sample ids, of one split or all."""
        return [s.id for s in self.samples if split is None or s.split == split]

    @property
    def splits(self) -> list[str]:
        """Split names present, in first-seen order."""
        return list(dict.fromkeys(s.split for s in self.samples))

    def by_id(self) -> dict[str, Sample]:
        """Index of samples by id."""
        return {s.id: s for s in self.samples}

    def counts(self) -> dict[str, dict[str, dict[str, int]]]:
        """split -> task -> class name -> count (for `mmcache data show`)."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        for sp in self.splits:
            out[sp] = {}
            for task, names in self.labels.tasks.items():
                c = Counter(s.labels[task] for s in self.split(sp) if task in s.labels)
                out[sp][task] = {n: c.get(i, 0) for i, n in enumerate(names)}
        return out

    def write_manifest(self, path: Path) -> None:
        """Write the manifest of this dataset (ids, splits, labels, fold/seed; see `mmcache.manifest`), atomically."""
        from mmcache.manifest import Manifest

        Manifest.from_dataset(self).write(path)


Adapter = Callable[..., Dataset]


def _import_adapters() -> None:
    # Adapters register themselves on import; importing the package imports them all.
    import mmcache.data  # noqa: F401


DATASETS: Registry[Adapter] = Registry("dataset", _import_adapters)
ALIASES = DATASETS.aliases  # alias -> dataset name
DATASET_OPTIONS: dict[str, list[str]] = {}  # dataset -> the `-o KEY=VALUE` options its adapter takes
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def adapter_options(fn: Callable[..., Any], exclude: Iterable[str] = ()) -> list[str]:
    """The keyword options of an adapter function: its parameters after `root`, less `exclude`."""
    params = list(inspect.signature(fn).parameters.values())[1:]
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in kinds and p.name not in set(exclude)]


def register_dataset(name: str, *aliases: str, options: Iterable[str] | None = None) -> Callable[[Adapter], Adapter]:
    """Decorator: register an adapter `fn(root: Path, **options) -> Dataset` under `name`.

    `options` are the option names it takes (default: its signature's parameters after `root`);
    `load_dataset` refuses any other.
    """

    def deco(fn: Adapter) -> Adapter:
        DATASET_OPTIONS[name] = list(options) if options is not None else adapter_options(fn)
        return DATASETS.add(name, fn, *aliases)

    return deco


def dataset_names() -> list[str]:
    """All registered dataset names and aliases, sorted."""
    return DATASETS.names(aliases=True)


def default_root(name: str, data_dir: Path | str = "data") -> Path:
    """Where `name` is looked for by default: `data/<name>/`."""
    return Path(data_dir) / name


def load_dataset(name: str, root: Path | str | None = None, /, *, as_name: str | None = None,
                 progress: bool = True, **options: Any) -> Dataset:
    """Load dataset `name` from `root` (default `data/<name>`) through its registered adapter.

    `options` go to the adapter (None values count as not given; unknown ones are refused). The
    dataset's name keys its cache and run folders: `as_name`, else the adapter's (a table's file or
    folder name), else the name as typed. `progress=False` hides the adapter's progress bars.
    Several names `a,b` with option `label_map` load one combined dataset (`mmcache.data.combined`).
    """
    from mmcache.data.io import show_progress

    options = {k: v for k, v in options.items() if v is not None}
    if "," in name:  # several datasets through a label map: mmcache.data.combined
        from mmcache.data.combined import load_combined

        ds = load_combined(name, root, progress=progress, **options)
        if as_name is not None:
            check_name(as_name)
            ds.name = as_name
        return ds
    canonical = DATASETS.canonical(name)
    if "label_map" in options:
        raise MMCacheError(f"a label map maps the labels of several datasets onto one label space; name them "
                           f"together, e.g. --dataset {name},OTHER, or drop the label map")
    check_options(name, options, DATASET_OPTIONS[canonical])
    if as_name is not None:
        check_name(as_name)
    root = Path(root) if root is not None else default_root(name)
    if not root.exists():
        raise MMCacheError(
            f"dataset folder {root} does not exist; put {name!r} there in its official layout "
            "or pass --data-dir"
        )
    with show_progress(progress):
        ds = DATASETS.get(canonical)(root, **options)
    if as_name is not None:
        ds.name = as_name
    elif name != canonical and ds.name == canonical:
        # Caches and runs are keyed by the name as typed (`mvsa` -> cache/mvsa/), as every CLI does.
        ds.name = name
    check_name(ds.name)
    check_label_space(ds)
    return ds


def check_options(dataset: str, options: dict[str, Any], takes: list[str]) -> None:
    """Refuse options an adapter does not take, listing those it does."""
    extra = sorted(k for k in options if k not in takes)
    if extra:
        hint = "; name the dataset with --name, not -o name=" if "name" in extra else ""
        raise MMCacheError(f"dataset {dataset!r} does not take option(s) {extra}{hint}; "
                           + (f"it takes: {', '.join(takes)}" if takes else "it takes no options"))


def check_name(name: str) -> None:
    """A dataset name is one folder name (cache/<name>/, runs/<name>/): letters, digits, `.`, `_`, `-`."""
    if not NAME_RE.fullmatch(name):
        raise MMCacheError(f"--name {name!r}: a dataset name names the folders cache/<name>/ and runs/<name>/; "
                           "use letters, digits, '.', '_' and '-' (not first)")


def default_name(root: Path, fallback: str) -> str:
    """A dataset name from a file's stem or a folder's name (other characters become `_`)."""
    stem = root.stem if root.is_file() else root.resolve().name
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")
    return name if NAME_RE.fullmatch(name) else fallback


def check_label_space(ds: Dataset) -> None:
    """A dataset needs at least one task, and every task at least one class."""
    if not ds.labels.tasks:
        raise MMCacheError(f"dataset {ds.name!r} at {ds.root}: no labels found, so there is nothing to train on; "
                           "see docs/howto/datasets.md for where each layout keeps its labels")
    empty = [t for t, names in ds.labels.tasks.items() if not names]
    if empty:
        raise MMCacheError(f"dataset {ds.name!r} at {ds.root}: task {empty[0]!r} has no classes; fill in its labels")


def check_unique(ids: Iterable[str], where: str) -> None:
    """Raise a clear error naming `where` if `ids` has duplicates."""
    dup = [k for k, n in Counter(ids).items() if n > 1]
    if dup:
        raise MMCacheError(f"{where}: duplicate ids {dup[:5]}; ids must be unique")
