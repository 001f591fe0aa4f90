"""Shared CLI plumbing: user errors as one line, no traceback; the one `KEY=VALUE` option parser."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from typing import Any

from mmcache.errors import MMCacheError, out_of_memory


def _is(error: BaseException, name: str) -> bool:
    """Whether `error` is of a class called `name` (click's classes, vendored or not, by name)."""
    return any(c.__name__ == name for c in type(error).__mro__)


def end_distributed() -> None:
    """Shut down a torch.distributed process group this process still holds (a command run under torchrun), so every
    rank leaves cleanly once the command is done; never imports torch for it."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_app(typer_app: Callable[..., object]) -> None:
    """Run a typer app; a user error prints one line and exits 2, with no traceback. Command-line mistakes that
    click finds (an unknown option, a value of the wrong type, a missing option) are one line too."""
    import typer

    # click's exception base (typer may vendor its own click): the class typer's public BadParameter derives from.
    click_exception: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    try:
        rv = typer_app(standalone_mode=False)  # click's errors come here instead of being drawn in a box
        end_distributed()
        if rv == 130:  # Ctrl-C inside a command (typer turns it into this exit code)
            print("interrupted; committed work is kept, rerun the same command to resume", file=sys.stderr)
        sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)  # as click's standalone mode
    except click_exception as error:
        e: Any = error  # click's exception: show(), format_message(), exit_code, ctx
        if _is(e, "NoArgsIsHelpError"):  # no arguments: the help, as before
            e.show()
            sys.exit(e.exit_code)
        ctx = getattr(e, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if _is(e, "UsageError") and ctx is not None else ""
        message = " ".join(e.format_message().split())  # one line
        print(f"error: {message}{hint}", file=sys.stderr)
        sys.exit(e.exit_code)
    except MMCacheError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; committed work is kept, rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    except OSError as e:  # a full disk, a quota, a read-only folder: one line naming the file
        from mmcache.runfolder import disk_error

        why = disk_error(e)
        if why is None:
            raise
        print(f"error: cannot write {e.filename or 'a file'}: {why}; free space there or choose another folder",
              file=sys.stderr)
        sys.exit(2)
    except (MemoryError, RuntimeError) as e:
        if _is(e, "Abort"):
            print("aborted", file=sys.stderr)
            sys.exit(1)
        oom = out_of_memory(e)
        if oom is None:
            raise
        print(f"error: out of memory ({oom}); use a smaller --batch-size, a smaller head (--D) or a smaller "
              "model", file=sys.stderr)
        sys.exit(2)


# -- KEY=VALUE options: the one parser of every command's `-o`, `--hp`, `--loss-opt`, `PRESET[...]` and `--grid` --


def parse_value(text: str) -> Any:
    """JSON when it parses (1, 0.5, true, null, [1,2], {"a": 1}), else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def split_outside_brackets(text: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside [...] / {...} and "double quotes", so `clip[a=1,b=2],resnet`, JSON lists and a
    quoted `"image,text"` stay whole; items stripped."""
    out, depth, cur, quoted, escaped = [], 0, "", False, False
    for ch in text:
        if quoted:
            quoted = escaped or ch != '"'
            escaped = not escaped and ch == "\\"
        elif ch == '"':
            quoted = True
        else:
            depth += ch in "[{"
            depth -= ch in "]}"
            if ch == sep and depth == 0:
                out.append(cur)
                cur = ""
                continue
        cur += ch
    out.append(cur)
    return [v.strip() for v in out if v.strip()]


def split_kv(item: str, flag: str, example: str | None = None) -> tuple[str, str]:
    """`KEY=VALUE` -> (KEY, VALUE), both stripped (the value may hold '='); an error naming `flag` otherwise."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise MMCacheError(f"{flag}: {item!r} is not KEY=VALUE" + (f" (e.g. {example})" if example else ""))
    return key, value.strip()


def parse_kv(items: Iterable[str] | str | None, flag: str, example: str | None = None) -> dict[str, Any]:
    """`KEY=VALUE` strings -> dict, values parsed by `parse_value`; a key given twice is refused.

    `flag` (`--hp`, `-o`, `--image clip[...]`) and `example` name the option in errors.
    """
    out: dict[str, Any] = {}
    for item in [items] if isinstance(items, str) else items or []:
        key, value = split_kv(item, flag, example)
        if key in out:
            raise MMCacheError(f"{flag}: {key!r} is given twice ({out[key]!r} and {parse_value(value)!r}); give it once")
        out[key] = parse_value(value)
    return out


def given_options(ctx: Any) -> set[str]:
    """Parameter names of the running command (`ctx`: its typer.Context) that the user gave, on the command line or
    through an environment variable, as opposed to left at their defaults: a flag set to its default value
    counts as given."""
    return {name for name in ctx.params
            if getattr(ctx.get_parameter_source(name), "name", None) in ("COMMANDLINE", "ENVIRONMENT")}


# ---------------------------------------------------------------- command-line options from a config's fields


def parse_floats(text: str | None, flag: str) -> list[float] | None:
    """A comma list of numbers, or None when not given."""
    if not text:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise MMCacheError(f"{flag} expects a comma list of numbers, got {text!r}") from None


def dataset_callback(value: Any) -> Any:
    """`--dataset`: one folder name (the runs and cache folders are named after it)."""
    from mmcache.runfolder import name_option

    return name_option("--dataset", "demo")(value)


def run_name_callback(value: Any) -> Any:
    """`--run-name`: one folder name."""
    from mmcache.runfolder import name_option

    return name_option("--run-name")(value)


def _from_cli(kind: str, value: Any, flag: str) -> Any:
    """A flag's typed value as its config field takes it (`Option.cli` says how the flag reads it)."""
    if kind == "kv":
        return parse_kv(value, flag)
    if kind == "upsample":
        from mmcache.data.combined import parse_upsample

        return parse_upsample(value)
    if kind == "floats":
        return parse_floats(value, flag)
    if kind == "comma":
        return None if value is None else [x.strip() for x in value.split(",") if x.strip()]
    if kind == "repeat":
        return list(value) if value else None
    return value


def _cli_param(f: Any, hint: Any) -> Any:
    """The typer parameter of config field `f` (annotation `hint`)."""
    import dataclasses
    import inspect
    from typing import Annotated

    import typer

    from mmcache.engine.config import default_of, option_of

    opt = option_of(f)
    flag = opt.flag or "--" + f.name.replace("_", "-")
    default = default_of(f)
    if opt.cli in ("kv", "upsample", "repeat"):
        tp: Any = list[str] | None
        default = None
    elif opt.cli in ("floats", "comma"):
        tp, default = str | None, None
    else:
        tp = hint
    if default is dataclasses.MISSING:  # a required field: --config FILE may give it instead
        tp, default = hint | None, None
    decls = [f"{flag}/--no-{flag[2:]}" if tp is bool and default is True else flag, *opt.aliases]
    callback = None
    if opt.callback:
        import importlib

        mod, _, name = opt.callback.partition(":")
        callback = getattr(importlib.import_module(mod), name)
    info = typer.Option(*decls, help=opt.help, callback=callback, show_default=default not in (None, False))
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[tp, info], default=default)


class ConfigOptions:
    """What a command's generated options give (`config_options`): `values` (field -> value: the flags typed, over
    the `--config` file's values, over the flags' defaults), `given` (the fields typed on the command line), `file`
    (the `--config` file's values, {} without one)."""

    def __init__(self, cls: Any, values: dict[str, Any], given: set[str], file: dict[str, Any]) -> None:
        self.cls, self.values, self.given, self.file = cls, values, given, file

    def merged(self, name: str, typed: dict[str, Any]) -> dict[str, Any]:
        """A table field set by several flags (the stores, the head's hyperparameters): the file's entries, then
        those of `values`, then `typed` (the command's own flags)."""
        return {**(self.file.get(name) or {}), **(self.values.get(name) or {}), **typed}

    def config(self, **fields: Any) -> Any:
        """The config: `values`, then `fields` (the command's own flags, the tables it merged)."""
        values = {**self.values, **fields}
        if values.get("dataset") is None:
            raise MMCacheError("Missing option '--dataset'. Give it, or --config FILE of a run.")
        return self.cls(**values)


def config_options(cls: Any, skip: Iterable[str] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator adding `cls`'s fields to a typer command as options, one per field (its flag, help and default
    from the field's `Option`; fields with `cli="none"`, those in `skip` and those the command declares itself are
    left out), plus `--config FILE` (a run's config.json or a TOML file: the same run again, flags typed beside
    it override). The command receives them as one argument, `options` (a `ConfigOptions`)."""
    import dataclasses
    import functools
    import inspect
    import typing
    from pathlib import Path
    from typing import Annotated

    import typer

    from mmcache.engine.config import load_config_file, option_of

    skipped = set(skip)

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        declared = inspect.signature(fn, eval_str=True).parameters
        wants_ctx = "ctx" in declared
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in declared.values()
               if p.name not in ("options", "ctx")]
        own_names = {p.name for p in own}
        hints = typing.get_type_hints(cls)
        fields = [f for f in dataclasses.fields(cls) if option_of(f).cli != "none" and f.name not in skipped
                  and f.name not in own_names]
        generated = [_cli_param(f, hints[f.name]) for f in fields]
        config_param = inspect.Parameter(
            "config", inspect.Parameter.KEYWORD_ONLY, default=None,
            annotation=Annotated[Path | None, typer.Option(help="A run's config.json (or a TOML file of options): "
                                                                "the same run again; flags given beside it override "
                                                                "(its run name, --overwrite and --quiet are not "
                                                                "taken).")])
        ctx_param = inspect.Parameter("config_context", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
        params = [ctx_param, *generated, *own, config_param]

        @functools.wraps(fn)
        def command(**kw: Any) -> Any:
            ctx = kw.pop("config_context")
            typed = {n for n in kw if getattr(ctx.get_parameter_source(n), "name", None)
                     in ("COMMANDLINE", "ENVIRONMENT")}
            path = kw.pop("config")
            file = load_config_file(path, cls) if path is not None else {}
            values = dict(file)
            for f in fields:
                raw = kw.pop(f.name)
                opt = option_of(f)
                if f.name in typed or f.name not in file:
                    values[f.name] = _from_cli(opt.cli, raw, opt.flag or "--" + f.name.replace("_", "-"))
            given = {f.name for f in fields if f.name in typed}
            if wants_ctx:
                kw["ctx"] = ctx
            return fn(**kw, options=ConfigOptions(cls, values, given, file))

        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate
