"""Contract 4: a head maps named feature arrays per modality to logits per task.

`features` is `{modality: {"pooled": [B,d], "tokens": [B,T,d], "mask": [B,T], ...}}`:
the same arrays the stores hold, whether they come from the cache or a live encoder.
A modality absent from `features` is treated as missing (the head must still run).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mmcache.errors import MMCacheError, out_of_memory
from mmcache.registry import Registry

Features = dict[str, dict[str, torch.Tensor]]
# modality -> array name -> per-row shape (without the batch dim), e.g. {"image": {"pooled": (512,)}}
InputSpec = dict[str, dict[str, tuple[int, ...]]]


class Head(nn.Module):
    """Base class of fusion heads; subclasses implement `forward(features) -> {task: logits}`."""

    name: str = ""
    # Size hyperparameters that must be whole numbers >= 1 (a width, a count of heads, layers or bands).
    positive: tuple[str, ...] = ()

    def __init__(self, inputs: InputSpec, tasks: dict[str, int], **hparams: Any) -> None:
        super().__init__()
        self.inputs = {m: {k: tuple(v) for k, v in d.items()} for m, d in inputs.items()}
        self.tasks = dict(tasks)
        self.hparams = dict(hparams)

    @property
    def config(self) -> dict[str, Any]:
        """JSON-able config that rebuilds this head with `build_head(**config)`."""
        return {"name": self.name, "inputs": {m: {k: list(v) for k, v in d.items()} for m, d in self.inputs.items()},
                "tasks": self.tasks, "hparams": self.hparams}

    def forward(self, features: Features) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """Logits per task, each [B, num_classes]."""
        raise NotImplementedError


def skip_removed_keys(module: nn.Module, removed: Callable[[str], bool]) -> None:
    """Let `module` load state dicts saved before some parameters were left out of its build because
    they could not learn (their gradient is always zero): keys under the module's prefix that it
    lacks and `removed(name)` matches are skipped; the outputs are unchanged."""

    def hook(mod: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        own = set(mod.state_dict(keep_vars=True))
        for key in [k for k in state_dict if k.startswith(prefix)]:
            name = key[len(prefix):]
            if name not in own and removed(name):
                del state_dict[key]

    module.register_load_state_dict_pre_hook(hook)


HeadClass = type[Head]


def _import_heads() -> None:
    import mmcache.heads.builtin  # noqa: F401  (heads register on import)


HEADS: Registry[HeadClass] = Registry("head", _import_heads)


def register_head(name: str) -> Callable[[HeadClass], HeadClass]:
    """Decorator registering a Head subclass under `name` (`--head NAME`)."""

    def deco(cls: HeadClass) -> HeadClass:
        cls.name = name
        return HEADS.add(name, cls)

    return deco


def build_head(name: str, inputs: InputSpec, tasks: dict[str, int], hparams: dict[str, Any] | None = None) -> Head:
    """Build registered head `name` for these inputs and tasks."""
    cls = HEADS.get(name)
    check_hparams(name, cls, hparams or {})
    try:
        return cls(inputs, tasks, **(hparams or {}))
    except (TypeError, ValueError, ZeroDivisionError) as e:  # a value the checks above cannot see is wrong
        given = ", ".join(f"{k}={v!r}" for k, v in (hparams or {}).items()) or "its defaults"
        raise MMCacheError(f"head {name!r} cannot be built with {given}: {type(e).__name__}: "
                           f"{' '.join(str(e).split())}") from None
    except (MemoryError, RuntimeError) as e:
        oom = out_of_memory(e)
        if oom is None:
            raise
        given = ", ".join(f"{k}={v!r}" for k, v in (hparams or {}).items()) or "its defaults"
        raise MMCacheError(f"head {name!r} ({given}) does not fit in memory ({oom}); use a smaller D "
                           "(or fewer layers / heads)") from None


def head_defaults(cls: HeadClass) -> dict[str, Any]:
    """The hyperparameters head class `cls` takes, with their defaults (from its constructor)."""
    import inspect

    sig = inspect.signature(cls.__init__)
    return {k: p.default for k, p in sig.parameters.items()
            if k not in ("self", "inputs", "tasks") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_hparams(name: str, cls: HeadClass, hparams: dict[str, Any]) -> None:
    """Refuse, in one line, a hyperparameter the head does not take, a value of the wrong type (the type of
    its default), a negative size or count, or a dropout outside [0, 1)."""
    known = head_defaults(cls)
    listing = ", ".join(f"{k}={v!r}" for k, v in known.items())
    unknown = sorted(k for k in hparams if k not in known)
    if unknown:
        raise MMCacheError(f"head {name!r}: unknown hyperparameters {unknown}; it takes: {listing}")
    for key, value in hparams.items():
        if key in cls.positive and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise MMCacheError(f"head {name!r}: {key} must be a whole number >= 1, got {value!r} "
                               f"(default {known[key]!r})")
        default = known[key]
        ok = True
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
            if ok and "dropout" in key:
                ok = 0.0 <= value < 1.0
            elif ok:
                ok = value >= 0
        elif isinstance(default, str):
            ok = isinstance(value, str)
        if not ok:
            want = ("true or false" if isinstance(default, bool) else "a whole number >= 0" if isinstance(default, int)
                    else "a number in [0, 1)" if "dropout" in key else "a number >= 0" if isinstance(default, float)
                    else "a string")
            raise MMCacheError(f"head {name!r}: {key} must be {want}, got {value!r} (default {default!r})")
