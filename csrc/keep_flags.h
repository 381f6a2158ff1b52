// Keyed-dropout keep flags for a run of consecutive counters, on the CPU.
//
//   keep_flags(key, first, n, threshold, keep):
//     keep[j] = bits(key, first + j) >= threshold   for j in [0, n)        (uint8 0 or 1)
//
// The hash (counter_hash.h) is 64-bit multiply bound; on x86-64 the definition is compiled
// twice, for AVX2 and for the baseline, and the loader picks the one the CPU runs
// (GCC/Clang target_clones): AVX2 hashes four counters per instruction, about 2x faster.
#pragma once

#include <cstdint>

namespace bns_pipe {

// Counters per call that fit the callers' stack buffers.
constexpr int64_t kFlagRun = 256;

void keep_flags(uint64_t key, uint64_t first, int64_t n, int64_t threshold, uint8_t* keep);

}  // namespace bns_pipe
