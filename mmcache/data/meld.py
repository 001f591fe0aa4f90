"""MELD (Poria et al. 2019): utterances of Friends with text, video and audio; emotion 7 + sentiment 3.

    <root>/train_sent_emo.csv  dev_sent_emo.csv  test_sent_emo.csv
    <root>/train_splits/dia{D}_utt{U}.mp4
    <root>/dev_splits_complete/dia{D}_utt{U}.mp4
    <root>/output_repeated_splits_test/dia{D}_utt{U}.mp4
    (the video folders may also sit one or two levels down, e.g. MELD.Raw/train/train_splits/)

The audio is the mp4's own audio track, so `audio` and `video` are the same path. Dialogue ids
restart in every split, so sample ids are `<split>/dia{D}_utt{U}`.
"""

from __future__ import annotations

from pathlib import Path

from mmcache.data.base import Dataset, LabelSpace, Sample, register_dataset
from mmcache.data.io import IdCheck, fix_mojibake, locate, order_tasks, read_delimited
from mmcache.errors import MMCacheError

EMOTIONS = ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]
SENTIMENTS = ["neutral", "positive", "negative"]
SPLITS = (("train", "train_sent_emo.csv", "train_splits"),
          ("val", "dev_sent_emo.csv", "dev_splits_complete"),
          ("test", "test_sent_emo.csv", "output_repeated_splits_test"))
COLUMNS = ("Utterance", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID")


@register_dataset("meld")
def load_meld(root: Path, seed: int = 0, task: str | None = None) -> Dataset:
    """Load MELD's three splits; tasks emotion (primary) and sentiment; metric weighted F1."""
    space = LabelSpace(order_tasks({"emotion": EMOTIONS, "sentiment": SENTIMENTS}, task, "meld"),
                       metric="weighted_f1")
    train_csv = locate(root, "train_sent_emo.csv")
    base = train_csv.parent
    ids = IdCheck()
    samples: list[Sample] = []
    notes: list[str] = []
    for split, csv_name, video_dir_name in SPLITS:
        path = base / csv_name
        if not path.is_file():
            raise MMCacheError(f"{path} not found; MELD needs train/dev/test_sent_emo.csv side by side")
        video_dir = locate(root, video_dir_name, kind="dir", required=False)
        if video_dir is None:
            notes.append(f"{split}: folder {video_dir_name}/ not found; video/audio paths point to "
                         f"{base / video_dir_name} (extraction will record them as missing)")
            video_dir = base / video_dir_name
        for line, row in read_delimited(path, ",", required=COLUMNS):
            where = f"{path}, line {line}"
            try:
                dia, utt = int(row["Dialogue_ID"]), int(row["Utterance_ID"])
            except ValueError:
                raise MMCacheError(f"{where}: Dialogue_ID/Utterance_ID {row['Dialogue_ID']!r}/"
                                   f"{row['Utterance_ID']!r} are not integers; fix the row") from None
            stem = f"dia{dia}_utt{utt}"
            sid = f"{split}/{stem}"
            ids.add(sid, path, line)
            labels = {
                "emotion": space.index("emotion", row["Emotion"].strip().lower(), f"{where}: "),
                "sentiment": space.index("sentiment", row["Sentiment"].strip().lower(), f"{where}: "),
            }
            media = str(video_dir / f"{stem}.mp4")
            samples.append(Sample(id=sid, split=split, text=fix_mojibake(row["Utterance"]).strip(), video=media,
                                  audio=media, labels=labels))
    return Dataset(name="meld", samples=samples, labels=space, root=base, notes=notes)
