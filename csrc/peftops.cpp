// The one TORCH_LIBRARY of peftops: the library itself and what the build put in it. Each op family adds its
// schemas with TORCH_LIBRARY_FRAGMENT beside its kernels (csrc/<family>/<op>.cpp).
#include <torch/library.h>

#include <string>

#ifndef PEFTOPS_CUDA_ARCHS
#define PEFTOPS_CUDA_ARCHS ""
#endif

namespace peftops {

// "cpu[;cuda;arch=8.0;arch=9.0]": what this library was compiled with (peftops.backends() parses it).
static std::string build_info() {
  std::string info = "cpu";
#ifdef PEFTOPS_WITH_CUDA
  info += ";cuda";
  std::string archs = PEFTOPS_CUDA_ARCHS;
  size_t start = 0;
  while (start < archs.size()) {
    size_t end = archs.find_first_of("; ", start);
    if (end == std::string::npos) end = archs.size();
    if (end > start) info += ";arch=" + archs.substr(start, end - start);
    start = end + 1;
  }
#endif
  return info;
}

TORCH_LIBRARY(peftops, m) { m.def("_build_info() -> str", &build_info); }

}  // namespace peftops
