"""How an ONNX export stores quantized weights (no heavy imports: the CLI lists these in its help)."""

WEIGHT_HELP = {
    "auto": "int8 where this CPU has VNNI (or is not x86), else uint8: exact here, and the fastest exact choice",
    "int8": "signed codes: onnxruntime's u8s8 integer kernels, the fastest; exact on CPUs with VNNI (AVX512-VNNI, "
            "AVX-VNNI, AMX), while on AVX2-only CPUs their 16-bit pair sums saturate and some predictions change",
    "uint8": "codes + 128 around zero-point 128: onnxruntime's u8u8 integer kernels, exact on every x86 CPU, slower",
    "int4": "layers of <= 4 bits two codes a byte: the smallest file; onnxruntime runs those convolutions in float",
}
WEIGHT_STORAGE = tuple(WEIGHT_HELP)  # the first is the default
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_has_vnni() -> bool | None:
    """Whether this x86 CPU has the dot-product instructions that make u8s8 integer kernels exact (None: unknown,
    e.g. not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    return None if flags is None else any(v in flags for v in VNNI_FLAGS)


def resolve_weights(weights: str) -> str:
    """The storage ``weights`` names, with "auto" decided for this CPU."""
    if weights not in WEIGHT_STORAGE:
        raise ValueError(f"weights={weights!r} is invalid: allowed {', '.join(WEIGHT_STORAGE)}")
    if weights != "auto":
        return weights
    return "uint8" if cpu_has_vnni() is False and _x86() else "int8"


def _x86() -> bool:
    import platform
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
