"""mmcache: extract multimodal features once, train small heads on them in seconds."""

from __future__ import annotations

from mmcache.errors import MMCacheError

__version__ = "0.1.0"

__all__ = ["MMCacheError", "__version__"]
