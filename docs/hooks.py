"""MkDocs hook: `<!-- cli PROG -->` on a line of its own becomes the generated reference of PROG
(`mmcache`, `heads`, `finetune`, or a command path such as `heads train`), built from the typer apps."""

from __future__ import annotations

import re

_MARKER = re.compile(r"^<!-- cli (?P<prog>[a-z][a-z -]*?) -->$", re.M)


def on_page_markdown(markdown: str, **kwargs: object) -> str:
    if "<!-- cli " not in markdown:
        return markdown
    from mmcache import clidoc

    return _MARKER.sub(lambda m: clidoc.markdown(m.group("prog")), markdown)
