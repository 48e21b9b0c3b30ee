"""Loading the compiled kernels, reporting what runs, and the opt-in pure-PyTorch fallback."""
import functools
import glob
import os
import re
import warnings

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_load_error = None


def _load():
    global _load_error
    paths = sorted(glob.glob(os.path.join(_HERE, "_C*.so")) + glob.glob(os.path.join(_HERE, "_C*.pyd")))
    if not paths:
        _load_error = "peftops' compiled library (peftops/_C*.so) was not found: build it with `pip install .`"
        return False
    try:
        torch.ops.load_library(paths[0])
    except OSError as e:  # built against another torch, or a missing CUDA runtime
        _load_error = f"peftops' compiled library {paths[0]} failed to load: {e}"
        return False
    return True


LOADED = _load()
# What the library was built with, read once: the ops' device checks consult it under torch.compile, which cannot
# trace a custom op that returns a string.
_BUILD = torch.ops.peftops._build_info().split(";") if LOADED else []
COMPILED = [c for c in _BUILD if not c.startswith("arch=")]
CUDA_ARCHS = [c[5:] for c in _BUILD if c.startswith("arch=") and c[5:]]


# TORCH_CUDA_ARCH_LIST's named architectures, as torch.utils.cpp_extension expands them
_NAMED_ARCHS = {"Kepler+Tesla": "3.7", "Kepler": "3.5+PTX", "Maxwell+Tegra": "5.3", "Maxwell": "5.0;5.2+PTX",
                "Pascal": "6.0;6.1+PTX", "Volta+Tegra": "7.2", "Volta": "7.0+PTX", "Turing": "7.5+PTX",
                "Ampere+Tegra": "8.7", "Ampere": "8.0;8.6+PTX", "Ada": "8.9+PTX", "Hopper": "9.0+PTX",
                "Blackwell+Tegra": "11.0", "Blackwell": "10.0;10.3;12.0;12.1+PTX", "Rubin": "10.7+PTX"}


@functools.lru_cache(maxsize=None)
def _archs_run_on(index: int) -> bool:
    """Whether a compiled CUDA architecture runs on GPU `index`: code built for major.minor runs on major.x with
    x >= minor ("X.Ya", arch-specific code, only on X.Y itself), and PTX ("X.Y+PTX") is compiled for any later GPU
    when loaded. An entry it cannot read counts as running (the launch would tell)."""
    capability = torch.cuda.get_device_capability(index)
    read = False
    for entry in CUDA_ARCHS:
        for arch in _NAMED_ARCHS.get(entry, entry).split(";"):
            m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", arch.strip())
            if not m:
                continue
            read = True
            version, kind = (int(m[1]), int(m[2])), m[3]
            if (m[4] and version <= capability) or (kind == "a" and version == capability) or \
                    (kind != "a" and version[0] == capability[0] and version[1] <= capability[1]):
                return True
    return not read


def _cuda_runs(device: torch.device) -> bool:
    if "cuda" not in COMPILED:
        return False
    if torch.compiler.is_compiling() or not torch.cuda.is_available():
        return True  # decided by the eager calls (a CUDA tensor needs a GPU; tracing must not query it)
    return _archs_run_on(torch.cuda.current_device() if device.index is None else device.index)


def backends() -> dict:
    """What was compiled (cpu, cuda, CUDA archs) and what can run now. The archs are under SPEC's word, "archs", and
    under "cuda_archs" as before."""
    info = {"compiled": list(COMPILED), "archs": list(CUDA_ARCHS), "cuda_archs": list(CUDA_ARCHS), "runs": [],
            "fallback": fallback_enabled(), "error": _load_error}
    if LOADED:
        info["runs"] = ["cpu"]
        if "cuda" in COMPILED and torch.cuda.is_available():
            if _cuda_runs(torch.device("cuda")):
                info["runs"].append("cuda")
            else:
                info["error"] = _arch_error(torch.device("cuda"))
    return info


def _arch_error(device: torch.device) -> str:
    index = torch.cuda.current_device() if device.index is None else device.index
    major, minor = torch.cuda.get_device_capability(index)
    return (f"peftops' CUDA kernels were built for compute capabilities {', '.join(CUDA_ARCHS)}, none of which runs "
            f"on cuda:{index} (compute capability {major}.{minor}); rebuild with TORCH_CUDA_ARCH_LIST=\"{major}.{minor}\"")


def fallback_enabled() -> bool:
    return os.environ.get("PEFTOPS_FALLBACK", "0") == "1"


_warned_fallback = False


def check_like_kernels(op: str, *args, **kwargs) -> None:
    """The fallback's argument checks: the compiled op's own, run on meta copies of the tensors (shapes, strides and
    dtypes, no data), so that both paths refuse the same input with the same message. Callers pass no dropout
    (training=False), so that no seed is drawn here. Without the library there is nothing to run them with."""
    first = next(t for t in args if isinstance(t, torch.Tensor))
    if not LOADED or torch.is_autocast_enabled(first.device.type):
        return  # (meta tensors skip autocast's casts, so the dtype checks would see the operands uncast)

    def meta(t):
        if not isinstance(t, torch.Tensor):
            return t
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")

    with torch.no_grad():
        getattr(torch.ops.peftops, op)(*map(meta, args), **{k: meta(v) for k, v in kwargs.items()})


def use_kernels(device: torch.device) -> bool:
    """True when a compiled kernel serves `device`; False when the user asked for the fallback; else a clear error."""
    global _warned_fallback
    if LOADED and (device.type == "cpu" or device.type == "meta" or (device.type == "cuda" and _cuda_runs(device))):
        return True
    if fallback_enabled():
        if not _warned_fallback:
            warnings.warn(f"peftops: no compiled kernel for device '{device.type}'; running the pure-PyTorch "
                          "fallback because PEFTOPS_FALLBACK=1 (slower, same results)", stacklevel=3)
            _warned_fallback = True
        return False
    if _load_error:
        reason = _load_error
    elif device.type == "cuda" and "cuda" in COMPILED:
        reason = _arch_error(device)
    else:
        reason = f"peftops was built without kernels for device '{device.type}'"
    raise RuntimeError(f"{reason}. Set PEFTOPS_FALLBACK=1 to run the pure-PyTorch reference instead.")
