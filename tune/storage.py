"""Where experiments live: a local/NFS directory or an S3-compatible URI (``s3://bucket/path``).

Ray Tune writes trial results and checkpoints to either. bitsearch's own files (``bitsearch.json``,
the report) go next to them; reading a remote experiment (report, compare, sync, resume) works on a
local mirror in ``~/.cache/bitsearch/experiments`` and uploads what it writes. S3 endpoint and
credentials come from the usual AWS variables (AWS_ENDPOINT_URL for MinIO and other S3-compatible
stores, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

# pyarrow is imported where remote storage is used: local experiments never need it.


def is_remote(uri: str | os.PathLike) -> bool:
    s = str(uri)
    return "://" in s and not s.startswith("file://")


def normalize(uri: str | os.PathLike) -> str:
    """A URI without its trailing slash, or an absolute local path."""
    return str(uri).rstrip("/") if is_remote(uri) else str(Path(uri).expanduser().resolve())


def join(base: str | os.PathLike, name: str) -> str:
    if is_remote(base):
        return f"{str(base).rstrip('/')}/{name}"
    return str(Path(base).expanduser().resolve() / name)


def _fs(uri: str):
    import pyarrow.fs as pafs
    return pafs.FileSystem.from_uri(uri)


def exists(uri: str) -> bool:
    if not is_remote(uri):
        return Path(uri).exists()
    import pyarrow.fs as pafs
    fs, p = _fs(uri)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def read_text(uri: str) -> str:
    if not is_remote(uri):
        return Path(uri).read_text()
    fs, p = _fs(uri)
    with fs.open_input_stream(p) as f:
        return f.read().decode()


def write_text(uri: str, text: str) -> None:
    if not is_remote(uri):
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        Path(uri).write_text(text)
        return
    fs, p = _fs(uri)
    with fs.open_output_stream(p) as f:
        f.write(text.encode())


def local_copy(uri: str) -> Path:
    """The experiment as a local directory: itself, or a fresh mirror of the remote one."""
    if not is_remote(uri):
        return Path(uri)

    import pyarrow.fs as pafs
    root = Path(os.environ.get("BITSEARCH_CACHE") or Path.home() / ".cache" / "bitsearch") / "experiments"
    dst = root / hashlib.sha256(uri.encode()).hexdigest()[:16]
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    fs, p = _fs(uri)
    pafs.copy_files(p, str(dst), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return dst


def upload(files: list[str], uri: str) -> None:
    """Copy local files into the remote experiment directory (no-op for a local one)."""
    if not is_remote(uri):
        return
    import pyarrow.fs as pafs
    fs, p = _fs(uri)
    for f in files:
        pafs.copy_files(f, f"{p}/{Path(f).name}", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
