"""mmcache: extract multimodal features once, train small heads on them in seconds."""

from __future__ import annotations

from mmcache.errors import MMCacheError

__version__ = "0.1.0"

__all__ = ["MMCacheError", "Predictor", "__version__"]


def __getattr__(name: str) -> object:
    # `from mmcache import Predictor` without importing torch on `import mmcache`.
    if name == "Predictor":
        from mmcache.predict import Predictor

        return Predictor
    raise AttributeError(f"module 'mmcache' has no attribute {name!r}")
