"""heads robustness: conditions evaluated on the run's test split, MultiBench's robustness numbers, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmcache.errors import MMCacheError
from mmcache.heads.metrics import classification_metrics
from mmcache.heads.robustness import effective_robustness, relative_robustness, robustness
from mmcache.heads.train import TrainConfig, load_run, train
from tests.heads.conftest import build_cache


def run(tmp_path: Path, head: str, name: str, **hp: object) -> Path:
    res = train(TrainConfig(dataset="toy", modalities={"image": "feat", "text": "feat"},
                            cache_dir=str(tmp_path / "cache"), runs_dir=str(tmp_path / "runs"), head=head,
                            head_hparams={"D": 8, **hp}, epochs=8, batch_size=64, lr=1e-2, device="cpu", quiet=True,
                            run_name=name))
    assert res.run_dir is not None
    return res.run_dir


def test_multibench_formulas_by_hand() -> None:
    levels = [0.0, 0.5, 1.0]
    assert relative_robustness(levels, [0.9, 0.7, 0.5]) == pytest.approx(0.25 * (0.9 + 0.7) + 0.25 * (0.7 + 0.5))
    assert relative_robustness([0.0, 0.1, 0.2], [1.0, 1.0, 1.0]) == pytest.approx(1.0)  # levels scaled to [0, 1]
    # f = [0.9, 0.8], ref = [0.7, 0.4]: shifted ref = [0.9, 0.6] -> (0) + (0.2)
    assert effective_robustness([0.9, 0.8], [0.7, 0.4]) == pytest.approx(0.2)


def test_robustness_of_a_run(tmp_path: Path) -> None:
    info = build_cache(tmp_path / "cache", n=300, tokens=True)
    d = run(tmp_path, "gated", "g")
    ref = run(tmp_path, "linear", "l")
    out = robustness(d, levels=[0.0, 0.5, 1.0], reference=ref, seed=3)
    rows = {r["condition"]: r for r in out["rows"]}
    metric = out["metric"]
    test = json.loads((d / "metrics.json").read_text())["splits"]["test"]["label"]
    assert rows["clean"][metric] == pytest.approx(test[metric]) and rows["clean"]["n"] == (info["split"] == "test").sum()
    assert rows["noise@0"][metric] == rows["clean"][metric]
    assert set(rows) == {"clean", "noise@0", "noise@0.5", "noise@1", "missing:image", "missing:text"}
    # missing:image by hand: the head on the test rows without the image.
    head, cfg = load_run(d)
    from mmcache.heads.data import load_cached

    data = load_cached("toy", {"image": "feat", "text": "feat"}, tmp_path / "cache", keys=["pooled"], quiet=True)
    idx = data.split_index["test"]
    with torch.no_grad():
        logits = head({"text": data.batch(idx)["text"]})["label"].numpy()
    by_hand = classification_metrics(data.targets["label"][idx].numpy(), logits)[metric]
    assert rows["missing:image"][metric] == pytest.approx(by_hand)
    s = out["summary"]
    vals = [rows[f"noise@{x}"][metric] for x in ("0", "0.5", "1")]
    assert s["noise"]["relative"] == pytest.approx(np.trapezoid(vals, [0, 0.5, 1.0]))
    assert "effective" in s["noise"] and "token_dropout" not in s  # gated reads pooled only
    assert any("token_dropout" in n for n in s["notes"])
    again = robustness(d, levels=[0.0, 0.5, 1.0], reference=ref, seed=3, write=False)
    assert again["rows"] == out["rows"]  # seeded
    for x in ("csv", "md", "json", "png"):
        assert (d / f"robustness.{x}").is_file()


def test_token_dropout_for_a_token_head_and_refusals(tmp_path: Path) -> None:
    build_cache(tmp_path / "cache", n=200, tokens=True)
    d = run(tmp_path, "xattn", "x", heads=2)
    out = robustness(d, levels=[0.0, 1.0], kinds=["token_dropout"])
    rows = {r["condition"]: r for r in out["rows"]}
    assert set(rows) == {"clean", "token_dropout@0", "token_dropout@1"}
    # Every token dropped: every modality is missing, so every row gets the same prediction.
    preds = rows["token_dropout@1"]
    assert preds["n"] == rows["clean"]["n"]
    lin = run(tmp_path, "linear", "lin")
    with pytest.raises(MMCacheError, match="nothing to evaluate.*pooled features only"):
        robustness(lin, kinds=["token_dropout"])
    with pytest.raises(MMCacheError, match="--levels"):
        robustness(lin, levels=[0.5, 2.0])
    ft = tmp_path / "ft"
    ft.mkdir()
    (ft / "config.json").write_text(json.dumps({"encoders": {"image": "clip"}, "dataset": "toy"}))
    with pytest.raises(MMCacheError, match="finetune run"):
        robustness(ft)
