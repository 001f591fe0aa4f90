"""WebDataset shards: keys, labels in json / .cls / class folders, splits, unpacked media."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from mmcache.data import load_dataset
from mmcache.data.webdataset import split_from_path, split_key
from mmcache.errors import MMCacheError
from tests.data.layouts import jpeg_bytes, write_shard


def test_key_rule_and_split_from_path() -> None:
    assert split_key("00001.jpg") == ("00001", "jpg")
    assert split_key("dir/abc.seg.JSON") == ("dir/abc", "seg.json")
    assert split_from_path(Path("train/00000.tar")) == "train"
    assert split_from_path(Path("validation-0001.tar")) == "val"
    assert split_from_path(Path("class_3/00001.tar")) is None


def sample(i: int, label: object, split: str | None = None, **extra: object) -> dict:
    meta = {"label": label, **extra}
    if split:
        meta["split"] = split
    return {"jpg": jpeg_bytes((i * 20 % 255, 0, 0)), "txt": f"caption {i}", "json": meta}


def test_split_folders_string_labels_and_unpacked_images(tmp_path: Path) -> None:
    root = tmp_path / "wds"
    write_shard(root / "train" / "00000.tar", {f"{i:05d}": sample(i, ["Hate", "True"][i % 2]) for i in range(6)})
    write_shard(root / "val" / "00000.tar", {"10000": sample(10, "Satire", entity="x", ctx_text="c")})
    write_shard(root / "test-00000.tar", {"20000": sample(20, "True")})
    ds = load_dataset("webdataset", root)
    assert Counter(s.split for s in ds.samples) == {"train": 6, "val": 1, "test": 1}
    assert ds.labels.tasks == {"label": ["Hate", "Satire", "True"]}
    assert json.loads((root / "labels.json").read_text())["tasks"] == ds.labels.tasks
    s = ds.by_id()["00003"]
    assert s.text == "caption 3" and s.labels == {"label": 2}
    assert Path(s.image).read_bytes() == jpeg_bytes((60, 0, 0))  # the member's bytes, unpacked once
    assert Path(s.image).is_relative_to(root / "_unpacked")
    v = ds.by_id()["10000"]
    assert v.entity == "x" and v.context == "c"
    # A second load reuses the unpacked files and gives the same samples.
    assert load_dataset("wds", root).samples == ds.samples


def test_class_folders_and_cls_members_give_labels(tmp_path: Path) -> None:
    root = tmp_path / "wds"
    for c in ("cat", "dog"):
        write_shard(root / c / "00001.tar", {f"{c}{i}": {"jpg": jpeg_bytes(), "txt": c} for i in range(6)})
    ds = load_dataset("webdataset", root)
    assert ds.labels.tasks == {"label": ["cat", "dog"]}
    assert ds.by_id()["dog3"].labels == {"label": 1}
    split_counts = Counter(s.split for s in ds.samples)
    assert set(split_counts) == {"train", "val", "test"} and split_counts["train"] >= 8
    root2 = tmp_path / "cls"
    write_shard(root2 / "train" / "a.tar", {f"k{i}": {"jpg": jpeg_bytes(), "cls": str(i % 3)} for i in range(12)})
    ds2 = load_dataset("webdataset", root2)
    assert ds2.labels.tasks == {"label": ["0", "1", "2"]} and ds2.by_id()["k5"].labels == {"label": 2}


def test_multitask_json_labels_and_folds(tmp_path: Path) -> None:
    root = tmp_path / "wds"
    write_shard(root / "00000.tar", {f"k{i}": sample(i, i % 2, label_fine=i % 3) for i in range(20)})
    ds = load_dataset("webdataset", root, fold=2)
    assert ds.labels.tasks == {"label": ["0", "1"], "fine": ["0", "1", "2"]}
    assert ds.by_id()["k5"].labels == {"label": 1, "fine": 2}
    tests = [set(load_dataset("webdataset", root, fold=k).ids("test")) for k in range(10)]
    assert set().union(*tests) == set(ds.ids()) and sum(map(len, tests)) == 20


def test_webdataset_errors(tmp_path: Path) -> None:
    with pytest.raises(MMCacheError, match="no .tar shards found"):
        load_dataset("webdataset", tmp_path)
    root = tmp_path / "dup"
    write_shard(root / "train" / "a.tar", {"k1": sample(1, "x")})
    write_shard(root / "train" / "b.tar", {"k1": sample(2, "y")})
    with pytest.raises(MMCacheError, match=r"b\.tar, sample 'k1': duplicate id 'k1' .*prefix_shard=true"):
        load_dataset("webdataset", root)
    ds = load_dataset("webdataset", root, prefix_shard=True)
    assert sorted(ds.ids()) == ["train/a/k1", "train/b/k1"]
    root = tmp_path / "badjson"
    write_shard(root / "train" / "a.tar", {"k1": {"jpg": jpeg_bytes(), "json": "{not json"}})
    with pytest.raises(MMCacheError, match=r"a\.tar, member k1\.json: unreadable JSON"):
        load_dataset("webdataset", root)
    root = tmp_path / "corrupt"
    root.mkdir()
    (root / "x.tar").write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(MMCacheError, match=r"x\.tar: unreadable tar shard"):
        load_dataset("webdataset", root)
    root = tmp_path / "space"
    write_shard(root / "train" / "a.tar", {"k1": sample(1, "zzz")})
    (root / "labels.json").write_text(json.dumps({"tasks": {"label": ["a", "b"]}}))
    with pytest.raises(MMCacheError, match=r"a\.tar, sample 'k1': label 'zzz' is not in the label space"):
        load_dataset("webdataset", root)


def _add(tar: tarfile.TarFile, info: tarfile.TarInfo, data: bytes = b"") -> None:
    info.size = len(data) if info.isreg() else 0
    tar.addfile(info, io.BytesIO(data) if info.isreg() else None)


def test_hostile_members_are_refused_and_nothing_lands_outside(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "ds" / "wds"
    shard = root / "train" / "00000.tar"
    shard.parent.mkdir(parents=True)
    outside_abs = tmp_path / "abs" / "evil.jpg"
    with tarfile.open(shard, "w") as tar:
        for i in range(3):
            _add(tar, tarfile.TarInfo(f"k{i}.jpg"), jpeg_bytes())
            _add(tar, tarfile.TarInfo(f"k{i}.json"), json.dumps({"label": "a"}).encode())
        _add(tar, tarfile.TarInfo("../../up.jpg"), b"climb")
        _add(tar, tarfile.TarInfo("sub/../../../../up2.jpg"), b"climb")
        _add(tar, tarfile.TarInfo(str(outside_abs)), b"absolute")
        for kind, name in ((tarfile.SYMTYPE, "link.jpg"), (tarfile.LNKTYPE, "hard.jpg"), (tarfile.CHRTYPE, "dev.jpg"),
                           (tarfile.FIFOTYPE, "fifo.jpg")):
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "/etc/passwd"
            _add(tar, info)
    ds = load_dataset("webdataset", root)
    assert sorted(ds.ids()) == ["k0", "k1", "k2"]
    assert all(Path(s.image).read_bytes() == jpeg_bytes() for s in ds.samples)
    # Every file written lies under the unpack folder; nothing else appeared anywhere under tmp_path.
    written = sorted(p for p in tmp_path.rglob("*") if p.is_file() or p.is_symlink())
    assert {p for p in written if not p.is_relative_to(root / "_unpacked")} == {shard, root / "labels.json"}
    assert not any(p.is_symlink() for p in written) and not outside_abs.exists()
    err = capsys.readouterr().err
    for member in ("../../up.jpg", "sub/../../../../up2.jpg", str(outside_abs), "link.jpg", "hard.jpg", "dev.jpg",
                   "fifo.jpg"):
        assert f"warning: {shard}: member {member!r} skipped: " in err


def test_unpack_dir_option_keeps_members_inside_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "wds"
    shard = root / "train" / "a.tar"
    shard.parent.mkdir(parents=True)
    with tarfile.open(shard, "w") as tar:
        _add(tar, tarfile.TarInfo("ok.jpg"), jpeg_bytes())
        _add(tar, tarfile.TarInfo("ok.cls"), b"1")
        _add(tar, tarfile.TarInfo("../../../../x.jpg"), b"climb")
    ds = load_dataset("webdataset", root, unpack_dir=str(tmp_path / "out" / "u"))
    assert [Path(s.image).parent for s in ds.samples] == [tmp_path / "out" / "u" / "train" / "a"]
    assert not (tmp_path / "x.jpg").exists() and "'../../../../x.jpg'" in capsys.readouterr().err


def test_not_a_tar_is_one_line_and_progress_can_be_off(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "wds"
    write_shard(root / "train" / "a.tar", {f"k{i}": sample(i, "x") for i in range(2)})
    load_dataset("webdataset", root, progress=False)
    assert "webdataset shards" not in capsys.readouterr().err
    (root / "train" / "b.tar").write_bytes(b"\x1f\x8b this is not a tar" * 40)
    with pytest.raises(MMCacheError) as e:
        load_dataset("webdataset", root, progress=False)
    assert "\n" not in str(e.value) and str(root / "train" / "b.tar") in str(e.value)
    assert "not a tar" in str(e.value)
    assert "webdataset shards" not in capsys.readouterr().err


def test_webdataset_without_any_label_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "wds"
    write_shard(root / "train" / "a.tar", {f"k{i}": {"jpg": jpeg_bytes(), "txt": "t"} for i in range(3)})
    with pytest.raises(MMCacheError, match=r"no sample has a label.*-o label_key="):
        load_dataset("webdataset", root)
    assert not (root / "labels.json").exists()


def test_a_link_already_in_the_unpack_folder_does_not_lead_out(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root, outside = tmp_path / "wds", tmp_path / "outside"
    outside.mkdir()
    shard = root / "train" / "a.tar"
    shard.parent.mkdir(parents=True)
    with tarfile.open(shard, "w") as tar:
        for key in ("ok", "sub/evil"):
            _add(tar, tarfile.TarInfo(f"{key}.jpg"), jpeg_bytes())
            _add(tar, tarfile.TarInfo(f"{key}.cls"), b"0")
    (root / "_unpacked" / "train" / "a").mkdir(parents=True)
    (root / "_unpacked" / "train" / "a" / "sub").symlink_to(outside)
    ds = load_dataset("webdataset", root)
    assert list(outside.iterdir()) == []
    assert "member 'sub/evil.jpg' skipped: its folder is a link" in capsys.readouterr().err
    assert ds.by_id()["ok"].image == str(root / "_unpacked" / "train" / "a" / "ok.jpg")


def _load_in_process(root: str, barrier: Any, results: Any) -> None:
    barrier.wait()  # every process unpacks the same shard at the same moment
    try:
        ds = load_dataset("webdataset", root, progress=False)
        results.put(sorted(Path(s.image).read_bytes()[-8:].hex() for s in ds.samples))
    except Exception as e:  # noqa: BLE001
        results.put(f"{type(e).__name__}: {e}")


def test_processes_unpacking_the_same_shards_at_once_all_succeed(tmp_path: Path) -> None:
    """Every rank of a torchrun job loads the dataset: their unpacking must not trip over each other's files."""
    import multiprocessing as mp

    root = tmp_path / "wds"
    write_shard(root / "val-000000.tar", {f"k{i:04d}": {"jpg": jpeg_bytes((i % 250, 9, 9)), "cls": str(i % 2)}
                                          for i in range(300)})
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_load_in_process, args=(str(root), barrier, results)) for _ in range(3)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join()
    assert all(isinstance(g, list) for g in got), got
    assert got[0] == got[1] == got[2] and len(got[0]) == 300
    assert json.loads((root / "labels.json").read_text())["tasks"] == {"label": ["0", "1"]}
