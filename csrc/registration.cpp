// Schemas of the specdiff ops (SPEC §6). Device kernels register with TORCH_LIBRARY_IMPL elsewhere:
// CPU in verify_cpu.cpp, CUDA from Python (Triton). Fake (meta) kernels live in specdiff_kernels/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(specdiff, m) {
  m.def("gaussian_log_ratio(Tensor draft_states, Tensor draft_means, Tensor target_means, "
        "Tensor sigma) -> Tensor");
  m.def("first_rejection(Tensor log_ratio, Tensor uniforms, Tensor? num_steps=None) -> Tensor");
  m.def("reflect_resample(Tensor draft_state, Tensor draft_mean, Tensor target_mean) -> Tensor");
  m.def("speculative_verify(Tensor draft_states, Tensor draft_means, Tensor target_means, "
        "Tensor sigma, Tensor uniforms, Tensor? num_steps=None) -> (Tensor, Tensor, Tensor)");
}
