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
