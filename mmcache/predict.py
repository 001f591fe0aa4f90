"""Predictions of a trained run on new data: `mmcache predict`, `heads predict --data` and `Predictor`.

Both kinds of run predict the same way. A `heads train` run is rebuilt as the extractors of the
stores it was trained on (from the spec each store keeps; refused when the rebuilt extractor's spec
hash is not the one the run recorded, e.g. a weights file replaced since) plus its head; a
`finetune run` as its trained encoders (the `finetuned:RUN` preset) plus its head. From the command
line, new inputs (a table with or without labels, a folder of images, one image, or a registered
dataset's raw files) are extracted into a cache of the run's own (`<run>/predict_cache/`: resumable,
failures recorded) and the head predicts from those stores, with the features rounded to the dtype
the run was trained on. `Predictor.predict(rows)` does the same in memory, for serving.

Inputs that cannot be encoded are never dropped: they get an empty prediction and the reason.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mmcache.data.base import Dataset, LabelSpace, Sample
from mmcache.errors import MMCacheError

if TYPE_CHECKING:
    import torch

    from mmcache.extract.base import Extractor
    from mmcache.heads.base import Head

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
PREDICT_CACHE = "predict_cache"
HEAD_BATCH = 4096
CONSUMER_CHUNK = 16  # batches of stored rows read at once for an encoder that consumes them


@dataclass
class Prediction:
    """One input's prediction: the predicted class (`label`) and class probabilities (`probs`) of the run's
    primary task, every task's in `tasks` ({task: {"label", "probs"}}); `error` says why an input could not
    be encoded (then `label` is None and `probs` empty)."""

    id: str
    label: str | None
    probs: dict[str, float]
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None
    error_kind: str | None = None  # `error` with the input's paths and numbers taken out (counted in summaries)


def _spec_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [k for k in sorted(set(a) | set(b))
            if json.dumps(a.get(k), sort_keys=True, default=str) != json.dumps(b.get(k), sort_keys=True, default=str)]


def extractor_from_spec(spec: dict[str, Any]) -> Extractor:
    """Rebuild the extractor a store spec describes: its preset with the spec's options (derived entries
    such as `weights_sha256` are recomputed, so a replaced weights file shows as another spec)."""
    from mmcache.extract.base import FAMILIES, build_extractor

    family, preset, modality = spec.get("family"), spec.get("preset"), spec.get("modality")
    if not family or not preset or not modality or family not in FAMILIES:
        raise MMCacheError(f"cannot rebuild an extractor from spec {json.dumps(spec)[:200]}: it names no known "
                           "family, preset and modality")
    options = FAMILIES[family].options
    overrides = {k: v for k, v in spec.items()
                 if k not in ("preset", "family", "modality") and (options is None or k in options)}
    return build_extractor(str(preset), str(modality), **overrides)


def _rebuild(spec: dict[str, Any], where: str) -> Extractor:
    """`extractor_from_spec` after its local paths are checked (`check_spec_paths`); a failure of the rebuild is one
    line naming `where`."""
    from mmcache.runfolder import check_spec_paths

    check_spec_paths(spec, where)
    try:
        return extractor_from_spec(spec)
    except MMCacheError as e:
        raise MMCacheError(f"{where}: {e}") from None
    except Exception as e:  # a spec no user could have given (a value of the wrong type, a file of another kind)
        raise MMCacheError(f"{where}: cannot rebuild the extractor ({type(e).__name__}: "
                           f"{' '.join(str(e).split())[:160]}); restore the run folder as it was written") from None


def _store_extractor(config: dict[str, Any], modality: str, name: str, cache_dir: str | None) -> tuple[Extractor, str]:
    """The extractor of store `modality/name` a run was trained on (a `heads train` run's, or a hybrid
    `finetune run`'s stored modality), and the store's dtype."""
    from mmcache.cache.store import StoreReader, store_path

    want = config.get("resolved", {}).get("stores", {}).get(f"{modality}/{name}")
    kept = config.get("resolved", {}).get("store_specs", {}).get(f"{modality}/{name}")
    if kept and cache_dir is None:
        # The run recorded its stores' specs: the extractor is rebuilt without the training stores.
        where = f"config.json: resolved.store_specs.{modality}/{name}"
        if not isinstance(kept, dict) or not isinstance(kept.get("spec"), dict):
            raise MMCacheError(f"{where}: must be an object holding the store's spec")
        ext = _rebuild(kept["spec"], where)
        if want and ext.spec_hash() != want:
            diff = _spec_diff(kept["spec"], ext.spec)
            raise MMCacheError(f"{modality}/{name}: the extractor rebuilt from the run's record has spec hash "
                               f"{ext.spec_hash()}, the run was trained on {want} ({', '.join(diff) or 'spec'} changed, "
                               "e.g. a weights file replaced); restore the files the run was trained with, or train again")
        return ext, str(kept.get("dtype", "float32"))
    root = cache_dir or config.get("cache_dir", "cache")
    path = store_path(root, config["dataset"], modality, name)
    if not path.exists():
        raise MMCacheError(f"{path} not found: predicting rebuilds the extractor of each store the run was trained "
                           "on from the spec kept in that store; pass --run-cache-dir where the run's stores are")
    reader = StoreReader(path)
    have = str(reader.attrs.get("spec_hash", ""))
    if want and have != want:
        raise MMCacheError(f"{path} was rebuilt with another spec ({have}) since the run was trained on it ({want}); "
                           "the extractor the run needs is unknown: train the head again on this store")
    ext = _rebuild(reader.spec, str(path))
    if want and ext.spec_hash() != want:
        diff = _spec_diff(reader.spec, ext.spec)
        raise MMCacheError(f"{modality}/{name}: the extractor rebuilt from {path} has spec hash {ext.spec_hash()}, the "
                           f"run was trained on {want} ({', '.join(diff) or 'spec'} changed, e.g. a weights file "
                           "replaced); restore the files the run was trained with, or train again")
    return ext, str(reader.attrs.get("dtype", "float32"))


def _as_sample(row: dict[str, Any] | Sample, i: int) -> Sample:
    if isinstance(row, Sample):
        return row
    if not isinstance(row, dict):
        raise MMCacheError(f"row {i}: expected a dict of fields (image, text, ...), got {type(row).__name__}")
    known = ("image", "text", "video", "audio", "context", "entity")
    unknown = [k for k in row if k not in (*known, "id")]
    if unknown:
        raise MMCacheError(f"row {i}: unknown field(s) {unknown}; a row holds id and any of {', '.join(known)}")
    values = {k: (None if row.get(k) is None else str(row[k])) for k in known}
    return Sample(id=str(row.get("id", i)), split="", **values)  # type: ignore[arg-type]


class Predictor:
    """A trained run ready to predict: its encoders (loaded once) and head.

    `Predictor.load(run).predict([{"image": "a.jpg", "text": "..."}])` -> one `Prediction` per row.
    """

    def __init__(self, run_dir: Path, config: dict[str, Any], head: Head, extractors: dict[str, Extractor],
                 names: dict[str, str], dtypes: dict[str, str], device: str) -> None:
        self.run_dir = run_dir
        self.config = config
        self.head = head
        self.extractors = extractors  # modality -> extractor
        self.names = names  # modality -> store name in the run
        self.dtypes = dtypes  # modality -> dtype of the features the head was trained on
        self.device = device
        space = LabelSpace.from_json(config["resolved"]["labels"])
        # The tasks the head predicts, with their class names (the run's label space may hold more tasks).
        self.label_space = LabelSpace({t: v for t, v in space.tasks.items() if t in head.tasks}, space.metric)
        self.labels: dict[str, list[str]] = dict(self.label_space.tasks)
        from mmcache.runfolder import run_offsets

        self.offsets = run_offsets(config)  # task -> tau * log(prior), subtracted from the logits

    @classmethod
    def load(cls, run: str | Path, device: str | None = None, run_cache_dir: str | None = None) -> Predictor:
        """Rebuild run folder `run` (a `heads train` or a `finetune run` folder) for prediction.
        `run_cache_dir`: where the run's stores are (a `heads train` run's, or a hybrid `finetune run`'s
        stored modalities; default: its `cache_dir`)."""
        from mmcache.extract.base import build_extractor
        from mmcache.runfolder import load_head
        from mmcache.utils import pick_device

        run_dir = Path(run)
        dev = pick_device(device)
        head, config = load_head(run_dir, dev)
        extractors: dict[str, Extractor] = {}
        names: dict[str, str] = {}
        dtypes: dict[str, str] = {}
        if isinstance(config.get("encoders"), dict):
            from mmcache.finetune.preset import load_finetuned_encoder  # (also registers the finetuned: preset)
            from mmcache.finetune.run import encoder_consumes

            for m, name in (config.get("stores") or {}).items():  # a hybrid run's stored modalities
                extractors[m], dtypes[m] = _store_extractor(config, m, name, run_cache_dir)
                names[m] = name
            for m, value in config["encoders"].items():
                if encoder_consumes(m, value):  # reads stored features while it encodes: fed by the stores' extractors
                    extractors[m] = load_finetuned_encoder(run_dir.absolute(), m, consumer=True)[0]
                else:
                    extractors[m] = build_extractor(f"finetuned:{run_dir.absolute()}", m)
                names[m], dtypes[m] = "finetuned", "float32"  # the head saw the live encoders' float32 outputs
        elif isinstance(config.get("modalities"), dict):
            for m, name in config["modalities"].items():
                extractors[m], dtypes[m] = _store_extractor(config, m, name, run_cache_dir)
                names[m] = name
        else:
            raise MMCacheError(f"{run_dir}/config.json names neither stores nor encoders; is it a run folder?")
        missing = [m for m in head.inputs if m not in extractors]
        if missing:
            raise MMCacheError(f"{run_dir}: the head reads {missing}, which the run names no store or encoder for")
        for ext in extractors.values():
            ext.eval().to(dev)
        return cls(run_dir, config, head, extractors, names, dtypes, dev)

    # ------------------------------------------------------------------ in memory

    def predict(self, rows: list[dict[str, Any]] | list[Sample] | list[Any], batch_size: int = 64) -> list[Prediction]:
        """Predict rows given as dicts (`image` path, `text`, ... and an optional `id`) or `Sample`s, in memory."""
        samples = [_as_sample(r, i) for i, r in enumerate(rows)]
        dup = [k for k, n in Counter(s.id for s in samples).items() if n > 1]
        if dup:
            raise MMCacheError(f"duplicate row ids {dup[:5]}; give each row its own id (or none: the row's position)")
        feats, failed = self._encode(samples, batch_size)
        return self._predict(samples, feats, failed)

    def _consumes(self, modality: str) -> dict[str, tuple[str, ...]]:
        """What the encoder of `modality` reads from other modalities' features while it encodes (VisualBERT: the
        image regions), as in training."""
        return dict(getattr(self.extractors[modality], "consumes", {}) or {})

    def _encode(self, samples: list[Sample], batch_size: int, mods: list[str] | None = None,
                given: dict[str, dict[str, dict[str, torch.Tensor]]] | None = None,
                ) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """Encode `samples` in memory with the extractors of `mods` (default: all): `({modality: {id: {array:
        tensor}}}, {id: reason})`. An encoder that consumes another modality's features gets that modality's rows,
        as the run's stores held them (rounded to their dtype): computed in the same batch, or taken from `given`."""
        import torch
        from torch.utils.data import DataLoader

        from mmcache.extract.runner import (
            BatchCollate,
            DecodeDataset,
            autocast,
            index_batch,
            merge_decode_options,
            to_device,
        )

        mods = list(self.extractors) if mods is None else mods
        exts = [self.extractors[m] for m in mods]
        consumed: dict[str, set[str]] = {}
        for m in mods:
            for cm, keys in self._consumes(m).items():
                consumed.setdefault(cm, set()).update(keys)
        keep = {m: set(self.head.inputs.get(m, {})) | consumed.get(m, set()) for m in mods}
        needs = [tuple(range(len(exts)))] * len(samples)
        loader = DataLoader(DecodeDataset(samples, needs, exts, merge_decode_options(exts)), batch_size=batch_size,
                            shuffle=False, num_workers=0, collate_fn=BatchCollate(exts))
        rows: dict[str, dict[str, dict[str, torch.Tensor]]] = {m: {} for m in mods}
        for m, got in (given or {}).items():
            rows.setdefault(m, {}).update(got)
        failed: dict[str, str] = {}
        dev = torch.device(self.device)
        # Encoders whose features others consume run first in each batch.
        order = sorted(range(len(mods)), key=lambda k: bool(self._consumes(mods[k])))
        with torch.inference_mode():
            for batch in loader:
                for k in order:
                    if k not in batch:
                        continue
                    ids, inputs, fails = batch[k]
                    m = mods[k]
                    for sid, reason in fails:
                        failed.setdefault(sid, f"{m}: {reason}")
                    if not ids:
                        continue
                    inputs = to_device(inputs, dev)
                    if self._consumes(m):
                        have = []
                        for j, sid in enumerate(ids):
                            lacking = [cm for cm in self._consumes(m) if sid not in rows.get(cm, {})]
                            if lacking:
                                failed.setdefault(sid, f"{lacking[0]}: not encoded")
                            else:
                                have.append(j)
                        if not have:
                            continue
                        if len(have) < len(ids):
                            inputs, ids = index_batch(inputs, torch.tensor(have)), [ids[j] for j in have]
                        inputs = {**inputs, "consumed": {
                            cm: {key: torch.stack([rows[cm][sid][key] for sid in ids]).to(dev) for key in want}
                            for cm, want in self._consumes(m).items()}}
                    with autocast(dev, True):  # as extraction runs it (bf16/fp16 on a GPU)
                        out = exts[k](inputs)
                    for j, sid in enumerate(ids):
                        rows[m][sid] = {key: self._as_trained(m, out[key][j]) for key in keep[m]}
        return {m: rows[m] for m in mods}, failed

    def _as_trained(self, modality: str, t: torch.Tensor) -> torch.Tensor:
        """A feature as the head saw it in training: rounded through the store's dtype, then float32."""
        import torch

        if not t.is_floating_point():
            return t
        return t.to(getattr(torch, self.dtypes[modality])).float()

    # ------------------------------------------------------------------ from features to predictions

    def _predict(self, samples: list[Sample], feats: dict[str, dict[str, Any]],
                 failed: dict[str, str]) -> list[Prediction]:
        """Predictions in sample order; `feats[modality][id]` holds each encoded row's arrays."""
        import torch

        from mmcache.engine import adjust_logits
        from mmcache.extract.runner import failure_kind
        from mmcache.runfolder import check_finite_outputs

        mods = list(self.head.inputs)
        ok = [s.id for s in samples if s.id not in failed and all(s.id in feats[m] for m in mods)]
        probs: dict[str, Any] = {}
        self.head.eval()
        with torch.inference_mode():
            for start in range(0, len(ok), HEAD_BATCH):
                chunk = ok[start:start + HEAD_BATCH]
                batch = {m: {k: torch.stack([feats[m][i][k] for i in chunk]).to(self.device)
                             for k in self.head.inputs[m]} for m in mods}
                logits = adjust_logits(self.head(batch), self.offsets)  # the run's logit adjustment, if any
                check_finite_outputs(logits, str(self.run_dir))  # as training refuses them
                for t in self.labels:
                    p = torch.softmax(logits[t].double(), dim=1).cpu().numpy()
                    probs.setdefault(t, []).extend(p)
        row = {sid: r for r, sid in enumerate(ok)}
        primary = next(iter(self.labels))
        out = []
        for s in samples:
            if s.id not in row:
                reason = failed.get(s.id) or "not encoded"
                out.append(Prediction(id=s.id, label=None, probs={}, error=reason,
                                      error_kind=failure_kind(reason, s)))
                continue
            tasks: dict[str, dict[str, Any]] = {}
            for t, names in self.labels.items():
                p = probs[t][row[s.id]]
                tasks[t] = {"label": names[int(p.argmax())], "probs": {n: float(v) for n, v in zip(names, p, strict=True)}}
            out.append(Prediction(id=s.id, label=tasks[primary]["label"], probs=tasks[primary]["probs"], tasks=tasks))
        return out

    # ------------------------------------------------------------------ through a cache

    def predict_dataset(self, ds: Dataset, samples: list[Sample], cache_dir: Path, batch_size: int = 64,
                        num_workers: int = 0, progress: bool = True) -> list[Prediction]:
        """Extract `samples` of `ds` into stores under `cache_dir` (resumable; failures recorded), then predict."""
        from mmcache.cache.store import StoreReader
        from mmcache.extract.runner import Request, extract

        for m, ext in self.extractors.items():
            fields = [f for f in ext.inputs if f in ("image", "text", "video", "audio", "context")]
            if samples and fields and all(getattr(s, f) is None for s in samples for f in fields):
                raise MMCacheError(f"the run reads {m} features ({self.names[m]}), but no row of {ds.root} has "
                                   f"{' or '.join(fields)}; give the rows that field")
        key = _content_key(samples)
        cache_ds = Dataset(name=f"{_safe(ds.name)}-{key}", samples=samples, labels=self.label_space, root=ds.root)
        # Encoders that consume other modalities' features run after those are in the cache, in memory.
        consumers = [m for m in self.extractors if self._consumes(m)]
        mods = [m for m in self.extractors if m not in consumers]
        requests = [Request(m, f"{self.names[m]}-{self.extractors[m].spec_hash()}", self.extractors[m].preset)
                    for m in mods]
        by_dtype: dict[str, list[int]] = {}
        for k, m in enumerate(mods):
            by_dtype.setdefault(self.dtypes[m] if self.dtypes[m] in ("float16", "float32") else "float32", []).append(k)
        summaries = {}
        for dtype, ks in by_dtype.items():
            for k, sm in zip(ks, extract(cache_ds, [requests[k] for k in ks], cache_dir=cache_dir, device=self.device,
                                         batch_size=batch_size, num_workers=num_workers, dtype=dtype,
                                         progress=progress, extractors=[self.extractors[mods[k]] for k in ks],
                                         force=True), strict=True):
                summaries[mods[k]] = sm
        feats: dict[str, dict[str, Any]] = {}
        failed: dict[str, str] = {}
        ids = [s.id for s in samples]
        readers = {m: StoreReader(summaries[m].path) for m in mods}
        for m, reader in readers.items():
            have = [i for i in ids if i in reader.index]
            for sid, reason in reader.failed.items():
                failed.setdefault(sid, f"{m}: {reason}")
            feats[m] = _rows(reader, have, list(self.head.inputs.get(m, {})))
        if consumers:
            todo = [s for s in samples if s.id not in failed]
            for start in range(0, len(todo), batch_size * CONSUMER_CHUNK):
                chunk = todo[start:start + batch_size * CONSUMER_CHUNK]
                given: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
                for m in consumers:
                    for cm, keys in self._consumes(m).items():
                        reader = readers[cm]
                        given.setdefault(cm, {}).update(_rows(reader, [s.id for s in chunk if s.id in reader.index],
                                                              list(keys)))
                got, fails = self._encode(chunk, batch_size, mods=consumers, given=given)
                for sid, reason in fails.items():
                    failed.setdefault(sid, reason)
                for m in consumers:
                    feats.setdefault(m, {}).update(got[m])
        return self._predict(samples, feats, failed)


def _rows(reader: Any, ids: list[str], keys: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Rows `ids` of a store as {id: {array: tensor}}, floats as float32 (as training read them)."""
    import torch

    arrays = reader.load(ids, keys=keys) if ids and keys else {}
    return {sid: {k: torch.from_numpy(a[r]).float() if a.dtype.kind == "f" else torch.from_numpy(a[r])
                  for k, a in arrays.items()} for r, sid in enumerate(ids)}


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name).strip("._-") or "data"


def _content_key(samples: list[Sample]) -> str:
    """A short hash of what the samples hold (ids, texts, media paths with their size and modification time),
    so the prediction cache never serves features of inputs that changed since."""
    h = hashlib.sha256()
    for s in samples:
        media = []
        for f in ("image", "video", "audio"):
            p = getattr(s, f)
            try:
                st = os.stat(p) if p else None
                media.append([p, st.st_size, st.st_mtime_ns] if st else p)
            except OSError:
                media.append([p, None])
        h.update(json.dumps([s.id, s.text, s.context, s.entity, media]).encode())
    return h.hexdigest()[:12]


def load_new_data(path: Path, label_space: LabelSpace) -> Dataset:
    """New inputs to predict on: a table (CSV/TSV/JSON/JSONL; labels optional), a folder holding one (or one per
    split), a folder of images (a same-named .txt beside an image is its text), or one image file."""
    from mmcache.data.base import default_name
    from mmcache.data.table import TABLE_SUFFIXES, find_tables, load_unlabelled_table

    if not path.exists():
        raise MMCacheError(f"{path} not found; pass a table (.csv/.tsv/.json/.jsonl), a folder of images or an image")
    name = default_name(path, "new")
    if path.is_file():
        if path.suffix.lower() in TABLE_SUFFIXES:
            return load_unlabelled_table(path, label_space, name=name)
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return Dataset(name=name, samples=[Sample(id=path.name, split="", image=str(path))], labels=label_space,
                           root=path)
        raise MMCacheError(f"{path}: not a table (.csv/.tsv/.json/.jsonl) nor an image ({', '.join(IMAGE_SUFFIXES)})")
    if any(p.is_file() and p.suffix.lower() in TABLE_SUFFIXES for p in path.iterdir()):
        find_tables(path)  # one table or one per split, else a clear error
        return load_unlabelled_table(path, label_space, name=name)
    images = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise MMCacheError(f"{path} holds no table and no image ({', '.join(IMAGE_SUFFIXES)}); nothing to predict")
    samples = []
    for p in images:
        txt = p.with_suffix(".txt")
        text = txt.read_text(encoding="utf-8", errors="replace").strip() if txt.is_file() else None
        samples.append(Sample(id=p.relative_to(path).as_posix(), split="", image=str(p), text=text))
    return Dataset(name=name, samples=samples, labels=label_space, root=path)


def write_predictions(out: Path, preds: list[Prediction], samples: list[Sample], labels: dict[str, list[str]],
                      with_split: bool) -> Path:
    """CSV: id, [split], [label], predicted, p_<class>... (task-prefixed with several tasks), reason."""
    by_id = {s.id: s for s in samples}
    multi = len(labels) > 1
    with_label = {t: any(t in s.labels for s in samples) for t in labels}
    cols = ["id", *(["split"] if with_split else [])]
    for t, names in labels.items():
        p = f"{t}_" if multi else ""
        cols += [*([f"{p}label"] if with_label[t] else []), f"{p}predicted", *(f"{p}p_{n}" for n in names)]
    cols.append("reason")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for pr in preds:
            s = by_id[pr.id]
            row: list[Any] = [pr.id, *([s.split] if with_split else [])]
            for t, names in labels.items():
                if with_label[t]:
                    row.append(names[s.labels[t]] if t in s.labels else "")
                got = pr.tasks.get(t)
                row += [got["label"], *(f"{got['probs'][n]:.6f}" for n in names)] if got else [""] * (1 + len(names))
            row.append(pr.error or "")
            w.writerow(row)
    os.replace(tmp, out)
    return out


def _check_labels(ds: Dataset, labels: dict[str, list[str]], where: str) -> None:
    for t, names in labels.items():
        have = ds.labels.tasks.get(t)
        if have is not None and have != names:
            raise MMCacheError(f"{where} has classes {have} for task {t!r}, the run was trained on {names}; "
                               "predict with a run of the same label space")


def predict_to_csv(run: str | Path, data: str | Path | None = None, dataset: str | None = None,
                   data_dir: str | Path | None = None, dataset_options: dict[str, Any] | None = None,
                   split: str | None = None, out: str | Path | None = None, cache_dir: str | Path | None = None,
                   run_cache_dir: str | None = None, device: str | None = None, batch_size: int = 64,
                   num_workers: int = 0, progress: bool = True) -> tuple[Path, list[Prediction]]:
    """Predict new data (`data`: a table, a folder, an image) or a registered dataset's raw files (`dataset`,
    default the run's) with run `run`; write the CSV (default `<run>/predictions_<name>_<split>.csv`)."""
    from mmcache.data.base import load_dataset
    from mmcache.utils import check_output_file

    check_output_file(out)
    predictor = Predictor.load(run, device=device, run_cache_dir=run_cache_dir)
    if data is not None:
        if dataset is not None:
            raise MMCacheError("pass --data (new files) or --dataset (a registered dataset), not both")
        ds = load_new_data(Path(data), predictor.label_space)
        split = split or "all"
    else:
        config = predictor.config
        name = dataset or config["dataset"]
        from mmcache.data.base import DATASETS

        if dataset is None and config.get("data_dir") is None and "," not in name and name not in DATASETS:
            # A table / webdataset is named after its file, which the run does not record: say what to pass.
            raise MMCacheError(f"the run's dataset {name!r} is not a registered dataset (a table or shards named "
                               "after their file?); pass --data FILE for new inputs, or --dataset table --data-dir "
                               "FILE for that table's split")
        options = dataset_options or {}
        if dataset is None and not options:  # the run's own dataset: the same splits (fold) as in training
            options = dict(config.get("dataset_options") or {})
            if config.get("fold") is not None:
                options["fold"] = config["fold"]
        if dataset is None and data_dir is None and config.get("stream") and config.get("val_data"):
            from mmcache.finetune.stream import eval_data  # a streamed run's test rows are its --val-data shards'

            ds = eval_data(config["val_data"], name, predictor.label_space, options, progress)
        else:
            ds = load_dataset(name, data_dir if data_dir is not None else config.get("data_dir"), **options)
        split = split or "test"
    _check_labels(ds, predictor.labels, f"{ds.name!r}")
    if split == "all":
        samples = list(ds.samples)
    else:
        samples = ds.split(split)
        if not samples:
            raise MMCacheError(f"{ds.name!r} has no rows in split {split!r} (splits: "
                               f"{', '.join(s or '(none)' for s in ds.splits)}); pass --split all")
    if ds.labels.tasks and not set(ds.labels.tasks) & set(predictor.labels):
        from mmcache.data.io import warn

        warn(f"{ds.name!r} labels task(s) {sorted(ds.labels.tasks)}, the run predicts {sorted(predictor.labels)}: "
             "the predictions carry no true label to score against")
    # Labels of a registered dataset are indices in its own label space: keep only the run's tasks.
    samples = [s if set(s.labels) <= set(predictor.labels) else
               Sample(**{**s.to_json(), "labels": {t: v for t, v in s.labels.items() if t in predictor.labels}})
               for s in samples]
    cache = Path(cache_dir) if cache_dir is not None else Path(run) / PREDICT_CACHE
    preds = predictor.predict_dataset(ds, samples, cache, batch_size=batch_size, num_workers=num_workers,
                                      progress=progress)
    out_path = Path(out) if out is not None else Path(run) / f"predictions_{_safe(ds.name)}_{split}.csv"
    write_predictions(out_path, preds, samples, predictor.labels,
                      with_split=split == "all" and any(s.split for s in samples))
    return out_path, preds


def summary_line(out: Path, preds: list[Prediction]) -> str:
    """`wrote FILE: N predicted` plus the failed inputs counted by reason."""
    failed = Counter(p.error_kind or p.error for p in preds if p.error)
    line = f"wrote {out}: {len(preds) - sum(failed.values())} of {len(preds)} inputs predicted"
    if failed:
        kinds = "; ".join(f"{n} x {reason[:120]}" for reason, n in failed.most_common(5))
        line += f"; {sum(failed.values())} could not be encoded (reason column): {kinds}"
    return line


def predict_cmd(
    run: Annotated[Path, typer.Option(help="Run folder of `heads train` or `finetune run`.")],
    data: Annotated[Path | None, typer.Option(help="New inputs: a table (.csv/.tsv/.json/.jsonl; label column "
                                                   "optional), a folder of images (+ same-named .txt), one image.")]
    = None,
    dataset: Annotated[str | None, typer.Option(help="A registered dataset's raw files instead (default: the run's "
                                                     "dataset, when --data is not given).")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Folder of --dataset (default: the run's).")] = None,
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="Dataset option KEY=VALUE.")] = None,
    split: Annotated[str | None, typer.Option(help="Split to predict, or all (default: all for --data, test for "
                                                   "--dataset); all adds a split column.")] = None,
    out: Annotated[Path | None, typer.Option(help="CSV to write (default: <run>/predictions_<name>_<split>.csv).")]
    = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Where the new inputs' features are cached (default: "
                                                        "<run>/predict_cache).")] = None,
    run_cache_dir: Annotated[str | None, typer.Option(help="Where a `heads train` run's stores are (default: its "
                                                           "cache_dir); their specs rebuild the extractors.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda (default: cuda when available).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Inputs per batch.")] = 64,
    num_workers: Annotated[int | None, typer.Option(min=0, help="Decoding workers (default: cores-1, max 8).")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Predict new data with a trained run: extracts the run's features into its own cache, writes id, predicted,
    p_<class>... (label where the data has one; inputs that cannot be encoded get a reason)."""
    from mmcache.cliutil import parse_kv
    from mmcache.extract.runner import usable_cores

    if num_workers is None:
        num_workers = min(8, max(0, usable_cores() - 1))
    path, preds = predict_to_csv(run, data=data, dataset=dataset, data_dir=data_dir,
                                 dataset_options=parse_kv(option, "--option"), split=split, out=out,
                                 cache_dir=cache_dir, run_cache_dir=run_cache_dir, device=device,
                                 batch_size=batch_size, num_workers=num_workers, progress=progress)
    typer.echo(summary_line(path, preds))
