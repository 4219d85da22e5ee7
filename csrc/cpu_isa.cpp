// Runtime choice of the CPU kernels' instruction set (cpu_isa.h).
#include "cpu_isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

namespace specdiff {
namespace cpu {
namespace {

Isa parse(const std::string& name, const char* what) {
  if (name == "default") return Isa::kDefault;
  if (name == "avx2") return Isa::kAvx2;
  if (name == "avx512") return Isa::kAvx512;
  TORCH_CHECK(false, what, " must be one of default, avx2, avx512, got '", name, "'");
}

Isa cap(Isa isa) {
  const Isa best = supported_isa();
  return static_cast<int>(isa) < static_cast<int>(best) ? isa : best;
}

Isa initial() {
  const char* env = std::getenv("SPECDIFF_CPU_CAPABILITY");
  if (env == nullptr || *env == '\0') return supported_isa();
  return cap(parse(env, "SPECDIFF_CPU_CAPABILITY"));
}

std::atomic<int>& state() {
  static std::atomic<int> isa{static_cast<int>(initial())};
  return isa;
}

}  // namespace

Isa supported_isa() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  // __builtin_cpu_supports also checks that the OS saves the wide registers (XGETBV)
  static const Isa best = [] {
    __builtin_cpu_init();
    // exactly the instruction sets the variants are compiled for (SPECDIFF_TARGET_* in cpu_isa.h)
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") &&
                      __builtin_cpu_supports("f16c");
    if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
      return Isa::kAvx512;
    if (avx2) return Isa::kAvx2;
    return Isa::kDefault;
  }();
  return best;
#else
  return Isa::kDefault;
#endif
}

Isa active_isa() { return static_cast<Isa>(state().load(std::memory_order_relaxed)); }

std::string isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "default";
  }
}

std::string set_isa(const std::string& name) {
  const Isa isa = cap(parse(name, "set_cpu_capability: name"));
  return isa_name(static_cast<Isa>(state().exchange(static_cast<int>(isa))));
}

}  // namespace cpu
}  // namespace specdiff
