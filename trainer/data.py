"""CIFAR-10 as whole uint8 tensors in memory, with batched augmentation.

Sources (``load_dataset(path)``):
  * a torchvision root (``cifar-10-batches-py`` inside it; downloaded there when allowed),
  * an image-folder tree ``train/<class>/*`` and ``test/<class>/*`` (class order = sorted names),
    the tree itself or a single folder holding it,
  * a ``.tar`` / ``.tar.gz`` of such a tree (read without unpacking to disk).

Decoded images are cached as uint8 tensors (``~/.cache/bitsearch`` or ``$BITSEARCH_CACHE``) keyed by the
source's path, size and modification time, so the second start skips decoding.

Images must be 32x32: other sizes are refused with the file named (resizing would silently change
the benchmark). Grayscale/RGBA images are converted to RGB.

Augmentation equals torchvision's RandomCrop(32, padding=4) (zero padding) + RandomHorizontalFlip(0.5)
+ ToTensor + Normalize(mean, std), computed for a whole batch at once (see ``crop_flip``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

# torchvision is imported where a torchvision root is read (_read_torchvision): it is slow to import, and the
# image-folder and archive sources never need it.

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff"}
LOCAL_COPY_HINT = (
    "pass a local copy with --data PATH: a torchvision CIFAR-10 root, an image-folder tree "
    "(train/<class>/*, test/<class>/*) or a .tar/.tar.gz of one"
)


class DataError(RuntimeError):
    """The data source is missing, unreadable or malformed; the message says what and how to fix it."""


@dataclass
class Dataset:
    """Whole CIFAR-style dataset. Images uint8 [N, 3, 32, 32], labels int64 [N]."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]
    source: str
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def with_train_subset(self, k: int, seed: int = 0) -> "Dataset":
        """The same validation and test images, training on a stratified subset of ``k`` images."""
        if k >= len(self.train_y):
            return self
        if k < self.num_classes:
            raise DataError(f"subset={k} is too small: need at least one image per class ({self.num_classes})")
        idx = stratified_indices(self.train_y, k, torch.Generator().manual_seed(seed))
        return dataclasses.replace(self, train_x=self.train_x[idx], train_y=self.train_y[idx])

    def summary(self) -> dict:
        return {"source": self.source, "classes": list(self.classes), "train": len(self.train_y),
                "val": 0 if self.val_y is None else len(self.val_y), "test": len(self.test_y)}


# ----------------------------------------------------------------------------------------------
# loading


def load_dataset(path: str | os.PathLike, *, subset: int = 0, val_size: int = 0, seed: int = 0,
                 download: bool = True, cache_dir: str | os.PathLike | None = None,
                 progress: Callable[[str], None] | None = None) -> Dataset:
    """Load CIFAR-10 (or any 32x32 image-folder set) from ``path``; optionally a stratified training
    subset of ``subset`` images and a stratified validation split of ``val_size`` images held out of
    the (subset of the) training set. Selection is deterministic in ``seed``."""
    raw = load_raw(path, download=download, cache_dir=cache_dir, progress=progress)
    train_x, train_y, test_x, test_y, classes = raw
    g = torch.Generator().manual_seed(seed)
    n = len(train_y)
    if subset and subset < n:
        if subset < len(classes):
            raise DataError(f"subset={subset} is too small: need at least one image per class ({len(classes)})")
        idx = stratified_indices(train_y, subset, g)
        train_x, train_y = train_x[idx], train_y[idx]
    val_x = val_y = None
    if val_size:
        if val_size >= len(train_y):
            raise DataError(f"val_size={val_size} leaves no training images (training set has {len(train_y)})")
        vidx = stratified_indices(train_y, val_size, g)
        keep = torch.ones(len(train_y), dtype=torch.bool)
        keep[vidx] = False
        val_x, val_y = train_x[vidx], train_y[vidx]
        train_x, train_y = train_x[keep], train_y[keep]
    return Dataset(train_x, train_y, test_x, test_y, classes, str(path), val_x, val_y)


def stratified_indices(labels: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """``k`` indices drawn without replacement with class proportions kept (remainders go to the
    largest classes first). Sorted, so the chosen subset's order follows the source."""
    classes, counts = torch.unique(labels, return_counts=True)
    share = counts.double() * k / counts.sum()
    take = share.floor().long()
    rest = k - int(take.sum())
    order = torch.argsort(share - take.double(), descending=True, stable=True)
    take[order[:rest]] += 1
    out = []
    for c, t in zip(classes.tolist(), take.tolist()):
        members = (labels == c).nonzero().flatten()
        out.append(members[torch.randperm(len(members), generator=g)[:t]])
    return torch.cat(out).sort().values


def source_kind(path: str | os.PathLike, *, download: bool = True) -> str:
    """What ``path`` holds (tar | torchvision | tree | download), or DataError saying why it cannot be read.
    Cheap: nothing is decoded, so commands check their data before starting any work."""
    p = Path(path).expanduser()
    if p.is_file() and (p.name.endswith((".tar", ".tar.gz", ".tgz"))):
        return "tar"
    if p.is_file():
        raise DataError(f"data path {p} is a file but not a .tar/.tar.gz archive; {LOCAL_COPY_HINT}")
    if _torchvision_dir(p) is not None:
        return "torchvision"
    if p.is_dir() and _tree_root(p) is not None:
        return "tree"
    if not p.exists() and p.name.endswith((".tar", ".tar.gz", ".tgz")):
        raise DataError(f"data path {p} does not exist (an archive is read, never downloaded); {LOCAL_COPY_HINT}")
    if download:
        return "download"
    if p.exists():
        raise DataError(f"{p} holds neither cifar-10-batches-py nor train/ and test/ class folders; {LOCAL_COPY_HINT}")
    raise DataError(f"data path {p} does not exist and downloading is off; {LOCAL_COPY_HINT}")


def load_raw(path: str | os.PathLike, *, download: bool = True, cache_dir: str | os.PathLike | None = None,
             progress: Callable[[str], None] | None = None):
    """(train_x, train_y, test_x, test_y, classes) for a source, decoded once then cached."""
    p = Path(path).expanduser()
    kind = source_kind(p, download=download)
    cache = None
    if kind in ("tar", "tree"):
        cache = _cache_file(p, cache_dir)
        if cache.exists():
            try:
                d = torch.load(cache, weights_only=True)
                return d["train_x"], d["train_y"], d["test_x"], d["test_y"], tuple(d["classes"])
            except Exception:  # a corrupt cache is rebuilt, never trusted
                cache.unlink(missing_ok=True)
    if progress:
        progress(f"no CIFAR-10 at {p}: downloading it there" if kind == "download" else
                 f"decoding {kind} data at {p} (cached afterwards)")
    if kind == "tar":
        out = _read_tar(p)
    elif kind == "tree":
        out = _read_tree(_tree_root(p))
    else:
        out = _read_torchvision(p, download=(kind == "download"))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        # one temporary file per writer: processes on several machines may decode into a shared cache at once
        tmp = cache.with_suffix(f".{uuid.uuid4().hex}.tmp")
        tx, ty, vx, vy, classes = out
        torch.save({"train_x": tx, "train_y": ty, "test_x": vx, "test_y": vy, "classes": list(classes)}, tmp)
        os.replace(tmp, cache)
    return out


def _cache_file(p: Path, cache_dir) -> Path:
    root = Path(cache_dir or os.environ.get("BITSEARCH_CACHE") or Path.home() / ".cache" / "bitsearch")
    h = hashlib.sha256(str(p.resolve()).encode())
    if p.is_file():
        st = p.stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    else:
        for f in sorted(p.rglob("*")):
            st = f.stat()
            h.update(f"{f.relative_to(p)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return root / f"cifar-{h.hexdigest()[:20]}.pt"


def _torchvision_dir(p: Path) -> Path | None:
    if (p / "cifar-10-batches-py").is_dir():
        return p
    if p.name == "cifar-10-batches-py" and p.is_dir():
        return p.parent
    return None


def _tree_root(p: Path) -> Path | None:
    """The folder holding train/ and test/: ``p`` itself or its only sub-folder."""
    if (p / "train").is_dir() and (p / "test").is_dir():
        return p
    subs = [d for d in p.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if len(subs) == 1 and (subs[0] / "train").is_dir() and (subs[0] / "test").is_dir():
        return subs[0]
    return None


def _read_torchvision(root: Path, download: bool):
    import torchvision

    try:
        tr = torchvision.datasets.CIFAR10(str(root), train=True, download=download)
        te = torchvision.datasets.CIFAR10(str(root), train=False, download=download)
    except Exception as e:  # no internet, corrupt archive, ...
        how = "and could not be downloaded" if download else "(downloading is off)"
        raise DataError(f"CIFAR-10 not found at {root} {how}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                        f"{LOCAL_COPY_HINT}") from None

    def conv(ds):
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        return x, torch.tensor(ds.targets, dtype=torch.int64)

    return (*conv(tr), *conv(te), tuple(tr.classes))


def _decode(data: bytes, name: str) -> torch.Tensor:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            if im.size != (32, 32):
                raise DataError(f"image {name} is {im.size[0]}x{im.size[1]}, expected 32x32 (resize the data set first)")
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise DataError(f"{name} is not a readable image (allowed: {', '.join(sorted(IMAGE_EXTS))})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _assemble(files: dict[str, dict[str, list[tuple[str, Callable[[], bytes]]]]], where: str):
    """files[split][class] = [(name, reader)] -> tensors, checking the tree's shape."""
    for split in ("train", "test"):
        if not files.get(split):
            raise DataError(f"{where}: {split}/ has no class folders (expected {split}/<class>/<image>)")
    tr_classes, te_classes = sorted(files["train"]), sorted(files["test"])
    if tr_classes != te_classes:
        extra = sorted(set(tr_classes) ^ set(te_classes))
        raise DataError(f"{where}: train/ and test/ have different class folders ({', '.join(extra)} in one only)")
    if len(tr_classes) < 2:
        raise DataError(f"{where}: found {len(tr_classes)} class folder, need at least 2")
    out = []
    for split in ("train", "test"):
        xs, ys = [], []
        for ci, c in enumerate(tr_classes):
            entries = sorted(files[split][c])
            if not entries:
                raise DataError(f"{where}: class folder {split}/{c} is empty")
            for name, read in entries:
                xs.append(_decode(read(), name))
                ys.append(ci)
        out += [torch.stack(xs), torch.tensor(ys, dtype=torch.int64)]
    return (*out, tuple(tr_classes))


def _check_ext(name: str) -> None:
    if Path(name).suffix.lower() not in IMAGE_EXTS:
        raise DataError(f"{name} is not an image file (allowed: {', '.join(sorted(IMAGE_EXTS))})")


def _read_tree(root: Path):
    files: dict = {}
    for split in ("train", "test"):
        files[split] = {}
        for cdir in sorted(d for d in (root / split).iterdir() if not d.name.startswith(".")):
            if not cdir.is_dir():
                raise DataError(f"{cdir} is a file where a class folder was expected ({split}/<class>/<image>)")
            entries = []
            for f in sorted(cdir.iterdir()):
                if f.name.startswith("."):
                    continue
                _check_ext(str(f))
                entries.append((str(f), f.read_bytes))
            files[split][cdir.name] = entries
    return _assemble(files, str(root))


def _read_tar(p: Path):
    try:
        tf = tarfile.open(p)
        members = tf.getmembers()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot read archive {p}: it is corrupt or not a tar archive ({type(e).__name__})") from None
    with tf:
        # find the prefix holding train/ and test/
        dirs = {m.name.rstrip("/") for m in members if m.isdir()}
        for m in members:  # archives without explicit directory entries
            parts = m.name.split("/")
            dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
        prefixes = sorted({d[: -len("train")] for d in dirs if d == "train" or d.endswith("/train")}, key=len)
        prefix = next((pr for pr in prefixes if (pr + "test") in dirs), None)
        if prefix is None:
            raise DataError(f"archive {p} has no train/ and test/ folders (expected [top/]train/<class>/<image>)")
        files: dict = {"train": {}, "test": {}}
        for m in members:
            if not m.name.startswith(prefix):
                continue
            rel = m.name[len(prefix):].strip("/").split("/")
            if rel[0] not in files or len(rel) < 2 or any(part.startswith(".") for part in rel):
                continue
            if m.isdir():
                if len(rel) == 2:
                    files[rel[0]].setdefault(rel[1], [])
                continue
            if len(rel) != 3:
                raise DataError(f"archive {p}: {m.name} is not at {rel[0]}/<class>/<image>")
            _check_ext(m.name)
            data = tf.extractfile(m).read()
            files[rel[0]].setdefault(rel[1], []).append((m.name, lambda data=data: data))
        return _assemble(files, str(p))


# ----------------------------------------------------------------------------------------------
# augmentation: pure batch functions


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 or [0,1]-float images [B,3,H,W] -> normalised float32 (ToTensor + Normalize)."""
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    mean = torch.tensor(CIFAR10_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def crop_flip(x: torch.Tensor, tops: torch.Tensor, lefts: torch.Tensor, flips: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Crop each image of ``x`` [B,C,H,W] at (top, left) of its zero-padded copy, then mirror where
    ``flips`` is true: torchvision's RandomCrop(H, padding=pad) + RandomHorizontalFlip for the same
    offsets and flips. Works on uint8 (padding value 0 = black, as on PIL images)."""
    b, c, h, w = x.shape
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = tops.view(b, 1) + torch.arange(h, device=x.device).view(1, h)           # [B,H]
    cols = lefts.view(b, 1) + torch.arange(w, device=x.device).view(1, w)          # [B,W]
    cols = torch.where(flips.view(b, 1), cols.flip(1), cols)
    bi = torch.arange(b, device=x.device).view(b, 1, 1)
    out = xp.permute(0, 2, 3, 1)[bi, rows.view(b, h, 1), cols.view(b, 1, w)]       # [B,H,W,C]
    return out.permute(0, 3, 1, 2)


def augment_params(n: int, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Crop offsets and flips for ``n`` images from the CPU generator ``g`` (so a checkpoint can save and
    restore it): a [3, n] long tensor of (top, left, flip)."""
    return torch.stack([torch.randint(0, 2 * pad + 1, (n,), generator=g),
                        torch.randint(0, 2 * pad + 1, (n,), generator=g),
                        (torch.rand(n, generator=g) < 0.5).long()])


def augment(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding ``pad``) + horizontal flip + normalise a uint8 batch."""
    tops, lefts, flips = augment_params(x.shape[0], g, pad).to(x.device)
    return normalize(crop_flip(x, tops, lefts, flips.bool(), pad))


class GpuLoader:
    """Batches from whole in-memory tensors (on any device): shuffled, augmented, normalised.

    Randomness comes from ``generator`` (CPU), whose state a checkpoint saves. Keeps the last partial
    batch, like a DataLoader with drop_last=False, unless ``drop_last`` (a compiled model then sees one
    batch shape: a second one would make torch.compile build a slower dynamic-shape graph)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, train: bool,
                 generator: torch.Generator | None = None, do_augment: bool = True, drop_last: bool = False):
        self.x, self.y, self.batch_size, self.train = x, y, batch_size, train
        self.g = generator or torch.Generator().manual_seed(0)
        self.do_augment = do_augment
        self.drop_last = drop_last and len(y) >= batch_size

    def __len__(self) -> int:
        if self.drop_last:
            return len(self.y) // self.batch_size
        return (len(self.y) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self) * self.batch_size if self.drop_last else len(self.y)
        order = aug = None
        if self.train:
            # one draw per epoch, moved to the device once: a per-batch host-to-device copy of a few
            # random numbers makes PyTorch synchronise the stream, so a GPU would idle at every step
            order = torch.randperm(len(self.y), generator=self.g)
            if self.do_augment:
                aug = augment_params(len(self.y), self.g).to(self.x.device)
            order = order.to(self.x.device)
        for i in range(0, n, self.batch_size):
            if order is None:
                xb, yb = self.x[i:i + self.batch_size], self.y[i:i + self.batch_size]
                yield normalize(xb), yb
                continue
            idx = order[i:i + self.batch_size]
            xb, yb = self.x[idx], self.y[idx]
            if aug is None:
                yield normalize(xb), yb
            else:
                tops, lefts, flips = aug[:, i:i + self.batch_size]
                yield normalize(crop_flip(xb, tops, lefts, flips.bool())), yb
