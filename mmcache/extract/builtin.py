"""The built-in decoders, extractor families and presets: importing this module registers them all (and torch)."""

from __future__ import annotations

import mmcache.extract.clip  # noqa: F401
import mmcache.extract.decode  # noqa: F401
import mmcache.extract.frcnn  # noqa: F401
import mmcache.extract.media  # noqa: F401
import mmcache.extract.mel  # noqa: F401
import mmcache.extract.r3d  # noqa: F401
import mmcache.extract.resnet  # noqa: F401
import mmcache.extract.roberta  # noqa: F401
import mmcache.extract.teachers  # noqa: F401
import mmcache.extract.visualbert  # noqa: F401
