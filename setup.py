"""Builds peftops._C: the CPU kernels always; the CUDA kernels when torch has CUDA and nvcc is found.

PEFTOPS_CUDA=0|1 forces CUDA off or on; TORCH_CUDA_ARCH_LIST picks the architectures (default "8.0;9.0" when
no GPU is visible); PEFTOPS_CPU_FLAGS replaces the CPU vectorisation flags.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import build_config  # noqa: E402

cuda_home = build_config.find_cuda_home()
if cuda_home and "CUDA_HOME" not in os.environ:
    os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension guesses it from a shim

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def want_cuda():
    forced = os.environ.get("PEFTOPS_CUDA")
    available = torch.version.cuda is not None and cuda_home is not None
    if forced == "1" and not available:
        sys.exit("PEFTOPS_CUDA=1 but torch has no CUDA or no CUDA toolkit (nvcc) was found; set CUDA_HOME")
    return available if forced is None else forced == "1"


def extension():
    srcs = build_config.sources()
    # ATen's at::parallel_for is an OpenMP pragma in its headers: without -fopenmp our CPU loops run on one thread.
    # -g0 overrides the -g of Python's own flags: debug info for torch's headers made a 64 MB library, built slower.
    cxx = ["-O3", "-g0", "-fopenmp"] + build_config.cpu_flags()
    link = ["-fopenmp"]
    if not want_cuda():
        return CppExtension("peftops._C", srcs["cpu"], include_dirs=["csrc"], extra_compile_args={"cxx": cxx},
                            extra_link_args=link)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if not archs:  # a visible GPU: build for it, as torch would
        major, minor = torch.cuda.get_device_capability()
        archs = f"{major}.{minor}"
    defines = ["-DPEFTOPS_WITH_CUDA", f'-DPEFTOPS_CUDA_ARCHS="{archs}"']
    return CUDAExtension("peftops._C", srcs["cpu"] + srcs["cuda"],
                         include_dirs=["csrc"] + build_config.nvidia_include_dirs(),
                         extra_compile_args={"cxx": cxx + defines, "nvcc": ["-O3"] + defines},
                         extra_link_args=link)


setup(  # name, version and packages: pyproject.toml
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
