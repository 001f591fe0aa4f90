"""The one `KEY=VALUE` parser behind `-o`, `--hp`, `--loss-opt`, `PRESET[key=value,...]` and `--grid`."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmcache.cliutil import parse_kv, parse_value, split_kv, split_outside_brackets
from mmcache.errors import MMCacheError


def test_values_are_json_when_they_parse_else_text() -> None:
    assert [parse_value(v) for v in ("1", "0.5", "true", "null", "[1,2]", '{"a": 1}', "softmax", "", "1e-3")] == [
        1, 0.5, True, None, [1, 2], {"a": 1}, "softmax", "", 0.001]


def test_commas_inside_brackets_stay_whole() -> None:
    assert split_outside_brackets("clip[a=1,b=2], resnet ,x={\"k\": [1,2]},,") == [
        "clip[a=1,b=2]", "resnet", 'x={"k": [1,2]}']


def test_parse_kv_values_keys_and_errors_naming_the_flag() -> None:
    assert parse_kv(["a=1", "b=0.5", " c = true ", "d=[1,2]", "e=softmax", "path=a=b.json"], "--hp") == {
        "a": 1, "b": 0.5, "c": True, "d": [1, 2], "e": "softmax", "path": "a=b.json"}
    assert parse_kv(None, "--hp") == {} and parse_kv("k=v", "-o") == {"k": "v"}
    assert split_kv("head = linear,gated", "--grid") == ("head", "linear,gated")
    for bad in ("D", "=3", " =3"):
        with pytest.raises(MMCacheError) as e:
            parse_kv([bad], "--loss-opt", "--loss-opt gamma=2")
        assert str(e.value) == f"--loss-opt: {bad!r} is not KEY=VALUE (e.g. --loss-opt gamma=2)"
    with pytest.raises(MMCacheError, match=r"^-o: 'seed' is given twice \(1 and 2\); give it once$"):
        parse_kv(["seed=1", "seed=2"], "-o")


def test_every_command_parses_options_the_same_way() -> None:
    from mmcache.data.cli import dataset_options
    from mmcache.heads.sweep import parse_grid

    assert dataset_options(None, None, None, ["vote=[1,2]"]) == {"vote": [1, 2]}
    assert parse_grid("head = linear,gated; lr=1e-3") == {"head": ["linear", "gated"], "lr": [0.001]}
    with pytest.raises(MMCacheError, match=r"^--grid: 'head' is not KEY=VALUE"):
        parse_grid("head")
    with pytest.raises(MMCacheError, match=r"^-o: 'x' is not KEY=VALUE"):
        dataset_options(None, None, None, ["x"])


def test_a_command_ends_the_process_group_it_leaves_behind(tmp_path: Path) -> None:
    """Under torchrun a command's exit shuts its process group down on every rank (a clean leave, not a peer
    whose connection just closes); nothing happens without one."""
    import torch.distributed as dist

    from mmcache.cliutil import end_distributed

    end_distributed()  # no group: nothing to do
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    assert dist.is_initialized()
    end_distributed()
    assert not dist.is_initialized()
