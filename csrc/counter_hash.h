// The counter-based hash of bns_pipe/random.py on the CPU (splitmix64's finaliser).
//
//   mix(z)       = splitmix64 finaliser of z (uint64, wrapping)
//   bits(key, c) = mix(key ^ c) >> 40                   24 random bits
#pragma once

#include <cstdint>

namespace bns_pipe {

inline uint64_t mix(uint64_t z) {
  z += 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

inline int64_t bits(uint64_t key, uint64_t counter) {
  return static_cast<int64_t>(mix(key ^ counter) >> 40);
}

}  // namespace bns_pipe
