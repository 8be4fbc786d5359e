"""How an ONNX export stores quantized weights (no heavy imports: the CLI lists these in its help)."""

WEIGHT_HELP = {
    "auto": "int8 wherever this CPU's u8s8 kernels compute exactly (every layer with VNNI or off x86; without VNNI "
            "depthwise convolutions and layers whose weight or input codes fit 7 bits), uint8 for the rest: exact here, "
            "and the fastest exact choice",
    "int8": "signed codes: onnxruntime's u8s8 integer kernels, the fastest; exact on CPUs with VNNI (AVX512-VNNI, "
            "AVX-VNNI, AMX), while on AVX2-only CPUs their 16-bit pair sums saturate and some predictions change",
    "uint8": "codes + 128 around zero-point 128: onnxruntime's u8u8 integer kernels, exact on every x86 CPU, slower",
    "int4": "layers of <= 4 bits two codes a byte: the smallest file; onnxruntime runs those convolutions in float",
}
WEIGHT_STORAGE = tuple(WEIGHT_HELP)  # the first is the default
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
INT8_WHERE_EXACT = "int8-where-exact"  # what "auto" resolves to on an x86 CPU without VNNI: int8 or uint8 per layer
INT16_MAX = 32767


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
    """The storage ``weights`` names, with "auto" decided for this CPU: "int8", or INT8_WHERE_EXACT where the
    u8s8 kernels can saturate (``layer_storage`` decides each layer)."""
    if weights not in WEIGHT_STORAGE:
        raise ValueError(f"weights={weights!r} is invalid: allowed {', '.join(WEIGHT_STORAGE)}")
    if weights != "auto":
        return weights
    return INT8_WHERE_EXACT if cpu_has_vnni() is False and _x86() else "int8"


def u8s8_exact(depthwise: bool, w_code_max: int, x_code_max: int) -> bool:
    """Whether onnxruntime's u8s8 kernels compute a layer exactly on an x86 CPU without VNNI. Their AVX2 GEMM
    adds pairs of uint8 x int8 products in int16 (vpmaddubsw), which saturates unless 2 * x * |w| fits int16;
    the depthwise convolution kernel accumulates in int32. ``w_code_max``: the largest |weight code|;
    ``x_code_max``: the largest uint8 input code."""
    return depthwise or 2 * w_code_max * x_code_max <= INT16_MAX


def layer_storage(resolved: str, depthwise: bool, w_code_max: int, x_code_max: int) -> str:
    """How one layer's signed weight codes are stored under ``resolved`` (resolve_weights)."""
    if resolved != INT8_WHERE_EXACT:
        return resolved
    return "int8" if u8s8_exact(depthwise, w_code_max, x_code_max) else "uint8"


def _x86() -> bool:
    import platform
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
