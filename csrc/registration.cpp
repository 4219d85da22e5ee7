// Schemas of the specdiff ops (docs/design.md §4). Device kernels register with TORCH_LIBRARY_IMPL
// elsewhere: CPU in verify_cpu.cpp and round_cpu.cpp, CUDA from Python (Triton). Fake (meta)
// kernels live next to the public ops: specdiff_kernels/ops/verify.py and ops/round.py.
#include <torch/library.h>

TORCH_LIBRARY(specdiff, m) {
  m.def("gaussian_log_ratio(Tensor draft_states, Tensor draft_means, Tensor target_means, "
        "Tensor sigma) -> Tensor");
  m.def("first_rejection(Tensor log_ratio, Tensor uniforms, Tensor? lengths=None) -> Tensor");
  m.def("reflect_resample(Tensor draft_state, Tensor draft_mean, Tensor target_mean) -> Tensor");
  m.def("speculative_verify(Tensor draft_states, Tensor draft_means, Tensor target_means, "
        "Tensor sigma, Tensor uniforms, Tensor? lengths=None) -> (Tensor, Tensor, Tensor)");
  // The round ops (docs/design.md §6, §7): counter-based noise and the fused frozen-draft round.
  // Semantics: specdiff_kernels/ops/reference/round.py.
  m.def("chain_noise(Tensor seed, Tensor chain_ids, Tensor steps, int window, int event_numel, "
        "ScalarType dtype) -> (Tensor, Tensor)");
  m.def("frozen_draft(Tensor root, Tensor frozen, Tensor steps, Tensor lengths, Tensor coef, "
        "Tensor seed, Tensor chain_ids, int window, int freeze, float clip, Tensor? prev=None) "
        "-> Tensor");
  m.def("verify_frozen(Tensor states, Tensor x0_hat, Tensor frozen, Tensor steps, Tensor lengths, "
        "Tensor coef, Tensor seed, Tensor chain_ids, int freeze, float clip, Tensor? prev=None) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("round_stats(Tensor stats, Tensor steps, Tensor lengths, Tensor num_accepted, "
        "Tensor committed, Tensor log_ratio, Tensor output, int num_steps) -> Tensor");
}
