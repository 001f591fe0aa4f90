"""The built-in heads: importing this module registers them all (and torch)."""

from __future__ import annotations

import mmcache.heads.gated  # noqa: F401
import mmcache.heads.hateclipper  # noqa: F401
import mmcache.heads.linear  # noqa: F401
import mmcache.heads.scabg  # noqa: F401
import mmcache.heads.transformer  # noqa: F401
import mmcache.heads.xattn  # noqa: F401
