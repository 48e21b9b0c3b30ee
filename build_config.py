"""Build settings shared by setup.py and CMakeLists.txt (which runs `python build_config.py cmake`)."""
import os
import platform
import shutil
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def sources():
    """{'cpu': [...], 'cuda': [...]} from csrc/sources.txt, paths relative to the repo root."""
    groups, current = {"cpu": [], "cuda": []}, None
    with open(os.path.join(CSRC, "sources.txt")) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line in ("[cpu]", "[cuda]"):
                current = line[1:-1]
            elif line:
                groups[current].append(os.path.join("csrc", line))
    return groups


def find_cuda_home():
    """The toolkit folder whose bin/nvcc is the real compiler (the nvcc on PATH may be a shim elsewhere)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # a shell shim that execs the real compiler: follow it
            with open(nvcc, "rb") as f:
                head = f.read(4096).decode("utf-8", "ignore")
            for word in head.split():
                if word.endswith("/bin/nvcc") and os.path.exists(word):
                    candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(word))))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"]
    for c in candidates:
        if c and os.path.exists(os.path.join(c, "bin", "nvcc")) and os.path.exists(
                os.path.join(c, "include", "cuda_runtime.h")):
            return c
    return None


def cpu_flags():
    """Vectorisation for at::vec: AVX2 (as ATen builds its AVX2 kernels) when this machine has them (PEFTOPS_CPU_FLAGS overrides)."""
    if "PEFTOPS_CPU_FLAGS" in os.environ:
        return os.environ["PEFTOPS_CPU_FLAGS"].split()
    if platform.machine() in ("x86_64", "AMD64"):
        try:
            with open("/proc/cpuinfo") as f:
                info = f.read().split()
        except OSError:
            info = []
        if all(f in info for f in ("avx2", "fma", "f16c", "bmi2")):
            return ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return []


def nvidia_include_dirs():
    """Headers that pip's nvidia-* wheels carry (cuBLAS, cuSPARSE, ...) and a bare toolkit may lack."""
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for base in nvidia.__path__:
        for root, subdirs, _ in os.walk(base):
            if os.path.basename(root) == "include":
                dirs.append(root)
                subdirs[:] = []
    return sorted(dirs)


if __name__ == "__main__" and sys.argv[1:] == ["cmake"]:
    # CMake reads these lines: CPU sources, CUDA sources, CPU flags.
    s = sources()
    print(";".join(s["cpu"]))
    print(";".join(s["cuda"]))
    print(";".join(cpu_flags()))
