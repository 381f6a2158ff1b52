// The counter-based hash of bns_pipe/random.py (splitmix64's finaliser), for the CPU and, in
// .cu files, for CUDA device code too.
//
//   mix(z)       = splitmix64 finaliser of z (uint64, wrapping)
//   bits(key, c) = mix(key ^ c) >> 40                   24 random bits
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define BNS_PIPE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define BNS_PIPE_HOST_DEVICE inline
#endif

namespace bns_pipe {

BNS_PIPE_HOST_DEVICE uint64_t mix(uint64_t z) {
  z += 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

BNS_PIPE_HOST_DEVICE int64_t bits(uint64_t key, uint64_t counter) {
  return static_cast<int64_t>(mix(key ^ counter) >> 40);
}

}  // namespace bns_pipe
