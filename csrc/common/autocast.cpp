// torch.autocast for every peftops op, in one place. The public ops are linear layers and attention, and run in
// the autocast dtype as nn.Linear and SDPA do: their floating-point tensor arguments are cast once (through
// autocast's weight cache), then the op runs below autocast, so the ATen products inside the kernels are not cast
// again (the kernels keep their own float32 accumulation). bias_dropout_add, an elementwise epilogue, and
// adapter_bottleneck, whose output is its residual plus a small update (PyTorch's `residual + up(...)` is float32 for
// a float32 residual stream), follow autocast's promote policy (their operands to their widest floating type: a
// bottleneck over a float32 stream runs in float32, at the cost of its two [tokens, d] x [d, m] products). The
// internal ops only run below autocast, untouched: a backward called inside an autocast region must not have its
// products cast.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DispatchKeySet.h>
#include <torch/library.h>

namespace peftops {
namespace {

enum class Policy { lower_precision, promote, below_only };

template <c10::DeviceType device, Policy policy>
void autocast_boxed(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const auto args = stack->end() - static_cast<std::ptrdiff_t>(op.schema().arguments().size());
  if constexpr (policy != Policy::below_only) {
    auto dtype = at::autocast::get_autocast_dtype(device);
    if constexpr (policy == Policy::promote) {  // the widest floating type among the arguments
      bool first = true;
      for (auto it = args; it != stack->end(); ++it) {
        if (it->isTensor() && it->toTensor().defined() && it->toTensor().is_floating_point()) {
          const auto t = it->toTensor().scalar_type();
          dtype = first ? t : at::promote_types(dtype, t);
          first = false;
        }
      }
    }
    for (auto it = args; it != stack->end(); ++it) {  // cached_cast leaves non-floating and float64 tensors alone
      if (it->isTensor() && it->toTensor().defined()) *it = at::autocast::cached_cast(dtype, it->toTensor(), device);
    }
  }
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  op.callBoxed(stack);
}

template <c10::DeviceType device>
void register_autocast(torch::Library& m) {
  for (const char* op : {"lora_linear", "dora_linear", "multi_lora_linear", "prefix_attention", "bias_linear",
                         "ia3_linear", "ia3_glu_linear"}) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&autocast_boxed<device, Policy::lower_precision>>());
  }
  for (const char* op : {"bias_dropout_add", "adapter_bottleneck"}) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&autocast_boxed<device, Policy::promote>>());
  }
  for (const char* op : {"lora_linear_forward", "lora_linear_backward", "dora_linear_forward", "dora_linear_backward",
                         "multi_lora_linear_forward", "multi_lora_linear_backward", "prefix_attention_forward",
                         "prefix_attention_backward", "adapter_bottleneck_forward", "adapter_bottleneck_backward",
                         "bottleneck_activation", "bottleneck_activation_backward", "bias_linear_backward",
                         "bias_dropout_add_forward", "bias_dropout_add_backward", "ia3_linear_forward",
                         "ia3_linear_backward", "ia3_glu_linear_forward", "ia3_glu_linear_backward", "dropout",
                         "dropout_keep_mask"}) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&autocast_boxed<device, Policy::below_only>>());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(peftops, AutocastCPU, m) { register_autocast<c10::DeviceType::CPU>(m); }
TORCH_LIBRARY_IMPL(peftops, AutocastCUDA, m) { register_autocast<c10::DeviceType::CUDA>(m); }

}  // namespace peftops
