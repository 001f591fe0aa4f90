"""`heads train --upsample NAME=K` on a cache over several datasets: an epoch permutes the pool holding each train
row of source NAME K times (as `finetune run`'s); sweeps equal single runs; names that are not sources are refused."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mmcache.errors import MMCacheError
from mmcache.heads.data import load_cached
from mmcache.heads.train import BatchOrders, TrainConfig, _build_member, _labelled_train, train, train_many

MODS = {"image": "feat", "text": "feat"}


@pytest.fixture
def two_source_cache(make_cache: Callable[..., Path]) -> Path:
    return make_cache(n=300, sources=("mmhs", "fakeddit"))


def cfg(cache: Path, **kw: object) -> TrainConfig:
    b: dict[str, object] = dict(dataset="toy", modalities=dict(MODS), cache_dir=str(cache), epochs=4, batch_size=32,
                                quiet=True, save=False)
    b.update(kw)
    return TrainConfig(**b)  # type: ignore[arg-type]


def test_an_epoch_draws_each_row_of_the_upsampled_source_k_times(two_source_cache: Path) -> None:
    data = load_cached("toy", MODS, two_source_cache)
    train_idx = _labelled_train(data)
    src = {i: "mmhs" if int(data.ids[int(r)][1:]) % 2 == 0 else "fakeddit" for i, r in enumerate(train_idx.tolist())}
    for oversample in (False, True):
        m = _build_member(cfg(two_source_cache, upsample={"mmhs": 3}, oversample=oversample), data)
        orders = BatchOrders([m], data, train_idx)
        n_mmhs = sum(v == "mmhs" for v in src.values())
        assert orders.n == 3 * n_mmhs + (len(train_idx) - n_mmhs)
        (perm,) = orders.epoch().values()
        assert len(perm) == orders.n and int(perm.max()) < len(train_idx)
        if not oversample:  # a permutation of the pool: every row exactly K times
            assert Counter(perm.tolist()) == {i: 3 if s == "mmhs" else 1 for i, s in src.items()}
        else:  # drawn class-balanced from the pool: the upsampled source comes up about 3x as often per row
            share = sum(src[int(p)] == "mmhs" for p in perm.tolist()) / len(perm)
            assert 0.6 < share < 0.9
    without = BatchOrders([_build_member(cfg(two_source_cache), data)], data, train_idx)
    assert without.n == len(train_idx) and without.pool is None


def test_upsampled_configs_in_a_sweep_equal_their_single_runs(two_source_cache: Path) -> None:
    from tests.heads.test_batched_sweep import assert_same

    cfgs = [cfg(two_source_cache, head_hparams={"D": 0}, upsample={"mmhs": 2}, lr=3e-2, seed=s) for s in (0, 1)]
    cfgs += [cfg(two_source_cache, head_hparams={"D": 0}, lr=3e-2),  # no upsampling: its own lockstep group
             cfg(two_source_cache, head_hparams={"D": 8, "dropout": 0.2}, upsample={"fakeddit": 3}, lr=1e-2)]
    batched = train_many(cfgs)
    singles = [train(c) for c in cfgs]
    for a, b in zip(singles, batched, strict=True):
        assert not isinstance(b, MMCacheError)
        assert_same(a, b)
    # Upsampling changes what is trained: the same config without it ends elsewhere.
    w_up = singles[0].head.state_dict()["classifiers.label.weight"]
    w_plain = singles[2].head.state_dict()["classifiers.label.weight"]
    assert not torch.allclose(w_up, w_plain, atol=1e-3)
    assert singles[0].config["upsample"] == {"mmhs": 2}


@pytest.mark.parametrize(("options", "message"), [
    ({"upsample": {"twitter": 2}}, r"^--upsample twitter: not a source dataset of 'toy'; its sources are mmhs, "
                                   r"fakeddit$"),
    ({"upsample": {"mmhs": 0}}, r"^--upsample takes NAME=K with K a whole number from 1 to 1000"),
    ({"upsample": {"mmhs": 10**9}}, r"^--upsample takes NAME=K with K a whole number from 1 to 1000"),
    ({"upsample": {"mmhs": 2}, "solver": "lbfgs"}, r"^--upsample: --solver lbfgs fits full batch"),
])
def test_bad_upsampling_is_one_line(two_source_cache: Path, options: dict[str, object], message: str) -> None:
    with pytest.raises(MMCacheError, match=message):
        train(cfg(two_source_cache, **options))


def test_a_single_dataset_has_no_sources_to_upsample(toy_cache: Path) -> None:
    with pytest.raises(MMCacheError, match=r"--upsample mmhs: not a source dataset of 'toy'; upsampling weights the "
                                           r"datasets of a cache extracted from several"):
        train(cfg(toy_cache, upsample={"mmhs": 2}))


def test_command_line_upsample(two_source_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    import mmcache.heads.train as ht
    from mmcache.heads.cli import main

    seen: list[TrainConfig] = []

    def fake_train(c: TrainConfig) -> object:
        seen.append(c)
        raise SystemExit(0)

    monkeypatch.setattr(ht, "train", fake_train)
    argv = ["heads", "train", "--dataset", "toy", "--vtype", "feat", "--cache-dir", str(two_source_cache), "-q"]
    monkeypatch.setattr(sys, "argv", [*argv, "--upsample", "mmhs=2", "--upsample", "fakeddit=3"])
    with pytest.raises(SystemExit):
        main()
    assert seen and seen[-1].upsample == {"mmhs": 2, "fakeddit": 3}
    monkeypatch.setattr(sys, "argv", [*argv, "--upsample", "mmhs"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    assert "--upsample 'mmhs': write NAME=K with K a whole number from 1 to 1000" in capsys.readouterr().err
