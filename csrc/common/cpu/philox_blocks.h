#pragma once
#include <cstdint>

#include "../philox.h"

namespace peftops::cpu {

// The Philox words of blocks g0 .. g0 + groups - 1 (counter = (block, offset), key = seed) in element order: word j
// of block g at w[4 (g - g0) + j]. Bit-identical to philox4x32_10; vectorised (cpu/philox_blocks.cpp).
void philox_blocks(uint64_t g0, uint64_t groups, uint64_t offset, uint64_t seed, uint32_t* w);

}  // namespace peftops::cpu
