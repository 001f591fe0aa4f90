"""The store's spec hash: stable values (existing stores keep resuming), and no extractor layer to write a store."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mmcache.cache.spec import canonical_spec, spec_hash

ROOT = Path(__file__).resolve().parents[2]


def test_spec_hash_values_are_pinned_and_equal_for_the_stored_form() -> None:
    spec = {"preset": "clip-tiny", "family": "clip", "modality": "image", "seed": 0, "size": (32, 32), "w": 1.5}
    # Values computed by earlier versions: a changed hash would orphan every store on disk.
    assert spec_hash(spec) == "43b15fc8a9a685a2"
    assert spec_hash({}) == "44136fa355b3678a"
    stored = canonical_spec(spec)
    assert stored["size"] == [32, 32] and list(stored) == sorted(spec)
    assert spec_hash(stored) == spec_hash(spec)
    assert spec_hash({**spec, "w": 1.25}) != spec_hash(spec)
    assert canonical_spec({"p": Path("/w/a.bin")}) == {"p": "/w/a.bin"}


def test_extractor_spec_hash_is_the_store_hash() -> None:
    from mmcache.extract.base import Extractor

    class Toy(Extractor):
        family = "toy"
        modalities = ("image",)

    ext = Toy("toy", {"size": (8, 8)}, "image")
    assert ext.spec_hash() == spec_hash(ext.spec)


def test_writing_and_reading_a_store_imports_no_extractor_or_torch(tmp_path: Path) -> None:
    code = (
        "import sys, numpy as np\n"
        "from mmcache.cache.store import FeatureStore, StoreReader\n"
        f"p = {str(tmp_path / 's.h5')!r}\n"
        "with FeatureStore(p, {'preset': 'toy', 'size': (2, 2)}, 'toy', dtype='float32') as st:\n"
        "    st.write(['a', 'b'], {'pooled': np.ones((2, 3), dtype=np.float32)})\n"
        "r = StoreReader(p)\n"
        "print(r.ids, r.attrs['spec_hash'], sorted(m for m in ('torch', 'mmcache.extract') if m in sys.modules))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["['a',", "'b']", spec_hash({"preset": "toy", "size": [2, 2]}), "[]"]
