// Run-time CPU features for the kernels compiled twice (baseline and AVX2): on x86-64 with
// GCC-compatible compilers BNS_PIPE_AVX2 is defined, and a kernel's AVX2 clone is chosen
// when the CPU has the features below.
#pragma once

#if defined(__GNUC__) && defined(__x86_64__)
#define BNS_PIPE_AVX2 1
#endif

namespace bns_pipe {

inline bool cpu_has_avx2() {
#ifdef BNS_PIPE_AVX2
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
#else
  return false;
#endif
}

inline bool cpu_has_avx2_fma() {
#ifdef BNS_PIPE_AVX2
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

}  // namespace bns_pipe
