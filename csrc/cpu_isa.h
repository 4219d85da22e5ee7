// Which vector instruction set the CPU kernels' hot loops run with (runtime dispatch through
// parallel_for_isa below). The best one this CPU supports, unless SPECDIFF_CPU_CAPABILITY (default, avx2,
// avx512) asks for a narrower one: the same switch as ATen's ATEN_CPU_CAPABILITY, for tests and
// for comparing the variants.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>
#include <string>

namespace specdiff {
namespace cpu {

enum class Isa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// The variant the kernels use now.
Isa active_isa();
// The widest variant this CPU (and OS) supports.
Isa supported_isa();
// Use variant `name` ("default", "avx2", "avx512"; capped at supported_isa()); returns the name
// of the variant in use before. Unknown names raise.
std::string set_isa(const std::string& name);
std::string isa_name(Isa isa);

// The portable build targets baseline x86-64 (SSE2), where the Philox and Box-Muller loops run
// 4 lanes wide. Each parallel task body is therefore also compiled for AVX2 and for AVX-512
// (function attributes: the build stays one portable binary) and the widest variant this CPU
// supports is picked at run time, as ATen's DispatchStub does. "flatten" inlines the whole task
// body, so the wide code stays inside the variant: nothing shared is compiled with its ISA.
// Targets name instruction sets only (no arch=): GCC inlines default-target helpers only into
// callers with the same arch.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SPECDIFF_ISA_DISPATCH 1
#else
#define SPECDIFF_ISA_DISPATCH 0
#endif
#if defined(__GNUC__) || defined(__clang__)
#define SPECDIFF_FLATTEN __attribute__((flatten))
#else
#define SPECDIFF_FLATTEN
#endif
// A helper called from a task body that must keep the portable ISA: flatten does not inline it,
// so its arithmetic is compiled once, without the wide variants' FMA contraction (its results
// then do not depend on the variant, as when it ran outside the task body).
#if defined(__GNUC__) || defined(__clang__)
#define SPECDIFF_NOINLINE __attribute__((noinline))
#else
#define SPECDIFF_NOINLINE
#endif
#if SPECDIFF_ISA_DISPATCH
#define SPECDIFF_TARGET_AVX2 __attribute__((target("avx2,fma,bmi,bmi2,f16c"), flatten))
#define SPECDIFF_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi,bmi2,f16c"), flatten))
#endif

template <typename Fn> SPECDIFF_FLATTEN void run_default(const Fn& fn, int64_t b, int64_t e) {
  fn(b, e);
}
#if SPECDIFF_ISA_DISPATCH
template <typename Fn> SPECDIFF_TARGET_AVX2 void run_avx2(const Fn& fn, int64_t b, int64_t e) {
  fn(b, e);
}
template <typename Fn> SPECDIFF_TARGET_AVX512 void run_avx512(const Fn& fn, int64_t b, int64_t e) {
  fn(b, e);
}
#endif

// at::parallel_for over [0, n) with each range run by the selected ISA variant of fn.
template <typename Fn> void parallel_for_isa(int64_t n, const Fn& fn) {
  void (*run)(const Fn&, int64_t, int64_t) = &run_default<Fn>;
#if SPECDIFF_ISA_DISPATCH
  const Isa isa = active_isa();
  if (isa == Isa::kAvx512) run = &run_avx512<Fn>;
  else if (isa == Isa::kAvx2) run = &run_avx2<Fn>;
#endif
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) { run(fn, begin, end); });
}

}  // namespace cpu
}  // namespace specdiff
