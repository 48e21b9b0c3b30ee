// The one TORCH_LIBRARY of peftops: the library itself and what the build put in it. Each op family adds its
// schemas with TORCH_LIBRARY_FRAGMENT beside its kernels (csrc/<family>/<op>.cpp).
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
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

// The backward ops are differentiable once: a second derivative through one (create_graph=True, gradgradcheck)
// raises "derivative for peftops::..._backward is not implemented" instead of silently coming out as zero. So does
// the internal dropout op, whose callers differentiate through it themselves.
TORCH_LIBRARY_IMPL(peftops, Autograd, m) {
  for (const char* op : {"dropout", "lora_linear_backward", "dora_linear_backward", "multi_lora_linear_backward",
                         "adapter_bottleneck_backward", "bottleneck_activation_backward", "bias_linear_backward",
                         "bias_dropout_add_backward", "ia3_linear_backward", "ia3_glu_linear_backward",
                         "prefix_attention_backward"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
}

}  // namespace peftops
