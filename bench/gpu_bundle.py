"""The Python packages bitsearch needs on the lent GPU machine, as parts small enough to carry.

That machine has Python 3.12 and torch preinstalled, no ray / optuna / mlflow, and no package index; one
call carries at most 64 MiB of git-ignored files. This builds, here, the cp312 wheels of what is missing
(pinned as in pyproject.toml), installs them into a site folder for Python 3.12 (pip --target, no
dependency resolution: the list below is complete), and packs that folder as independent .tar.xz parts
of at most --part-mib MiB each (whole packages per part where they fit, else their sub-folders). Each part unpacks on its own, so
the parts can travel in consecutive calls while the machine stays warm:

    python bench/gpu_bundle.py bench/bundle            # here: bench/bundle/part-00.tar.xz, part-01, ...
    bash bench/gpu.sh OUT --unpack bench/bundle        # there, once per carried part: into .gpu-site/

What the machine has is left out: torch and the long list of packages its image holds (THERE, from
/work/.library/device/KINDS.md, read 2026-11-17: numpy, pandas, pyarrow, matplotlib, pillow, onnx, ...),
so the bundle holds what it lacks (ray, optuna, mlflow and what they need that it has not) and no second
copy of anything: a package there is used at its version there. Also left out: files nobody reads on the
trial path (MLflow's web UI, the only big one).
"""
from __future__ import annotations

import argparse
import io
import json
import lzma
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
# what bitsearch needs that the GPU machine's image lacks (pins from pyproject.toml); their dependencies follow
WANTED = ("ray[tune]", "optuna", "mlflow")
# the GPU machine's image ("cuda", /work/.library/device/KINDS.md, as read on 2026-11-17): used as they are there
THERE = set("""absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx humanize
huggingface-hub hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib
jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml
markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint
packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil
pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark
pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich
sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate
tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
nvidia-ml-py nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-nccl-cu13 nvidia-nvjitlink
nvidia-nvshmem-cu13 nvidia-nvtx""".split())
# not there, and never imported on the trial path: MLflow's server (its tracking client does import fastapi and
# starlette), its model flavours' helpers, the report's plotly figure (skipped without it). Checked by running
# bench/gpu.sh --tiny with a Python holding only THERE's packages and the unpacked bundle (docs/lab/2026-12-03b.md)
NOT_NEEDED = {"gunicorn", "graphene", "graphql-core", "graphql-relay", "docker", "huey", "uvicorn", "flask",
              "flask-cors", "flask-wtf", "wtforms", "waitress", "plotly"}
LEAVE_OUT = THERE | NOT_NEEDED
# files inside kept packages that the trial path never reads (relative to the site folder)
LEAVE_OUT_PATHS = ("mlflow/server/js",)


def pins() -> dict[str, str]:
    """normalised name -> its pinned version, from pyproject.toml's dependencies."""
    import tomllib
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {_norm(d.split("==")[0].split("[")[0]): d.split("==")[1] for d in deps}


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


def requirements() -> list[str]:
    """WANTED at bitsearch's pins (extras as WANTED names them)."""
    p = pins()
    return [f"{w}=={p[_norm(w.split('[')[0])]}" for w in WANTED]


def download(dest: Path, python: str = "3.12") -> list[Path]:
    """The manylinux wheels for ``python`` of WANTED and everything they depend on, minus LEAVE_OUT."""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", python,
           "--implementation", "cp", "-d", str(dest), *[a for pl in PLATFORMS for a in ("--platform", pl)], *requirements()]
    subprocess.run(cmd, check=True)
    wheels = sorted(dest.glob("*.whl"))
    return [w for w in wheels if _norm(w.name.split("-")[0]) not in LEAVE_OUT]


def install(wheels: list[Path], site: Path, python: str = "3.12") -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(site),
           "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
           *[a for pl in PLATFORMS for a in ("--platform", pl)], *map(str, wheels)]
    subprocess.run(cmd, check=True)
    for junk in [*site.rglob("__pycache__"), *site.glob("bin"), *(site / p for p in LEAVE_OUT_PATHS)]:
        shutil.rmtree(junk, ignore_errors=True)


def units(site: Path, part_bytes: int) -> dict[Path, int]:
    """What the parts are made of, with each one's size compressed on its own (quickly, at xz preset 1: the
    parts, at preset 6, come out smaller): the site folder's top-level
    entries, and where one of them compresses to more than a part (ray, pyarrow) its children instead,
    recursively. Paths are relative to ``site``."""
    out: dict[Path, int] = {}
    todo = [p.relative_to(site) for p in site.iterdir()]
    while todo:
        rel = todo.pop()
        n = len(_xz(site, [rel], preset=1))  # fast; never smaller than the parts' preset-6 size
        if n <= part_bytes:
            out[rel] = n
        elif (site / rel).is_dir():
            todo += [c.relative_to(site) for c in (site / rel).iterdir()]
        else:
            raise SystemExit(f"{rel} alone compresses to more than {part_bytes / MIB:g} MiB")
    return out


def pack(site: Path, out: Path, part_bytes: int) -> list[dict]:
    """Independent .tar.xz parts of ``site``, each at most ``part_bytes`` on disk: the units (above) packed
    first-fit by their compressed size, largest first (a part compresses to no more than its units did
    apart), and each written part checked."""
    out.mkdir(parents=True, exist_ok=True)
    alone = units(site, part_bytes)
    parts: list[list[Path]] = []
    for rel in sorted(alone, key=lambda e: -alone[e]):
        group = next((g for g in parts if sum(alone[e] for e in g) + alone[rel] <= part_bytes), None)
        if group is None:
            parts.append(group := [])
        group.append(rel)
    written = []
    for i, group in enumerate(parts):
        f = out / f"part-{i:02d}.tar.xz"
        f.write_bytes(_xz(site, group))
        if f.stat().st_size > part_bytes:
            raise SystemExit(f"{f} is {f.stat().st_size / MIB:.1f} MiB, over the {part_bytes / MIB:g} MiB limit")
        written.append({"file": str(f), "bytes": f.stat().st_size, "entries": sorted(str(e) for e in group)})
    return written


def _xz(site: Path, entries: list[Path], preset: int = 6) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        for rel in sorted(entries):
            tf.add(site / rel, arcname=str(rel))
    return lzma.compress(raw.getvalue(), preset=preset)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="folder for part-NN.tar.xz and bundle.json (git-ignored: bench/bundle)")
    ap.add_argument("--part-mib", type=float, default=46.0,
                    help="largest part (MiB): a call carries at most 64 MiB, the working tree (~9) and the data (~19) included")
    ap.add_argument("--work", default="build/gpu-bundle", help="scratch folder for wheels and the site tree")
    ap.add_argument("--python", default="3.12", help="the Python version there (default 3.12, the lent machine's)")
    a = ap.parse_args()
    work = Path(a.work)
    shutil.rmtree(work / "site", ignore_errors=True)
    wheels = download(work / "wheels", a.python)
    install(wheels, work / "site", a.python)
    parts = pack(work / "site", Path(a.out), int(a.part_mib * MIB))
    manifest = {"python": a.python, "wheels": [w.name for w in wheels], "parts": parts}
    (Path(a.out) / "bundle.json").write_text(json.dumps(manifest, indent=2))
    for p in parts:
        print(f"{p['file']}: {p['bytes'] / MIB:.1f} MiB ({len(p['entries'])} entries)")


if __name__ == "__main__":
    main()
