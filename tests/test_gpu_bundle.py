"""bench/gpu_bundle.py's packer: parts that each stay under the carry limit and unpack on their own."""
from __future__ import annotations

import importlib.util
import os
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bundle():
    spec = importlib.util.spec_from_file_location("gpu_bundle", ROOT / "bench" / "gpu_bundle.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _site(root: Path) -> Path:
    """A site folder of packages whose bytes do not compress (so part sizes are about their sizes)."""
    site = root / "site"
    for name, kib in (("big", 400), ("mid", 300), ("small", 200), ("tiny", 20)):
        pkg = site / name
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text(f"NAME = {name!r}\n")
        (pkg / "data.bin").write_bytes(os.urandom(kib * 1024))
    (site / "loose.py").write_text("X = 1\n")
    (site / "big-1.0.dist-info").mkdir()
    (site / "big-1.0.dist-info" / "METADATA").write_text("Name: big\n")
    return site


def test_every_part_fits_the_limit_and_unpacks_on_its_own(tmp_path):
    gb = _bundle()
    site = _site(tmp_path)
    limit = 600 * 1024
    parts = gb.pack(site, tmp_path / "out", limit)
    assert len(parts) >= 2 and all(p["bytes"] <= limit for p in parts)
    assert all(Path(p["file"]).stat().st_size == p["bytes"] for p in parts)
    files = sorted(str(f.relative_to(site)) for f in site.rglob("*") if f.is_file())
    held = sorted(str(f.relative_to(site)) for p in parts for e in p["entries"]
                  for f in ((site / e).rglob("*") if (site / e).is_dir() else [site / e]) if f.is_file())
    assert held == files  # every file in exactly one part
    for p in parts:  # each part alone: the packages it holds, byte for byte
        dest = tmp_path / "unpacked" / Path(p["file"]).stem
        with tarfile.open(p["file"], "r:xz") as tf:
            tf.extractall(dest, filter="data")
        for e in p["entries"]:
            for f in (site / e).rglob("*") if (site / e).is_dir() else [site / e]:
                if f.is_file():
                    assert (dest / f.relative_to(site)).read_bytes() == f.read_bytes()


def test_a_package_larger_than_a_part_travels_as_its_parts(tmp_path):
    """A package that compresses to more than a part is split into its files and folders; a single file
    that large is refused."""
    gb = _bundle()
    site = _site(tmp_path)
    (site / "big" / "more.bin").write_bytes(os.urandom(300 * 1024))
    parts = gb.pack(site, tmp_path / "out", 450 * 1024)
    assert all(p["bytes"] <= 450 * 1024 for p in parts)
    assert {"big/data.bin", "big/more.bin", "big/__init__.py"} <= {e for p in parts for e in p["entries"]}
    with pytest.raises(SystemExit, match="data.bin alone compresses"):
        gb.pack(site, tmp_path / "out2", 350 * 1024)
