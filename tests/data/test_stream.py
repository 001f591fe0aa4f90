"""WebDataset shards read as a stream: shard lists, a share per reader, resampling, skipped samples, no disk writes."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from torch.utils.data import DataLoader, get_worker_info

from mmcache.data import stream as stream_mod
from mmcache.data.base import LabelSpace
from mmcache.data.stream import (
    BadSample,
    ShardStream,
    StreamSample,
    expand_shards,
    index_size,
    parse_sample,
    shard_label_space,
    shards_of,
)
from mmcache.errors import MMCacheError
from tests.data.layouts import jpeg_bytes, write_shard

SPACE = LabelSpace({"label": ["neg", "pos"]})


def shard(path: Path, prefix: str, n: int = 3, **extra: dict) -> Path:
    samples = {f"{prefix}{i:03d}": {"jpg": jpeg_bytes(), "txt": f"{prefix} {i}", "json": {"label": ["neg", "pos"][i % 2]}}
               for i in range(n)}
    return write_shard(path, {**samples, **extra})


def listing(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))}


def where_and_worker(s: StreamSample) -> tuple[str, int]:
    info = get_worker_info()
    return s.where, info.id if info is not None else -1


def sample_id(s: StreamSample) -> str:
    return s.id


def test_expand_shards_patterns_folders_globs(tmp_path: Path) -> None:
    for k in range(3):
        shard(tmp_path / "wds" / f"train-{k:06d}.tar", f"s{k}")
    brace = expand_shards(str(tmp_path / "wds" / "train-{000000..000001}.tar"))
    assert [Path(s).name for s in brace] == ["train-000000.tar", "train-000001.tar"]
    assert len(expand_shards(str(tmp_path / "wds"))) == 3
    assert len(expand_shards(str(tmp_path / "wds" / "train-*.tar"))) == 3
    with pytest.raises(MMCacheError, match=r"train-000003\.tar: shard not found"):
        expand_shards(str(tmp_path / "wds" / "train-{000002..000004}.tar"))


def test_each_rank_and_worker_reads_its_own_shards(tmp_path: Path) -> None:
    shards = [str(shard(tmp_path / f"train-{k:06d}.tar", f"s{k}")) for k in range(8)]
    before = listing(tmp_path)
    seen: dict[tuple[int, int], set[str]] = {}
    for rank in (0, 1):
        data = ShardStream(shards, SPACE, where_and_worker, rank=rank, world=2, seed=3, buffer=4)
        loader = DataLoader(data, batch_size=None, num_workers=2)
        it = iter(loader)
        for _ in range(60):
            (where, worker), _skips = next(it)
            seen.setdefault((rank, worker), set()).add(where.split(", sample")[0])
        del it
    assert set(seen) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    for (rank, worker), got in seen.items():
        assert got == set(shards_of(shards, rank, 2, worker, 2))  # its share, all of it drawn
        assert len(got) == 2
    assert len(set.union(*seen.values())) == 8  # no shard read by two readers
    assert listing(tmp_path) == before  # nothing unpacked, nothing written
    with pytest.raises(MMCacheError, match=r"8 shard\(s\) for 2 process\(es\) x 5 DataLoader worker\(s\)"):
        shards_of(shards, 0, 2, 0, 5)


def test_resampling_is_endless_with_replacement_and_seeded(tmp_path: Path) -> None:
    shards = [str(shard(tmp_path / f"train-{k}.tar", f"s{k}")) for k in range(2)]

    def draw(seed: int, n: int = 30) -> list[str]:
        it = iter(ShardStream(shards, SPACE, sample_id, seed=seed, buffer=4))
        return [next(it)[0] for _ in range(n)]

    ids = draw(0)
    assert len(ids) == 30 and len(set(ids)) == 6  # 6 samples, drawn again and again
    assert max(Counter(ids).values()) >= 5
    assert draw(0) == ids  # the same seed, the same stream
    assert draw(1) != ids
    assert ids[:6] != sorted(ids[:6])  # the buffer mixes the shard's order


def test_bad_samples_and_shards_are_skipped_and_reported(tmp_path: Path) -> None:
    good = shard(tmp_path / "a.tar", "a", n=2,
                 nolabel={"jpg": jpeg_bytes(), "txt": "x"}, stranger={"jpg": jpeg_bytes(), "json": {"label": "meh"}},
                 brokenjson={"jpg": jpeg_bytes(), "json": "{not json"}, undecodable={"jpg": b"no image", "cls": "pos"})
    junk = tmp_path / "b.tar"
    junk.write_bytes(b"not a tar at all")

    def prepare(s: StreamSample) -> str:
        if s.image == b"no image":
            raise BadSample("the image is corrupt or not an image")
        return s.id

    it = iter(ShardStream([str(good), str(junk)], SPACE, prepare, seed=0, buffer=2))
    items, skips = [], []
    for _ in range(40):
        item, sk = next(it)
        items.append(item)
        skips += sk
    assert {i.rsplit("/", 1)[1] for i in items} == {"a000", "a001"}
    reasons = Counter(why.split(" ")[0] for _, why in skips)
    assert {"no", "label", "unreadable", "the"} <= set(reasons)  # no label / label 'meh' ... / unreadable JSON / the image
    assert any("b.tar" in where and "ReadError" in why for where, why in skips)
    assert any("'stranger'" in where and "'meh'" in why for where, why in skips)


def test_a_stream_of_nothing_usable_stops_with_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream_mod, "MAX_SKIPPED_IN_A_ROW", 20)
    bad = write_shard(tmp_path / "a.tar", {f"k{i}": {"txt": "x"} for i in range(3)})  # no labels
    with pytest.raises(MMCacheError, match=r"20 streamed samples or shard reads in a row could not be used"):
        next(iter(ShardStream([str(bad)], SPACE, sample_id)))
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"junk")  # no sample at all: the shard reads themselves count
    with pytest.raises(MMCacheError, match=r"in a row could not be used \(last: .*junk\.tar: ReadError"):
        next(iter(ShardStream([str(junk)], SPACE, sample_id)))


def test_parse_sample_labels_from_json_cls_and_tasks() -> None:
    raw = {"__key__": "k1", "__url__": "u.tar", "jpg": b"img", "txt": b" hi ", "cls": b"pos",
           "json": json.dumps({"label_topic": "b", "ctx_text": "c", "entity": 3}).encode()}
    space = LabelSpace({"label": ["neg", "pos"], "topic": ["a", "b"]})
    s = parse_sample(raw, space)
    assert (s.id, s.text, s.image, s.context, s.entity) == ("u.tar/k1", "hi", b"img", "c", "3")
    assert s.labels == {"label": 1, "topic": 1}
    with pytest.raises(BadSample, match="not in the label space"):
        parse_sample({**raw, "cls": b"maybe"}, space)


def test_index_size_and_label_file_beside_the_shards(tmp_path: Path) -> None:
    shards = [str(shard(tmp_path / f"train-{k}.tar", f"s{k}")) for k in range(2)]
    assert index_size(shards) is None
    (tmp_path / "sizes.json").write_text(json.dumps({"train-0.tar": 3, "train-1.tar": 4}))
    assert index_size(shards) == 7
    assert shard_label_space(shards) is None
    (tmp_path / "labels.json").write_text(json.dumps({"tasks": {"label": ["neg", "pos", "x"]}}))
    assert shard_label_space(shards).tasks == {"label": ["neg", "pos", "x"]}  # type: ignore[union-attr]
