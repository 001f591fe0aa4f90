"""`mmcache data show` / `list` as a user runs them (in process, through typer)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmcache.data import load_dataset
from mmcache.data.base import DATASET_OPTIONS, DATASETS
from mmcache.data.cli import app, dataset_options
from mmcache.data.table import write_table
from mmcache.errors import MMCacheError
from tests.data.layouts import write_meld, write_mvsa

runner = CliRunner()


def table_rows(out: str, first: str) -> dict[str, list[int]]:
    """Rows of the count table that follows the header starting with `first`, by split."""
    lines = out.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(first))
    rows = {}
    for ln in lines[start + 1:]:
        if ln.strip() and not ln.strip("─ "):  # the rule under the header
            continue
        parts = ln.split()
        if not parts or not parts[-1].isdigit():
            break
        rows[parts[0]] = [int(x) for x in parts[1:]]
    return rows


def test_dataset_options_from_the_command_line() -> None:
    assert dataset_options(2, None, "t", ["skip_missing=true", "k=3", "path=a/b.json"]) == {
        "skip_missing": True, "k": 3, "path": "a/b.json", "fold": 2, "task": "t"}
    with pytest.raises(MMCacheError, match=r"^-o: 'oops' is not KEY=VALUE \(e\.g\. -o skip_missing=true\)$"):
        dataset_options(None, None, None, ["oops"])
    res = runner.invoke(app, ["show", "demo", "-o", "seed=1", "-o", "seed=2"])
    assert isinstance(res.exception, MMCacheError) and str(res.exception).startswith("-o: 'seed' is given twice")


def test_show_mvsa_counts_and_fold(tmp_path: Path) -> None:
    rows = [(str(i), [["positive,positive", "negative,neutral", "neutral,neutral", "positive,negative"][i % 4]])
            for i in range(1, 81)]
    root = write_mvsa(tmp_path / "mvsa", rows)
    (root / "data" / "2.jpg").unlink()
    res = runner.invoke(app, ["show", "mvsa", "--data-dir", str(root), "--fold", "4", "--check"])
    assert res.exit_code == 0, res.output
    counts = table_rows(res.output, "split")
    assert list(counts) == ["train", "val", "test"]
    # columns: negative neutral positive no-label total; 20 conflicts of 80 dropped.
    assert sum(r[-1] for r in counts.values()) == 60
    assert [sum(r[i] for r in counts.values()) for i in range(3)] == [20, 20, 20]
    assert counts["test"][-1] == 6
    assert "10-fold CV, fold 4" in res.output and "dropped 20: positive/negative conflict" in res.output
    missing = {ln.split(":")[0].strip(): ln for ln in res.output.splitlines() if ln.startswith("  ") and "image" in ln}
    assert sum(int(ln.split()[-1]) for ln in missing.values()) == 1


def test_show_multitask_prints_each_task_and_samples(tmp_path: Path) -> None:
    root = write_meld(tmp_path / "meld", {
        "train": [("Hi", "joy", "positive", 0, 0), ("No", "anger", "negative", 0, 1)],
        "dev": [("Eh", "neutral", "neutral", 0, 0)], "test": [("Oh", "fear", "negative", 0, 0)]})
    res = runner.invoke(app, ["show", "meld", "--data-dir", str(root), "--task", "sentiment", "--samples", "1"])
    assert res.exit_code == 0, res.output
    assert res.output.index("task 'sentiment'") < res.output.index("task 'emotion'")
    assert table_rows(res.output.split("task 'sentiment'")[1], "split")["train"] == [0, 1, 1, 0, 2]
    assert '"id": "train/dia0_utt0"' in res.output and "fields: text, video, audio" in res.output


def test_show_refuses_a_negative_sample_count(tmp_path: Path) -> None:
    """--samples -1 printed every sample but the last (a Python slice); it is refused."""
    root = write_meld(tmp_path / "meld", {
        "train": [("Hi", "joy", "positive", 0, 0), ("No", "anger", "negative", 0, 1)],
        "dev": [("Eh", "neutral", "neutral", 0, 0)], "test": [("Oh", "fear", "negative", 0, 0)]})
    res = runner.invoke(app, ["show", "meld", "--data-dir", str(root), "--samples", "-1"])
    assert res.exit_code == 2 and '"id"' not in res.output


def test_show_passes_adapter_options_and_reports_user_errors(tmp_path: Path) -> None:
    root = write_mvsa(tmp_path / "mvsa", [(str(i), ["positive,positive"]) for i in range(1, 13)])
    (root / "data" / "3.txt").unlink()
    res = runner.invoke(app, ["show", "mvsa-single", "--data-dir", str(root)])
    assert isinstance(res.exception, MMCacheError) and "3.txt is missing" in str(res.exception)
    res = runner.invoke(app, ["show", "mvsa-single", "--data-dir", str(root), "-o", "skip_missing=true"])
    assert res.exit_code == 0, res.output
    assert "11 samples" in res.output


def test_list_names_every_adapter_with_aliases() -> None:
    res = runner.invoke(app, ["list"])
    assert res.exit_code == 0
    names = {ln.split(":")[0].split(" (")[0] for ln in res.output.splitlines()}
    assert names == {"demo", "table", "mvsa-single", "mvsa-multiple", "hateful-memes", "meld", "twitter15",
                     "twitter17", "mmhs150k", "fakeddit", "webdataset"}
    assert "mvsa-single (alias mvsa, mvsa_single)" in res.output


def test_show_table_without_labels_is_one_user_error(tmp_path: Path) -> None:
    write_table(tmp_path / "t.csv", [{"text": "x", "split": "train"}, {"text": "y", "split": "test"}])
    res = runner.invoke(app, ["show", "table", "--data-dir", str(tmp_path / "t.csv")])
    assert isinstance(res.exception, MMCacheError), res.exception
    assert "no 'label' column" in str(res.exception) and "-o label_column=NAME" in str(res.exception)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_adapter_refuses_unknown_options_and_lists_its_own(tmp_path: Path, name: str) -> None:
    takes = DATASET_OPTIONS[name]
    assert "name" not in takes and "root" not in takes
    with pytest.raises(MMCacheError) as e:
        load_dataset(name, tmp_path, bogus_option=1)
    msg = str(e.value)
    assert f"dataset {name!r} does not take option(s) ['bogus_option']" in msg
    assert msg.endswith(f"it takes: {', '.join(takes)}" if takes else "it takes no options")
    res = runner.invoke(app, ["show", name, "--data-dir", str(tmp_path), "-o", "zzz=1"])
    assert isinstance(res.exception, MMCacheError) and "['zzz']" in str(res.exception)


def test_declared_options_reach_the_adapter(tmp_path: Path) -> None:
    assert DATASET_OPTIONS["webdataset"] == ["seed", "fold", "label_key", "unpack_dir", "prefix_shard", "metric"]
    assert {"seed", "fold", "label_names", "image_root", "metric", "label_column", "text_column", "image_column",
            "id_column", "split_column"} == set(DATASET_OPTIONS["table"])
    assert set(DATASET_OPTIONS["demo"]) == set(DATASET_OPTIONS["table"]) - {"label_names"}
    assert set(DATASET_OPTIONS["mvsa-single"]) == {"seed", "fold", "skip_missing", "vote"}
    assert set(DATASET_OPTIONS["twitter15"]) == {"seed", "captions"}
    # An option set to None counts as not given.
    write_table(tmp_path / "t.csv", [{"text": "x", "label": "a", "split": "train"}])
    assert load_dataset("table", tmp_path / "t.csv", fold=None, bogus=None).name == "t"


def test_name_as_an_option_points_to_the_name_flag(tmp_path: Path) -> None:
    write_table(tmp_path / "t.csv", [{"text": "x", "label": "a", "split": "train"}])
    res = runner.invoke(app, ["show", "table", "--data-dir", str(tmp_path / "t.csv"), "-o", "name=mine"])
    assert isinstance(res.exception, MMCacheError) and "--name" in str(res.exception)
    res = runner.invoke(app, ["show", "table", "--data-dir", str(tmp_path / "t.csv"), "--name", "mine"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("mine: 1 samples")
