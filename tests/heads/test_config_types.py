"""Head sizes, modality choices and config values of the wrong type are one `error:` line, never a traceback
nor a silently degenerate head, from `heads train`, a sweep's grid or Python."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmcache.errors import MMCacheError
from mmcache.heads.base import build_head
from mmcache.heads.sweep import apply_overrides, run_sweep
from mmcache.heads.train import TrainConfig, validate_config
from tests.heads.conftest import run_heads as run

INPUTS = {"image": {"pooled": (6,), "tokens": (3, 6), "mask": (3,)},
          "text": {"pooled": (4,), "tokens": (3, 4), "mask": (3,)}}




@pytest.mark.parametrize(("head", "hparams", "message"), [
    ("gated", {"D": 0}, "head 'gated': D must be a whole number >= 1, got 0"),
    ("xattn", {"D": 0}, "head 'xattn': D must be a whole number >= 1"),
    ("xattn", {"heads": 0}, "head 'xattn': heads must be a whole number >= 1"),
    ("transformer", {"layers": 0}, "head 'transformer': layers must be a whole number >= 1"),
    ("scabg", {"heads": 0}, "head 'scabg': heads must be a whole number >= 1"),
    ("scabg", {"branch_heads": 0}, "head 'scabg': branch_heads must be a whole number >= 1"),
    ("scabg", {"out_dim": 0}, "head 'scabg': out_dim must be a whole number >= 1"),
    ("scabg", {"D": "abc"}, "head 'scabg': D must be a whole number >= 1, got 'abc'"),
    ("scabg-ref", {"D": 0}, "head 'scabg-ref': D must be a whole number >= 1"),
    ("scabg", {"classes": "abc"}, "head 'scabg' cannot be built with classes='abc': ValueError"),
    ("scabg", {"branches": 5}, "head 'scabg' cannot be built with branches=5: TypeError"),
    ("linear", {"modalities": ["image", "image"]}, "names a modality twice"),
    ("linear", {"modalities": [5]}, "must name loaded modalities"),
])
def test_bad_head_hparams_are_one_line(head: str, hparams: dict[str, object], message: str) -> None:
    with pytest.raises(MMCacheError) as e:
        build_head(head, INPUTS, {"label": 3}, hparams)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_linear_keeps_its_zero_width_probe() -> None:
    head = build_head("linear", INPUTS, {"label": 3}, {"D": 0})
    assert sum(p.numel() for p in head.parameters()) == (6 + 4) * 3 + 3  # logistic regression on the features


@pytest.mark.parametrize(("overrides", "message"), [
    ({"head": [1]}, "--head must be a string, got [1]"),
    ({"loss": ["ce"]}, "--loss must be a string"),
    ({"select": 5}, "--select must be a string, got 5"),
    ({"teacher": 5}, "--teacher must be a string"),
    ({"dataset": 5}, "--dataset must be a string"),
    ({"class_weights": "yes"}, "--class-weights must be true or false, got 'yes'"),
    ({"oversample": 1}, "--oversample must be true or false, got 1"),
    ({"tasks": "label"}, "--task must be a list of strings, got 'label'"),
    ({"text": [1]}, "the stores (--vtype/--ttype/...) must be a table of names to strings"),
    ({"use": ","}, "--use must name one or more loaded modalities"),
    ({"use": 5}, "--use must name one or more loaded modalities"),
    ({"use": "image", "ablation": 1}, "--ablation 1 and --use image both choose the modalities"),
])
def test_config_values_of_the_wrong_type_are_refused(overrides: dict[str, object], message: str) -> None:
    cfg = apply_overrides(TrainConfig(dataset="toy", modalities={"image": "feat", "text": "feat"}), overrides)
    with pytest.raises(MMCacheError) as e:
        validate_config(cfg)
    assert message in str(e.value)


def test_a_wrongly_typed_grid_value_fails_its_row_only(toy_cache: Path, tmp_path: Path) -> None:
    base = TrainConfig(dataset="toy", modalities={"image": "feat", "text": "feat"}, cache_dir=str(toy_cache),
                       runs_dir=str(tmp_path / "runs"), epochs=1, head_hparams={"D": 4})
    rows = run_sweep(base, [("ok", {}), ("bad", {"head": ["linear"]}), ("worse", {"oversample": "yes"})], [0])
    by = {r["config"]: r for r in rows}
    assert "val_accuracy" in by["ok"]
    assert by["bad"]["error"] == "--head must be a string, got ['linear']"
    assert by["worse"]["error"] == "--oversample must be true or false, got 'yes'"


@pytest.mark.parametrize(("extra", "message"), [
    (["--head", "gated", "--D", "0"], "head 'gated': D must be a whole number >= 1, got 0"),
    (["--use", "image,image"], "--use (modalities) names a modality twice"),
    (["--use", ","], "--use must name one or more loaded modalities"),
    (["--use", "image", "--ablation", "1"], "--ablation 1 and --use image both choose the modalities"),
    (["--hp", "modalities=5"], "--use must name one or more loaded modalities, e.g. image,text; got 5"),
])
def test_train_cli_refuses_degenerate_heads(toy_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str], extra: list[str], message: str) -> None:
    rc = run(["train", "--dataset", "toy", "--vtype", "feat", "--ttype", "feat", "--cache-dir", str(toy_cache),
              "--runs-dir", str(tmp_path / "runs"), "--epochs", "1", *extra], monkeypatch)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert not (tmp_path / "runs").exists()


def test_a_val_split_without_labels_is_named_as_the_cause(toy_cache: Path, tmp_path: Path) -> None:
    from mmcache.heads.train import train
    from tests.heads.conftest import unlabel_split

    unlabel_split(toy_cache, "val")
    for solver, hparams in (("adam", {"D": 4}), ("lbfgs", {})):
        cfg = TrainConfig(dataset="toy", modalities={"image": "feat"}, cache_dir=str(toy_cache), epochs=1,
                          solver=solver, head_hparams=hparams, save=False, quiet=True)
        with pytest.raises(MMCacheError, match="the val split of 'toy' has no labelled row of task 'label'"):
            train(cfg)
