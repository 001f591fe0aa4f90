"""The console scripts as click commands, for the generated CLI reference of the documentation.

`docs/reference/cli.md` renders these at build time, so the reference is always the code's own `--help`.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import typer

from mmcache.cli import app as _mmcache_app
from mmcache.finetune.cli import app as _finetune_app
from mmcache.heads.cli import app as _heads_app

_full = typer.main.get_command(_mmcache_app)

#: `mmcache` without its `heads` and `finetune` groups, which are documented as their own commands.
mmcache = copy.copy(_full)
mmcache.commands = {name: cmd for name, cmd in _full.commands.items()  # type: ignore[attr-defined]
                    if name not in ("heads", "finetune")}
#: `heads` (also `mmcache heads`).
heads = typer.main.get_command(_heads_app)
#: `finetune` (also `mmcache finetune`).
finetune = typer.main.get_command(_finetune_app)

_NOTE = r"\s*\[(default: [^\]]*|required)\]"  # click's notes, shown in their own column
COMMANDS = {"mmcache": mmcache, "heads": heads, "finetune": finetune}


def _escape(text: str) -> str:
    """Markdown for a help text: `<`, `>`, `|` and `*` escaped outside code spans, one line."""
    text = " ".join(text.split())
    parts = text.split("`")
    for i in range(0, len(parts), 2):  # outside backticks
        parts[i] = (parts[i].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
                    .replace("*", "\\*").replace("_", "\\_"))
    if len(parts) % 2 == 0:  # an unmatched backtick: keep it literal
        parts[-2] += "\\`" + parts.pop()
    return "`".join(parts).replace("|", "\\|")


def _default(param, ctx) -> str:  # type: ignore[no-untyped-def]
    if param.required:
        return "required"
    try:
        value = param.get_default(ctx, call=False)
    except Exception:  # pragma: no cover - a default that cannot be shown
        return ""
    if callable(value) or value is None or value == () or value == []:
        return ""
    if isinstance(value, bool) and param.secondary_opts:
        return f"`{(param.opts if value else param.secondary_opts)[0]}`"
    if isinstance(value, bool):
        return "on" if value else ""
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    return f"`{value}`"


def markdown(prog: str, command=None, level: int = 2) -> str:  # type: ignore[no-untyped-def]
    """The reference of `prog` (a key of COMMANDS, or a command path such as `heads train`) as markdown:
    for each command its help, usage and a table of its options, subcommands after their group."""
    if command is None:
        head, *rest = prog.split()
        command = COMMANDS[head]
        for name in rest:
            command = command.commands[name]
    ctx = command.make_context(prog, [], resilient_parsing=True)
    out = [f"{'#' * level} `{prog}`", ""]
    if command.help:
        paragraphs = command.help.split("\f")[0].strip().split("\n\n")
        out += [line for para in paragraphs for line in (_escape(para), "")]
    pieces = command.collect_usage_pieces(ctx)
    out += ["```text", f"{prog} {' '.join(pieces)}".rstrip(), "```", ""]
    args: list[Any] = []
    opts: list[Any] = []
    for param in command.params:
        record = param.get_help_record(ctx)
        if record is None or getattr(param, "hidden", False):
            continue
        (args if param.param_type_name == "argument" else opts).append((param, record))
    if args:
        out += ["| argument | help |", "|---|---|"]
        out += [f"| `{rec[0]}` | {_escape(re.sub(_NOTE, '', rec[1]).strip())} |" for _, rec in args]
        out.append("")
    opts = [(p, r) for p, r in opts if r[0] != "--help"]
    if opts:
        out += ["| option | default | help |", "|---|---|---|"]
        for param, (names, help_text) in opts:
            help_text = re.sub(_NOTE, "", help_text).strip()
            out.append(f"| `{names}` | {_default(param, ctx)} | {_escape(help_text)} |")
        out.append("")
    subcommands = getattr(command, "commands", {})
    for name, sub in subcommands.items():
        if getattr(sub, "hidden", False):
            continue
        out.append(markdown(f"{prog} {name}", sub, level + 1))
    return "\n".join(out)
