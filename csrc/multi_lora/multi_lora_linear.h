#pragma once
#include <ATen/core/Tensor.h>

#include <vector>

namespace peftops::multi_lora {

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scales,
                  const at::Tensor& adapter_index);

// The segmented layout of a mixed batch: token rows grouped by adapter once per call (a stable counting sort
// on the host); rows with index -1 belong to no segment. rows[offsets[a] : offsets[a + 1]] are adapter a's.
struct Segments {
  at::Tensor rows;               // int64 [tokens with an adapter], on the host
  std::vector<int64_t> offsets;  // n + 1
  std::vector<double> scales;    // n
};
Segments make_segments(const at::Tensor& adapter_index, const at::Tensor& scales);

}  // namespace peftops::multi_lora
