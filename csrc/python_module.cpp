// The Python extension module specdiff_kernels._C. Importing it runs the TORCH_LIBRARY registrations
// linked into it; the pybind11 part only reports how the library was built.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>

#ifndef SPECDIFF_CXX_FLAGS
#define SPECDIFF_CXX_FLAGS "unknown"
#endif
#ifndef SPECDIFF_BUILD_TYPE
#define SPECDIFF_BUILD_TYPE "unknown"
#endif

namespace py = pybind11;

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
  info["parallel_info"] = at::get_parallel_info();
  return info;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "specdiff_kernels C++ CPU backend (ops are registered under torch.ops.specdiff)";
  m.def("build_info", &build_info, "Compiler, flags, OpenMP and SIMD of this build");
}
