// Schema of multi_lora_linear (many LoRA adapters in one batch) and its public, composite entry point.
// Adapters of different ranks are served by zero-padding lora_a / lora_b to the largest rank r: the padded
// rows and columns contribute exactly zero.
#include "multi_lora_linear.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "../common/checks.h"

namespace peftops::multi_lora {

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scales,
                  const at::Tensor& adapter_index) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "multi_lora_linear: x must have shape [..., in_features], got a 0-d tensor");
  check_weight(weight, "multi_lora_linear");
  const auto in = weight.size(1), out = weight.size(0);
  TORCH_CHECK_VALUE(x.sym_size(-1) == in, "multi_lora_linear: x has ", x.sym_size(-1),
                    " input features but weight expects ", in);
  TORCH_CHECK_VALUE(lora_a.dim() == 3 && lora_a.size(2) == in && lora_a.size(1) >= 1,
                    "multi_lora_linear: lora_a must be [n, r, ", in, "] with r >= 1, got shape ", lora_a.sizes());
  const auto n = lora_a.size(0), r = lora_a.size(1);
  TORCH_CHECK_VALUE(lora_b.dim() == 3 && lora_b.size(0) == n && lora_b.size(1) == out && lora_b.size(2) == r,
                    "multi_lora_linear: lora_b must be [", n, ", ", out, ", ", r, "], got shape ", lora_b.sizes());
  TORCH_CHECK_VALUE(scales.dim() == 1 && scales.size(0) == n, "multi_lora_linear: scales must be [", n, "], got shape ",
                    scales.sizes());
  TORCH_CHECK_TYPE(scales.is_floating_point(), "multi_lora_linear: scales must be floating point, got ",
                   scales.scalar_type());
  check_float(x, "multi_lora_linear", "x");
  check_like(weight, x, "multi_lora_linear", "weight", "x");
  check_like(lora_a, x, "multi_lora_linear", "lora_a", "x");
  check_like(lora_b, x, "multi_lora_linear", "lora_b", "x");
  check_bias(bias, out, x, "multi_lora_linear", "x");
  const std::pair<const at::Tensor*, const char*> small[] = {{&scales, "scales"}, {&adapter_index, "adapter_index"}};
  for (const auto& [t, name] : small) {  // read on the host: x's device or the CPU
    TORCH_CHECK_VALUE(t->device() == x.device() || t->is_cpu(), "multi_lora_linear: ", name, " is on ", t->device(),
                      " but x is on ", x.device(), " (expected x's device or the CPU)");
  }
  TORCH_CHECK_TYPE(adapter_index.scalar_type() == at::kLong, "multi_lora_linear: adapter_index must be int64, got ",
                   adapter_index.scalar_type());
  // sym_: symbolic under torch.compile's dynamic shapes (the comparison becomes a guard)
  const c10::SymInt tokens = in > 0 ? x.sym_numel() / in : c10::SymInt(0);
  TORCH_CHECK_VALUE(adapter_index.dim() == 1 && adapter_index.sym_size(0) == tokens,
                    "multi_lora_linear: adapter_index must be [", tokens, "] (one entry per token row of x), got shape ",
                    adapter_index.sym_sizes());
}

Segments make_segments(const at::Tensor& adapter_index, const at::Tensor& scales) {
  const auto index = adapter_index.cpu().contiguous();
  const int64_t n = scales.size(0), tokens = index.numel();
  const int64_t* idx = index.const_data_ptr<int64_t>();
  Segments seg;
  seg.offsets.assign(n + 1, 0);
  for (int64_t i = 0; i < tokens; ++i) {
    TORCH_CHECK_VALUE(idx[i] >= -1 && idx[i] < n, "multi_lora_linear: adapter_index[", i, "] = ", idx[i],
                      " is out of range: expected -1 (base only) or an adapter in [0, ", n, ")");
    if (idx[i] >= 0) ++seg.offsets[idx[i] + 1];
  }
  for (int64_t a = 0; a < n; ++a) seg.offsets[a + 1] += seg.offsets[a];
  seg.rows = at::empty({seg.offsets[n]}, index.options());
  std::vector<int64_t> fill(seg.offsets.begin(), seg.offsets.end() - 1);
  int64_t* rows = seg.rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < tokens; ++i) {
    if (idx[i] >= 0) rows[fill[idx[i]]++] = i;
  }
  const auto s = scales.to(at::kCPU, at::kDouble).contiguous();
  seg.scales.assign(s.const_data_ptr<double>(), s.const_data_ptr<double>() + n);
  return seg;
}

static at::Tensor multi_lora_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scales,
                                    const at::Tensor& adapter_index) {
  check_inputs(x, weight, bias, lora_a, lora_b, scales, adapter_index);
  static auto forward = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("peftops::multi_lora_linear_forward", "")
                            .typed<std::tuple<at::Tensor, at::Tensor>(
                                const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return std::get<0>(forward.call(x, weight, bias, lora_a, lora_b, scales, adapter_index));
}

TORCH_LIBRARY_FRAGMENT(peftops, m) {
  m.def("multi_lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor scales, "
        "Tensor adapter_index) -> Tensor");
  // out, and t = x A_a^T per token row ([tokens, r], float32; zero where the index is -1) saved for backward.
  m.def("multi_lora_linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
        "Tensor scales, Tensor adapter_index) -> (Tensor out, Tensor t)");
  m.def("multi_lora_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, "
        "Tensor scales, Tensor adapter_index, Tensor t, bool[4] output_mask) -> "
        "(Tensor grad_x, Tensor grad_lora_a, Tensor grad_lora_b, Tensor grad_bias)");
}

TORCH_LIBRARY_IMPL(peftops, CompositeImplicitAutograd, m) { m.impl("multi_lora_linear", &multi_lora_linear); }

}  // namespace peftops::multi_lora
