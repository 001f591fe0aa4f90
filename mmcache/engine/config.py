"""The options every trainer shares, each declared once: its default, help text, command-line flag, bounds, choices
and the options it requires or excludes.

`BaseConfig` holds the fields `heads train`, `heads sweep` and `finetune run` share; `TrainConfig`
(`mmcache.heads.train`) and `FinetuneConfig` (`mmcache.finetune.run`) extend it with their own. A field is an
`option(...)`: a dataclass field whose metadata is an `Option`. From it come

- the checks: `BaseConfig.validate` checks every field once (its type from the annotation, its bounds, its
  choices, what it requires and excludes), then calls the subclass's `check` for rules across several fields;
- the command-line flags: `mmcache.cliutil.config_options` generates a command's typer options from the fields,
  so the three commands share names, help and checks;
- `--config FILE`: `load_config_file` reads a run's config.json or a TOML file into field values.

Adding a training option is one `option(...)` field (and its use); its flag, help, check and `--config` key follow.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Collection
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from mmcache.errors import MMCacheError

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "plateau", "none")

SET = object()  # `requires=(name, SET)`: the other option must be set (differ from its default), whatever its value


def check_number(name: str, value: Any, low: float, high: float = math.inf, integer: bool = False,
                  low_open: bool = False) -> None:
    """Refuse, in one line naming `name`, a value that is not a finite number in [low, high] (or (low, high] with
    `low_open`; a whole number with `integer`)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        kind = "a whole number" if integer else "a number"
        def fmt(v: float) -> str:
            return str(int(v)) if integer and math.isfinite(v) else f"{v:g}"

        bound = f"{'>' if low_open else '>='} {fmt(low)}" + (f" and <= {fmt(high)}" if high != math.inf else "")
        if low == -math.inf and high == math.inf:
            bound = "(finite)"
        raise MMCacheError(f"{name} must be {kind} {bound}, got {value!r}")


@dataclass(frozen=True)
class Option:
    """What a config field is on the command line and how it is checked.

    `flag`: its option (default `--field-name`), `aliases` more names for it; `label`: how errors name a field that
    has no flag of its own. `low`/`high`/`integer`/`low_open`: bounds (`check_number`; None passes when the field
    may be None). `choices` with `noun`: the values it takes ("unknown optimizer 'x'; choose one of ..."). `requires`:
    (other field, value or SET) it needs when set, `why` what the option does and `add` the fix, in "FLAG WHY: add
    ADD, or drop FLAG". `excludes`: other fields it cannot be set with, in "FLAG WHY; drop one". `cli`: how the flag
    reads its value ("value"; "repeat": a repeatable option, a list; "comma": a comma list; "kv": repeatable
    KEY=VALUE, a dict; "floats": a comma list of numbers; "upsample": repeatable NAME=K) or "none" (no flag: set by
    other flags or from Python). `per_run`: names this run only (its folder, how it prints), not taken from a
    `--config` file. `callback`: a dotted name of a typer callback checking the value.
    """

    help: str
    flag: str | None = None
    aliases: tuple[str, ...] = ()
    label: str | None = None
    low: float | None = None
    high: float = math.inf
    integer: bool = False
    low_open: bool = False
    choices: tuple[str, ...] | None = None
    noun: str | None = None
    requires: tuple[str, Any] | None = None
    why: str = ""
    add: str | None = None
    excludes: tuple[str, ...] = ()
    cli: str = "value"
    per_run: bool = False
    callback: str | None = None


def option(default: Any = MISSING, *, factory: Any = MISSING, **meta: Any) -> Any:
    """A config field with its `Option` (keyword arguments as `Option`'s); `factory` for a mutable default."""
    return field(default=default, default_factory=factory, metadata={"option": Option(**meta)})


def redefault(base: type, name: str, default: Any = MISSING, *, factory: Any = MISSING, **meta: Any) -> Any:
    """`base`'s field `name` again, with a subclass's default (and any `Option` attribute replaced by `meta`)."""
    (f,) = [f for f in dataclasses.fields(base) if f.name == name]
    opt = dataclasses.replace(f.metadata["option"], **meta)
    return field(default=default, default_factory=factory, metadata={"option": opt})


def option_of(f: dataclasses.Field[Any]) -> Option:
    """The `Option` of a config field (a field declared without one gets a bare one)."""
    return f.metadata.get("option") or Option(help="")


def flag_of(f: dataclasses.Field[Any]) -> str:
    """How errors name field `f`: its flag, else its label."""
    opt = option_of(f)
    return opt.flag or opt.label or "--" + f.name.replace("_", "-")


def default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def check_ema(decay: Any, flag: str = "--ema") -> float:
    """`decay` as a float in [0, 1) (0 = no averaging), else a one-line error naming `flag`."""
    ok = isinstance(decay, (int, float)) and not isinstance(decay, bool) and 0 <= decay < 1
    if not ok:
        raise MMCacheError(f"{flag} must be a decay in [0, 1), e.g. 0.999 (0 = off), got {decay!r}")
    return float(decay)


# ---------------------------------------------------------------- types


def type_ok(value: Any, tp: Any) -> bool:
    """Whether `value` has type `tp` (a config annotation); numbers pass (their bounds check them)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(type_ok(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(type_ok(k, args[0]) and type_ok(v, args[1]) for k, v in value.items())
    return True


def describe_type(tp: Any) -> str:
    """`tp` in words, for errors ("a list of strings", "true or false")."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in args if a is not type(None))
    names = {bool: "true or false", str: "a string", int: "a whole number", float: "a number"}
    if tp in names:
        return names[tp]
    if origin is list:
        return f"a list of {describe_type(args[0]).removeprefix('a ')}s"
    if origin is dict:
        return f"a table of names to {describe_type(args[1]).removeprefix('a ')}s"
    return str(tp)


# ---------------------------------------------------------------- the shared config


@dataclass(kw_only=True)
class BaseConfig:
    """The fields every trainer shares (written, with the subclass's, to the run folder as config.json)."""

    # A subclass sets these: its name in errors about --config files, and how its own checks run (`check`).
    command: ClassVar[str] = "train"

    dataset: str = option(help="Dataset name: reads cache/<dataset>/manifest.json and its stores.",
                          callback="mmcache.cliutil:dataset_callback")
    cache_dir: str = option("cache", help="Cache folder.")
    runs_dir: str = option("runs", help="Writes <runs-dir>/<dataset>/<run-name>/.")
    head: str | None = option("linear", help="Head: linear, gated, hateclipper, xattn, scabg, scabg-ref, "
                                             "transformer.")
    head_hparams: dict[str, Any] = option(factory=dict, flag="--hp", cli="kv",
                                          help="Head hyperparameter KEY=VALUE (repeatable; D, dropout, ...).")
    tasks: list[str] | None = option(None, flag="--task", cli="repeat",
                                     help="Task(s) to train (repeatable; default every task of the label space).")
    loss: str = option("ce", help="Criterion: ce, focal, scabg, ...")
    loss_options: dict[str, Any] = option(factory=dict, flag="--loss-opt", cli="kv",
                                          help="Criterion option KEY=VALUE (repeatable).")
    epochs: int = option(50, low=1, integer=True, help="Training epochs.")
    batch_size: int = option(256, low=2, integer=True, help="Batch size (per process).")
    lr: float = option(1e-3, low=0, low_open=True, help="The head's learning rate.")
    weight_decay: float = option(0.0, low=0, help="Weight decay.")
    optimizer: str = option("adam", choices=OPTIMIZERS, noun="optimizer", help="adam, adamw or sgd (momentum 0.9).")
    schedule: str = option("cosine", choices=SCHEDULES, noun="schedule",
                           help="cosine (per step), plateau (halve after 3 flat epochs) or none.")
    warmup: float = option(0.0, low=0, high=1, help="Share of the steps warming the learning rate up (cosine).")
    early_stopping: int = option(0, flag="--patience", low=0, integer=True,
                                 help="Early stopping: epochs without a better val metric (0 off).")
    upsample: dict[str, int] = option(factory=dict, cli="upsample",
                                      help="A cache over several datasets: NAME=K puts that source dataset's train "
                                           "rows K times into each epoch (repeatable).")
    select_metric: str | None = option(None, flag="--select",
                                       help="Val metric choosing the epoch, [task:]metric: accuracy, macro_f1, "
                                            "weighted_f1, auroc, top2_accuracy, loss (default: the dataset's metric).")
    ema: float = option(0.0, help="Decay of an exponential moving average of the weights (e.g. 0.999), "
                                                "evaluated, selected and saved instead of them (0 = off).")
    logit_adjust: float | None = option(None, low=-math.inf,
                                        help="TAU: subtract TAU * log(train class prior) from the logits at "
                                             "evaluation and prediction (Menon et al.; negative TAU adds it; default "
                                             "0, -1 for scabg-ref).")
    seed: int = option(0, low=0, high=2**32 - 1, integer=True, help="Random seed.")
    device: str | None = option(None, help="cpu, cuda, cuda:1 (default: cuda when available).")
    run_name: str | None = option(None, per_run=True, callback="mmcache.cliutil:run_name_callback",
                                  help="Run folder name (default: head, stores, time).")
    overwrite: bool = option(False, per_run=True, help="Reuse an existing --run-name folder.")
    quiet: bool = option(False, aliases=("-q",), per_run=True,
                         help="No progress bar or notes: only the result table and the run folder.")
    track: str | None = option(None, help="Also log to mlflow (MLFLOW_TRACKING_URI) or tensorboard "
                                          "(<runs-dir>/tensorboard/); needs mmcache[track].")

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (inverse of `from_json`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Any:
        """The config of a dict such as a run's config.json: keys that are not fields (the run's `resolved` facts,
        fields of another version) are left out."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in cls.upgrade(dict(obj)).items() if k in names})

    @classmethod
    def upgrade(cls, obj: dict[str, Any]) -> dict[str, Any]:
        """A config dict written by an older version, in this version's fields (a subclass renames its own)."""
        return obj

    def is_set(self, name: str, given: Collection[str] = ()) -> bool:
        """Whether option `name` is set: typed (in `given`) or away from its default."""
        return name in given or getattr(self, name) != default_of(self.__dataclass_fields__[name])

    def validate(self, given: Collection[str] = ()) -> None:
        """Refuse, in one line naming the flag, a field of the wrong type or out of its bounds or choices, an
        option set without one it requires or with one it excludes, then whatever the subclass's `check` refuses.
        `given`: the fields typed on the command line (set even at their default value)."""
        hints = typing.get_type_hints(type(self))
        fields = dataclasses.fields(self)
        for f in fields:
            value, opt = getattr(self, f.name), option_of(f)
            if not type_ok(value, hints[f.name]):
                raise MMCacheError(f"{flag_of(f)} must be {describe_type(hints[f.name])}, got {value!r}")
            if value is None or isinstance(value, bool):
                continue
            if opt.low is not None:
                check_number(flag_of(f), value, opt.low, opt.high, integer=opt.integer, low_open=opt.low_open)
            if opt.choices is not None and value not in opt.choices:
                raise MMCacheError(f"unknown {opt.noun or flag_of(f)} {value!r}; choose one of "
                                   f"{', '.join(opt.choices)}")
        by_name = {f.name: f for f in fields}
        for f in fields:
            opt = option_of(f)
            if not (opt.requires or opt.excludes) or not self.is_set(f.name, given):
                continue
            if opt.requires:
                other, want = opt.requires
                ok = self.is_set(other) if want is SET else getattr(self, other) == want
                if not ok:
                    fix = opt.add or (flag_of(by_name[other]) + ("" if isinstance(want, bool) or want is SET
                                                                  else f" {want}"))
                    raise MMCacheError(f"{flag_of(f)} {opt.why}: add {fix}, or drop {flag_of(f)}")
            for other in opt.excludes:
                if self.is_set(other, given):
                    raise MMCacheError(f"{flag_of(f)} {opt.why}; drop one")
        check_ema(self.ema)
        if self.warmup and self.is_set("warmup", given) and self.schedule != "cosine":
            raise MMCacheError(f"--warmup warms up the cosine schedule; --schedule {self.schedule} has none: drop "
                               "--warmup or use --schedule cosine")
        from mmcache.tracking import require

        require(self.track)
        self.check(given)

    def check(self, given: Collection[str] = ()) -> None:
        """A subclass's rules across several fields (after the per-field checks)."""


# ---------------------------------------------------------------- --config FILE


def load_config_file(path: Path | str, cls: type[BaseConfig]) -> dict[str, Any]:
    """Field values of `cls` from a run's config.json (or any JSON object of fields) or a TOML file, upgraded from
    older versions; the options that name one run only (`per_run`: its folder name, --overwrite, ...) and keys
    that are not fields are left out. A file that cannot be read, or is not a table of options, is refused in
    one line naming it."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MMCacheError(f"--config {p}: cannot read it ({e.__class__.__name__}: {e}); pass a run's config.json "
                           "or a TOML file") from None
    try:
        if p.suffix.lower() == ".toml":
            import tomllib

            obj: Any = tomllib.loads(text)
        else:
            obj = json.loads(text)
    except ValueError as e:
        kind = "TOML" if p.suffix.lower() == ".toml" else "JSON"
        raise MMCacheError(f"--config {p}: not valid {kind} ({e}); pass a run's config.json or a TOML file") from None
    if not isinstance(obj, dict):
        raise MMCacheError(f"--config {p}: expected a table of options (a JSON object or TOML keys), got "
                           f"{type(obj).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    obj = cls.upgrade(dict(obj))
    if "dataset" not in obj and not any(k in fields for k in obj):
        raise MMCacheError(f"--config {p}: none of its keys is an option of `{cls.command}`; pass a run's "
                           "config.json or a TOML file of options (epochs = 10, lr = 0.001, ...)")
    return {k: v for k, v in obj.items() if k in fields and not option_of(fields[k]).per_run}
