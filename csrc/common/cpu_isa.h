// Run-time choice between a generic and an AVX2+FMA build of the same CPU loop.
// The package is built for baseline x86-64 (it must run anywhere), so a hot loop
// written once as an always-inline body is instantiated twice and the wider one
// is picked when the processor has it.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define CRAM_HAS_AVX2_VARIANT 1
#define CRAM_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define CRAM_HAS_AVX2_VARIANT 0
#define CRAM_TARGET_AVX2
#endif

namespace cram {

inline bool cpu_has_avx2() {
#if CRAM_HAS_AVX2_VARIANT
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

// Runs lane.run(), an always-inline hot loop, in its AVX2+FMA instantiation when the
// processor has it, else in the generic one.
template <typename Lane>
void run_generic(const Lane& lane) { lane.run(); }

template <typename Lane>
CRAM_TARGET_AVX2 void run_avx2(const Lane& lane) { lane.run(); }

template <typename Lane>
void run_lane(const Lane& lane) {
  if (cpu_has_avx2()) {
    run_avx2(lane);
  } else {
    run_generic(lane);
  }
}

}  // namespace cram
