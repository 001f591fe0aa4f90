"""The one registry class: names and aliases, lazy filling, one-line errors with the closest name; and the
registries built on it (datasets, extractor families/presets/decoders, heads, losses)."""

from __future__ import annotations

import pytest

from mmcache.errors import MMCacheError
from mmcache.registry import Registry


def test_register_aliases_lookup_and_mapping_view() -> None:
    reg: Registry[object] = Registry("widget")

    @reg.register("alpha", "a", "first")
    def alpha() -> str:
        return "A"

    reg.add("beta", "B-data")
    assert reg.get("alpha") is alpha and reg["a"] is alpha and reg.get("first") is alpha
    assert reg.canonical("a") == "alpha" and reg.canonical("beta") == "beta"
    assert reg.names() == ["alpha", "beta"] and reg.names(aliases=True) == ["a", "alpha", "beta", "first"]
    assert reg.aliases_of("alpha") == ["a", "first"] and reg.aliases_of("beta") == []
    assert "a" in reg and "beta" in reg and "gamma" not in reg
    assert list(reg) == ["alpha", "beta"] and len(reg) == 2 and sorted(reg) == ["alpha", "beta"]
    assert dict(reg.items()) == {"alpha": alpha, "beta": "B-data"} and list(reg.values())[1] == "B-data"
    assert reg.get("gamma", None) is None and reg.get("gamma", 3) == 3
    # A later entry of the same name replaces the earlier one.
    reg.add("beta", "B2")
    assert reg["beta"] == "B2" and len(reg) == 2


def test_unknown_names_are_one_line_with_the_known_ones_and_the_closest() -> None:
    reg: Registry[int] = Registry("gizmo")
    for i, n in enumerate(("linear", "gated", "xattn")):
        reg.add(n, i)
    reg.add("scabg", 3, "sca")
    with pytest.raises(MMCacheError) as e:
        reg.get("gatd")
    assert str(e.value) == "unknown gizmo 'gatd'; known: gated, linear, sca, scabg, xattn; did you mean 'gated'?"
    with pytest.raises(MMCacheError) as e:
        reg.canonical("zzzzzz")
    assert str(e.value) == "unknown gizmo 'zzzzzz'; known: gated, linear, sca, scabg, xattn"
    with pytest.raises(MMCacheError, match="did you mean 'linear'"):
        reg["Linear"]
    assert "\n" not in str(Registry("empty").unknown("x")) and "(none registered)" in str(Registry("e").unknown("x"))


def test_populate_runs_once_on_first_lookup_never_on_register() -> None:
    calls: list[int] = []

    def populate() -> None:
        calls.append(1)
        reg.add("late", 2)  # the imported modules register into the registry being filled
        assert "late" in reg  # a lookup inside the hook does not run it again

    reg: Registry[int] = Registry("thing", populate)
    reg.add("early", 1)
    assert calls == []
    assert reg.names() == ["early", "late"] and calls == [1]
    assert reg["late"] == 2 and "early" in reg and len(reg) == 2 and calls == [1]


def test_a_failed_populate_is_retried_on_the_next_lookup() -> None:
    calls: list[int] = []

    def populate() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise ImportError("optional module missing")
        reg.add("x", 1)

    reg: Registry[int] = Registry("thing", populate)
    with pytest.raises(ImportError):
        reg.get("x")
    assert reg.get("x") == 1 and calls == [1, 1]


def test_setitem_and_delitem_serve_monkeypatch(monkeypatch: pytest.MonkeyPatch) -> None:
    reg: Registry[str] = Registry("field")
    reg.add("image", "decode-image", "img")
    with monkeypatch.context() as m:
        m.setitem(reg, "image", "patched")  # type: ignore[arg-type]
        m.setitem(reg, "video", "new")  # type: ignore[arg-type]
        assert reg["image"] == "patched" and reg["video"] == "new"
    assert reg["image"] == "decode-image" and "video" not in reg
    del reg["image"]
    assert "img" not in reg and reg.names(aliases=True) == []


def test_project_registries_are_registries_with_clear_errors() -> None:
    from mmcache.data.base import ALIASES, DATASETS, load_dataset
    from mmcache.extract.base import DECODERS, FAMILIES, PRESETS, build_extractor
    from mmcache.heads.base import HEADS, build_head
    from mmcache.heads.losses import CRITERIA, build_criterion

    for reg, kind in ((DATASETS, "dataset"), (FAMILIES, "extractor family"), (PRESETS, "extractor preset"),
                      (DECODERS, "decoder field"), (HEADS, "head"), (CRITERIA, "loss")):
        assert isinstance(reg, Registry) and reg.kind == kind and len(reg) > 0
    assert ALIASES["mvsa"] == "mvsa-single" and DATASETS.canonical("mvsa") == "mvsa-single"
    assert {"clip", "roberta"} <= set(FAMILIES) and PRESETS["clip-tiny"]["family"] == "clip"
    assert {"linear", "gated"} <= set(HEADS) and HEADS["gated"].name == "gated"
    assert set(CRITERIA) == {"ce", "focal", "scabg"}
    with pytest.raises(MMCacheError, match=r"^unknown dataset 'mvsa-singel'; known: .*did you mean 'mvsa-single'\?$"):
        load_dataset("mvsa-singel")
    with pytest.raises(MMCacheError, match=r"^unknown extractor preset 'clip-tny'; known: .*clip-tiny.*"
                                           r"did you mean 'clip-tiny'\?$"):
        build_extractor("clip-tny", "image")
    with pytest.raises(MMCacheError, match=r"^unknown head 'gatd'; known: .*gated.*; did you mean 'gated'\?$"):
        build_head("gatd", {"image": {"pooled": (4,)}}, {"y": 2})
    with pytest.raises(MMCacheError, match=r"^unknown loss 'focl'; known: ce, focal, scabg; did you mean 'focal'\?$"):
        build_criterion("focl", {"y": 2})
