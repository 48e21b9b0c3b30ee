// Autocast of lora_linear_forward: under torch.autocast the op runs in the autocast dtype, as nn.Linear does
// (inputs cast once through autocast's weight cache), then redispatches below autocast to autograd.
#include <ATen/autocast_mode.h>
#include <torch/library.h>

namespace peftops::lora {
namespace {

template <c10::DeviceType device, c10::DispatchKey autocast_key>
std::tuple<at::Tensor, at::Tensor> lora_linear_forward_autocast(const at::Tensor& x, const at::Tensor& weight,
                                                                const std::optional<at::Tensor>& bias,
                                                                const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                                double scale, double dropout_p,
                                                                const std::optional<at::Tensor>& seed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("peftops::lora_linear_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                           const at::Tensor&, double, double, const std::optional<at::Tensor>&)>();
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  const auto dtype = at::autocast::get_autocast_dtype(device);
  const auto cast = [&](const at::Tensor& t) { return at::autocast::cached_cast(dtype, t, device); };
  const std::optional<at::Tensor> bias_cast =
      bias.has_value() && bias->defined() ? std::optional<at::Tensor>(cast(*bias)) : std::nullopt;
  return op.call(cast(x), cast(weight), bias_cast, cast(lora_a), cast(lora_b), scale, dropout_p, seed);
}

}  // namespace

TORCH_LIBRARY_IMPL(peftops, AutocastCPU, m) {
  m.impl("lora_linear_forward", &lora_linear_forward_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
}

TORCH_LIBRARY_IMPL(peftops, AutocastCUDA, m) {
  m.impl("lora_linear_forward", &lora_linear_forward_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
}

}  // namespace peftops::lora
