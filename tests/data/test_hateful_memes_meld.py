"""Hateful Memes and MELD in their distributed layouts."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from mmcache.data import load_dataset
from mmcache.errors import MMCacheError
from tests.data.layouts import write_hateful_memes, write_meld


def meme(i: int, label: int | None = 0) -> dict:
    row = {"id": i, "img": f"img/{i:05d}.png", "text": f"meme {i}"}
    if label is not None:
        row["label"] = label
    return row


def hm_files() -> dict[str, list[dict]]:
    return {
        "train": [meme(i, i % 2) for i in range(1, 7)],
        "dev_seen": [meme(i, 1) for i in range(10, 13)],
        "test_seen": [meme(i, 0) for i in range(20, 22)],
        "dev_unseen": [meme(10, 1), meme(30, 0)],  # 10 is also in dev_seen, as in the real release
        "test_unseen": [meme(40, 1)],
    }


def test_hateful_memes_splits_labels_and_metric(tmp_path: Path) -> None:
    root = write_hateful_memes(tmp_path / "hm", hm_files())
    ds = load_dataset("hateful-memes", root)
    assert Counter(s.split for s in ds.samples) == {"train": 6, "val": 3, "test": 2, "dev_unseen": 2,
                                                    "test_unseen": 1}
    assert ds.labels.metric == "auroc" and ds.labels.tasks == {"hateful": ["not_hateful", "hateful"]}
    by_id = ds.by_id()
    assert by_id["1"].labels == {"hateful": 1} and by_id["2"].labels == {"hateful": 0}
    assert by_id["1"].image == str(root / "img" / "00001.png") and by_id["1"].text == "meme 1"
    # The same meme in dev_seen and dev_unseen is two samples with distinct ids.
    assert by_id["10"].split == "val" and by_id["dev_unseen/10"].split == "dev_unseen"
    assert len(load_dataset("hateful-memes", root, unseen=False).samples) == 11


def test_hateful_memes_phase1_names_and_unlabeled_test(tmp_path: Path) -> None:
    root = write_hateful_memes(tmp_path / "hm", {"train": [meme(1, 1)], "dev": [meme(2, 0)],
                                                 "test": [meme(3, None)]})
    ds = load_dataset("hateful_memes", root)
    assert {s.id: s.split for s in ds.samples} == {"1": "train", "2": "val", "3": "test"}
    assert ds.by_id()["3"].labels == {}
    assert any("1 rows without labels" in n for n in ds.notes)


def test_hateful_memes_errors(tmp_path: Path) -> None:
    with pytest.raises(MMCacheError, match="no file 'train.jsonl'"):
        load_dataset("hateful-memes", tmp_path)
    files = hm_files()
    files["train"][2]["label"] = 2
    root = write_hateful_memes(tmp_path / "a", files)
    with pytest.raises(MMCacheError, match=r"train\.jsonl, line 3: label 2 is not 0 .* or 1"):
        load_dataset("hateful-memes", root)
    files = hm_files()
    files["test_seen"].append(meme(1, 0))
    root = write_hateful_memes(tmp_path / "b", files)
    with pytest.raises(MMCacheError, match=r"test_seen\.jsonl, line 3: duplicate id '1' \(first seen at .*train"):
        load_dataset("hateful-memes", root)
    root = write_hateful_memes(tmp_path / "c", hm_files())
    with (root / "train.jsonl").open("a") as f:
        f.write('{"id": 99, "text": "no image"}\n{"id": \n')
    with pytest.raises(MMCacheError, match=r"train\.jsonl, line 7: a meme needs 'id' and 'img'"):
        load_dataset("hateful-memes", root)


MELD_ROWS = {
    "train": [("Oh my God!", "surprise", "positive", 0, 0), ("I hate this.", "anger", "negative", 0, 1),
              ("Okay.", "neutral", "neutral", 1, 0), ("Yay!", "joy", "positive", 1, 1)],
    "dev": [("Hmm.", "neutral", "neutral", 0, 0), ("No way.", "disgust", "negative", 0, 1)],
    "test": [("Help!", "fear", "negative", 0, 0), ("Sigh.", "sadness", "negative", 0, 1)],
}


def test_meld_two_tasks_and_media(tmp_path: Path) -> None:
    root = write_meld(tmp_path / "meld", MELD_ROWS)
    ds = load_dataset("meld", root)
    assert list(ds.labels.tasks) == ["emotion", "sentiment"] and ds.labels.metric == "weighted_f1"
    assert len(ds.labels.tasks["emotion"]) == 7 and len(ds.labels.tasks["sentiment"]) == 3
    assert Counter(s.split for s in ds.samples) == {"train": 4, "val": 2, "test": 2}
    s = ds.by_id()["train/dia0_utt1"]
    assert ds.labels.tasks["emotion"][s.labels["emotion"]] == "anger"
    assert ds.labels.tasks["sentiment"][s.labels["sentiment"]] == "negative"
    assert s.video == s.audio == str(root / "train_splits" / "dia0_utt1.mp4") and Path(s.video).is_file()
    assert ds.by_id()["val/dia0_utt0"].video == str(root / "dev_splits_complete" / "dia0_utt0.mp4")
    assert ds.by_id()["test/dia0_utt0"].video == str(root / "output_repeated_splits_test" / "dia0_utt0.mp4")
    assert s.text == "I hate this."
    counts = ds.counts()
    assert counts["train"]["emotion"]["joy"] == 1 and counts["test"]["sentiment"]["negative"] == 2


def test_meld_task_option_makes_sentiment_primary(tmp_path: Path) -> None:
    root = write_meld(tmp_path / "meld", MELD_ROWS)
    ds = load_dataset("meld", root, task="sentiment")
    assert ds.labels.primary == "sentiment"
    with pytest.raises(MMCacheError, match="no task 'topic'"):
        load_dataset("meld", root, task="topic")


def test_meld_nested_raw_layout_and_cp1252_mojibake(tmp_path: Path) -> None:
    rows = {k: list(v) for k, v in MELD_ROWS.items()}
    rows["train"][0] = ("I don\u2019t know", "neutral", "neutral", 0, 0)
    root = write_meld(tmp_path / "meld", rows, nested=True)
    # The released CSVs hold UTF-8 apostrophes that were once decoded as cp1252 ("donâ€™t").
    path = root / "train_sent_emo.csv"
    path.write_text(path.read_text().replace("\u2019", "\u2019".encode().decode("cp1252")))
    ds = load_dataset("meld", tmp_path / "meld")
    s = ds.by_id()["train/dia0_utt0"]
    assert s.text == "I don\u2019t know"
    assert s.video == str(root / "train" / "train_splits" / "dia0_utt0.mp4")


def test_meld_errors(tmp_path: Path) -> None:
    rows = {k: list(v) for k, v in MELD_ROWS.items()}
    rows["dev"].append(("Wat", "confused", "neutral", 5, 0))
    root = write_meld(tmp_path / "a", rows)
    with pytest.raises(MMCacheError, match=r"dev_sent_emo\.csv, line 4: label 'confused' is not in the label space "
                                           r"of task 'emotion'"):
        load_dataset("meld", root)
    rows = {k: list(v) for k, v in MELD_ROWS.items()}
    rows["train"].append(("Again", "joy", "positive", 1, 1))
    root = write_meld(tmp_path / "b", rows)
    with pytest.raises(MMCacheError, match=r"train_sent_emo\.csv, line 6: duplicate id 'train/dia1_utt1'"):
        load_dataset("meld", root)
    root = write_meld(tmp_path / "c", MELD_ROWS)
    (root / "test_sent_emo.csv").unlink()
    with pytest.raises(MMCacheError, match=r"test_sent_emo\.csv not found"):
        load_dataset("meld", root)
    root = write_meld(tmp_path / "d", MELD_ROWS)
    (root / "dev_sent_emo.csv").write_text("Utterance,Emotion\nhi,joy\n")
    with pytest.raises(MMCacheError, match=r"dev_sent_emo\.csv: missing column\(s\) \['Sentiment'"):
        load_dataset("meld", root)
    root = write_meld(tmp_path / "e", MELD_ROWS)
    with pytest.raises(MMCacheError, match=r"does not take option\(s\) \['fold'\]"):
        load_dataset("meld", root, fold=2)
