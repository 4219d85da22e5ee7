// The Python extension module specdiff_kernels._C. Importing it runs the TORCH_LIBRARY registrations
// linked into it; the pybind11 part only reports how the library was built.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>

#include "cpu_isa.h"

#ifndef SPECDIFF_CXX_FLAGS
#define SPECDIFF_CXX_FLAGS "unknown"
#endif
#ifndef SPECDIFF_BUILD_TYPE
#define SPECDIFF_BUILD_TYPE "unknown"
#endif

namespace py = pybind11;
namespace cpu = specdiff::cpu;

template <typename Fn> static std::string value_errors(Fn&& fn) {
  try {
    return fn();
  } catch (const c10::Error& e) {
    throw py::value_error(e.what_without_backtrace());
  }
}

static py::dict build_info() {
  py::dict info;
  info["compiler"] = __VERSION__;
  info["cxx_flags"] = SPECDIFF_CXX_FLAGS;
  info["build_type"] = SPECDIFF_BUILD_TYPE;
#ifdef _OPENMP
  info["openmp"] = _OPENMP;
#else
  info["openmp"] = py::none();
#endif
  py::list simd;
#ifdef __SSE4_2__
  simd.append("sse4.2");
#endif
#ifdef __AVX__
  simd.append("avx");
#endif
#ifdef __AVX2__
  simd.append("avx2");
#endif
#ifdef __FMA__
  simd.append("fma");
#endif
#ifdef __F16C__
  simd.append("f16c");
#endif
#ifdef __AVX512F__
  simd.append("avx512f");
#endif
#ifdef __ARM_NEON
  simd.append("neon");
#endif
  info["simd"] = simd;
  info["cpu_capability"] = value_errors([] { return cpu::isa_name(cpu::active_isa()); });
  info["parallel_info"] = at::get_parallel_info();
  return info;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "specdiff_kernels C++ CPU backend (ops are registered under torch.ops.specdiff)";
  m.def("build_info", &build_info, "Compiler, flags, OpenMP and SIMD of this build");
  // a bad SPECDIFF_CPU_CAPABILITY or name is a ValueError with one line, not a C++ backtrace
  m.def("cpu_capability", [] { return value_errors([] { return cpu::isa_name(cpu::active_isa()); }); },
        "The instruction set the round kernels run with now: default, avx2 or avx512");
  m.def("supported_cpu_capability", [] { return cpu::isa_name(cpu::supported_isa()); },
        "The widest instruction set this CPU supports");
  m.def("set_cpu_capability",
        [](const std::string& name) { return value_errors([&] { return cpu::set_isa(name); }); },
        py::arg("name"),
        "Run the round kernels with 'default', 'avx2' or 'avx512' (capped at what the CPU "
        "supports); returns the previous one");
}
