"""Dataset adapter load cost: each adapter vs. a bare parse of the same files (ratios within one run).

    .venv/bin/python bench/bench_data.py [--quick]

Synthetic files in the real layouts (Fakeddit TSV, MVSA label file + texts, WebDataset shards),
written to a temporary folder and deleted afterwards. "bare" is the least any loader must do:
csv.DictReader over the TSV, reading every MVSA text file, iterating the tar members.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import timed  # noqa: E402
from mmcache.data import load_dataset  # noqa: E402


def make_fakeddit(root: Path, n: int) -> None:
    header = ["", "author", "clean_title", "id", "image_url", "title", "2_way_label", "3_way_label", "6_way_label"]
    root.mkdir(parents=True)
    (root / "public_image_set").mkdir()
    for split, m in (("train", n), ("validate", n // 10), ("test_public", n // 10)):
        buf = io.StringIO()
        w = csv.writer(buf, delimiter="\t")
        w.writerow(header)
        for i in range(m):
            w.writerow([i, "u", f'title "{i}" of {split} with some words', f"{split}{i}", "http://x", "T", i % 2,
                        i % 3, i % 6])
        (root / f"multimodal_{split}.tsv").write_text(buf.getvalue())


def bare_fakeddit(root: Path) -> int:
    n = 0
    for split in ("train", "validate", "test_public"):
        with (root / f"multimodal_{split}.tsv").open(newline="") as f:
            n += sum(1 for _ in csv.DictReader(f, delimiter="\t"))
    return n


def make_mvsa(root: Path, n: int) -> None:
    (root / "data").mkdir(parents=True)
    labs = ["positive,positive", "neutral,negative", "neutral,neutral", "positive,negative"]
    lines = ["ID\ttext,image"] + [f"{i}\t{labs[i % 4]}" for i in range(1, n + 1)]
    (root / "labelResultAll.txt").write_text("\n".join(lines) + "\n")
    for i in range(1, n + 1):
        (root / "data" / f"{i}.txt").write_bytes(f"tweet {i} caf\xe9 #tag".encode("latin-1"))


def bare_mvsa(root: Path) -> int:
    rows = (root / "labelResultAll.txt").read_text().splitlines()[1:]
    return sum(len((root / "data" / f"{r.split()[0]}.txt").read_bytes()) > 0 for r in rows)


def make_wds(root: Path, n: int, per_shard: int = 1000) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, format="JPEG")
    jpg = buf.getvalue()
    for s in range(0, n, per_shard):
        path = root / "train" / f"{s // per_shard:05d}.tar"
        path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, "w") as tar:
            for i in range(s, min(n, s + per_shard)):
                for ext, data in (("jpg", jpg), ("txt", f"caption {i}".encode()),
                                  ("json", json.dumps({"label": i % 7}).encode())):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def bare_wds(root: Path) -> int:
    n = 0
    for shard in sorted(root.rglob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                f = tar.extractfile(m)
                n += len(f.read()) > 0 if f else 0
    return n


def main() -> None:
    """Build the synthetic datasets, time adapter vs. bare parse, print the table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    args = ap.parse_args()
    n_fk, n_mvsa, n_wds = (20_000, 2_000, 2_000) if args.quick else (200_000, 20_000, 20_000)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_fakeddit(root / "fk", n_fk)
        make_mvsa(root / "mvsa", n_mvsa)
        make_wds(root / "wds", n_wds)
        for name, path, bare, n in (("fakeddit", root / "fk", bare_fakeddit, int(n_fk * 1.2)),
                                    ("mvsa-single", root / "mvsa", bare_mvsa, n_mvsa)):
            t_bare = timed(lambda b=bare, p=path: b(p))
            t_ours = timed(lambda nm=name, p=path: load_dataset(nm, p))
            rows.append((name, n, t_bare, t_ours, ""))
        t_bare = timed(lambda: bare_wds(root / "wds"))
        t_first = timed(lambda: load_dataset("webdataset", root / "wds"), repeat=1)
        t_again = timed(lambda: load_dataset("webdataset", root / "wds"))
        rows.append(("webdataset (1st, unpacks)", n_wds, t_bare, t_first, ""))
        rows.append(("webdataset (again)", n_wds, t_bare, t_again, ""))
    print(f"{'adapter':28s}{'rows':>9s}{'bare s':>9s}{'ours s':>9s}{'ours/bare':>11s}{'rows/s':>11s}")
    for name, n, tb, to, _ in rows:
        print(f"{name:28s}{n:9d}{tb:9.2f}{to:9.2f}{to / tb:10.1f}x{n / to:11.0f}")


if __name__ == "__main__":
    main()
