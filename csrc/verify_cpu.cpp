// CPU kernels for the speculative-verify ops (docs/design.md §3, §4).
//
// The sums of a row (chain, step) are taken over event blocks of kBlock elements, each block in
// kLanes fixed lanes of acc_type (cpu_kernel_common.h), the blocks then combined in block order in
// fp64. Neither the block nor the lanes depend on the thread count or on how the work is split
// into tasks (a task per chain, or per row and block), so every result is bit-for-bit
// reproducible across machines running the same instruction-set variant (cpu_isa.h: the wide
// variants contract multiply-adds into FMAs).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu_isa.h"
#include "cpu_kernel_common.h"

namespace specdiff {
namespace {

constexpr int64_t kBlock = 4096;

// <d, r> and ||d||^2 over one contiguous block, d = mp - mq, r = y - mq.
// kLanes independent partial sums per quantity: a single vector accumulator would make the loop
// wait on the FMA latency at every step; with several the loop streams at load bandwidth. The
// lanes are combined in a fixed order, so the result is still deterministic.
constexpr int64_t kLanes = 32;

template <typename scalar_t, typename acc_t>
inline void block_sums(const scalar_t* __restrict__ y, const scalar_t* __restrict__ mq,
                       const scalar_t* __restrict__ mp, int64_t n, SumPair& out) {
  acc_t av[kLanes] = {}, bv[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) {
      const acc_t q = static_cast<acc_t>(mq[i + l]);
      const acc_t d = static_cast<acc_t>(mp[i + l]) - q;
      const acc_t r = static_cast<acc_t>(y[i + l]) - q;
      av[l] += d * r;
      bv[l] += d * d;
    }
  }
  for (int64_t l = 0; i < n; ++i, ++l) {
    const acc_t q = static_cast<acc_t>(mq[i]);
    const acc_t d = static_cast<acc_t>(mp[i]) - q;
    const acc_t r = static_cast<acc_t>(y[i]) - q;
    av[l] += d * r;
    bv[l] += d * d;
  }
  out = sum_lanes(av, bv);
}

// out = y + coef * (mp - mq) over one block; coef = 1 - 2a/b (the reflection), computed in acc_t.
template <typename scalar_t, typename acc_t>
inline void block_reflect(const scalar_t* __restrict__ y, const scalar_t* __restrict__ mq,
                          const scalar_t* __restrict__ mp, scalar_t* __restrict__ out, int64_t n,
                          acc_t coef) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const acc_t d = static_cast<acc_t>(mp[i]) - static_cast<acc_t>(mq[i]);
    out[i] = static_cast<scalar_t>(static_cast<acc_t>(y[i]) + coef * d);
  }
}

inline int64_t num_blocks(int64_t D) { return (D + kBlock - 1) / kBlock; }

// ---------------------------------------------------------------- argument checks
// Returns the event size D of the [B, L, *E] window.
int64_t check_window(const char* op, const at::Tensor& y, const at::Tensor& mq, const at::Tensor& mp) {
  check_cpu_float(y, op, "draft_states");
  check_cpu_float(mq, op, "draft_means");
  check_cpu_float(mp, op, "target_means");
  TORCH_CHECK(y.dim() >= 3, op, ": draft_states must have shape [B, L, *E] with at least one event "
              "dim, got ", y.sizes());
  TORCH_CHECK(mq.sizes() == y.sizes(), op, ": draft_means shape ", mq.sizes(),
              " must equal draft_states shape ", y.sizes());
  TORCH_CHECK(mp.sizes() == y.sizes(), op, ": target_means shape ", mp.sizes(),
              " must equal draft_states shape ", y.sizes());
  TORCH_CHECK(mq.scalar_type() == y.scalar_type() && mp.scalar_type() == y.scalar_type(), op,
              ": draft_states, draft_means and target_means must share a dtype, got ",
              y.scalar_type(), ", ", mq.scalar_type(), ", ", mp.scalar_type());
  TORCH_CHECK(y.size(1) >= 1, op, ": window length L (draft_states.shape[1]) must be >= 1");
  return event_numel(y, op, 2);
}

// sigma as [B, L] fp64, contiguous; accepts scalar, [L], [1], [B, 1], [1, L], [B, L].
at::Tensor canonical_sigma(const char* op, const at::Tensor& sigma, int64_t B, int64_t L) {
  check_cpu_float(sigma, op, "sigma");
  TORCH_CHECK(sigma.dim() <= 2, op, ": sigma must be a scalar, [L] or [B, L], got shape ",
              sigma.sizes());
  at::Tensor s = sigma.to(at::kDouble);
  if (s.dim() == 1) s = s.unsqueeze(0);
  bool ok = s.dim() == 0 ||
            ((s.size(0) == B || s.size(0) == 1) && (s.size(1) == L || s.size(1) == 1));
  TORCH_CHECK(ok, op, ": sigma shape ", sigma.sizes(), " does not broadcast to [B, L] = [", B, ", ",
              L, "]");
  s = s.expand({B, L}).contiguous();
  const double* sp = s.data_ptr<double>();
  for (int64_t i = 0; i < B * L; ++i) {
    TORCH_CHECK(std::isfinite(sp[i]) && sp[i] > 0.0, op,
                ": sigma must be finite and > 0 everywhere, got ", sp[i], " at flat index ", i);
  }
  return s;
}

at::Tensor canonical_uniforms(const char* op, const at::Tensor& u, int64_t B, int64_t L) {
  check_cpu_float(u, op, "uniforms");
  TORCH_CHECK(u.dim() == 2 && u.size(0) == B && u.size(1) == L, op,
              ": uniforms must have shape [B, L] = [", B, ", ", L, "], got ", u.sizes());
  at::Tensor ud = u.to(at::kDouble).contiguous();
  const double* p = ud.data_ptr<double>();
  for (int64_t i = 0; i < B * L; ++i) {
    TORCH_CHECK(p[i] >= 0.0 && p[i] < 1.0, op, ": uniforms must lie in [0, 1), got ", p[i],
                " at flat index ", i);
  }
  return ud;
}

// lengths as [B] int64 with values in 1..L (default: all L).
std::vector<int64_t> canonical_lengths(const char* op, const c10::optional<at::Tensor>& lengths,
                                         int64_t B, int64_t L) {
  if (!lengths.has_value()) return std::vector<int64_t>(B, L);
  const at::Tensor& t = *lengths;
  check_cpu(t, op, "lengths");
  TORCH_CHECK(is_index_int(t.scalar_type()), op,
              ": lengths must be an integer tensor (int8, int16, int32, int64 or uint8), got ",
              t.scalar_type());
  check_batch_vector(t, op, "lengths", B);
  std::vector<int64_t> n = int64_values(t);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(n[b] >= 1 && n[b] <= L, op, ": lengths values must lie in 1..L = 1..", L,
                ", got ", n[b], " for chain ", b);
  }
  return n;
}

// The first rejected index in [0, n), or n.
inline int64_t scan_first_rejection(const double* lr, const double* u, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    if (!accepts(lr[j], u[j])) return j;
  }
  return n;
}

// The [B, L, D] window of one call as typed pointers into contiguous tensors.
template <typename scalar_t> struct Window {
  const scalar_t* y;   // draft_states
  const scalar_t* mq;  // draft_means
  const scalar_t* mp;  // target_means
  int64_t B, L, D;
  int64_t offset(int64_t chain, int64_t step) const { return (chain * L + step) * D; }
};

// <d, r> and ||d||^2 of block k of row (chain, step).
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
inline SumPair row_block_sums(const Window<scalar_t>& w, int64_t chain, int64_t step, int64_t k) {
  const int64_t lo = k * kBlock, off = w.offset(chain, step) + lo;
  SumPair s;
  block_sums<scalar_t, acc_t>(w.y + off, w.mq + off, w.mp + off, std::min(kBlock, w.D - lo), s);
  return s;
}

// What chain c's commit writes: the reflection of row (c, step) with coefficient coef, or a copy
// of y at (c, step).
struct ChainCommit {
  int64_t chain, step;
  bool reflect;
  double coef;  // 1 - 2a/b
};

// Block k of the committed state of one chain (out points at its row of next_state).
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
inline void commit_block(const Window<scalar_t>& w, const ChainCommit& c, scalar_t* out,
                         int64_t k) {
  const int64_t lo = k * kBlock, len = std::min(kBlock, w.D - lo);
  const int64_t off = w.offset(c.chain, c.step) + lo;
  if (c.reflect) {
    block_reflect<scalar_t, acc_t>(w.y + off, w.mq + off, w.mp + off, out + lo, len,
                                   static_cast<acc_t>(c.coef));
  } else {
    std::copy(w.y + off, w.y + off + len, out + lo);
  }
}

// The log ratio (<d, r> - ||d||^2 / 2) / sigma^2 of one step, in fp64.
inline double log_ratio_of(const SumPair& ab, double sigma) {
  return (ab.a - 0.5 * ab.b) / (sigma * sigma);
}

// Partial sums a, b for every (chain, step, block): parts[((c * L) + j) * nb + k], one task each.
template <typename scalar_t>
std::vector<SumPair> window_partial_sums(const Window<scalar_t>& w) {
  const int64_t nb = num_blocks(w.D), L = w.L;
  std::vector<SumPair> parts(static_cast<size_t>(w.B * L * nb));
  cpu::parallel_for_isa(w.B * L * nb, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / nb, k = task % nb;
      parts[static_cast<size_t>(task)] = row_block_sums(w, row / L, row % L, k);
    }
  });
  return parts;
}

// ---------------------------------------------------------------- ops
at::Tensor gaussian_log_ratio_cpu(const at::Tensor& draft_states, const at::Tensor& draft_means,
                                  const at::Tensor& target_means, const at::Tensor& sigma) {
  const char* op = "specdiff::gaussian_log_ratio";
  check_args(op, {{"draft_states", &draft_states, Kind::kState},
                  {"draft_means", &draft_means, Kind::kState},
                  {"target_means", &target_means, Kind::kState}, {"sigma", &sigma, Kind::kFloat}});
  const int64_t D = check_window(op, draft_states, draft_means, target_means);
  const int64_t B = draft_states.size(0), L = draft_states.size(1);
  at::Tensor s = canonical_sigma(op, sigma, B, L);
  at::Tensor y = draft_states.contiguous(), mq = draft_means.contiguous(),
             mp = target_means.contiguous();
  at::Tensor out = at::empty({B, L}, draft_states.options().dtype(at::kFloat));
  if (B == 0) return out;
  std::vector<SumPair> parts;
  SPECDIFF_DISPATCH_FLOATING(y.scalar_type(), "gaussian_log_ratio", [&] {
    parts = window_partial_sums(Window<scalar_t>{y.data_ptr<scalar_t>(), mq.data_ptr<scalar_t>(),
                                                 mp.data_ptr<scalar_t>(), B, L, D});
  });
  const int64_t nb = num_blocks(D);
  const double* sp = s.data_ptr<double>();
  float* o = out.data_ptr<float>();
  for (int64_t row = 0; row < B * L; ++row)
    o[row] = static_cast<float>(log_ratio_of(sum_blocks(parts, row, nb), sp[row]));
  return out;
}

at::Tensor first_rejection_cpu(const at::Tensor& log_ratio, const at::Tensor& uniforms,
                               const c10::optional<at::Tensor>& lengths) {
  const char* op = "specdiff::first_rejection";
  check_args(op, {{"log_ratio", &log_ratio, Kind::kFloat}, {"uniforms", &uniforms, Kind::kFloat},
                  {"lengths", lengths.has_value() ? &*lengths : nullptr, Kind::kInt}});
  check_cpu_float(log_ratio, op, "log_ratio");
  TORCH_CHECK(log_ratio.dim() == 2, op, ": log_ratio must have shape [B, L], got ",
              log_ratio.sizes());
  const int64_t B = log_ratio.size(0), L = log_ratio.size(1);
  TORCH_CHECK(L >= 1, op, ": window length L (log_ratio.shape[1]) must be >= 1");
  at::Tensor u = canonical_uniforms(op, uniforms, B, L);
  std::vector<int64_t> n = canonical_lengths(op, lengths, B, L);
  at::Tensor lr = log_ratio.to(at::kDouble).contiguous();
  at::Tensor out = at::empty({B}, log_ratio.options().dtype(at::kLong));
  const double* lp = lr.data_ptr<double>();
  const double* up = u.data_ptr<double>();
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) o[b] = scan_first_rejection(lp + b * L, up + b * L, n[b]);
  return out;
}

void check_reflect_args(const char* op, const at::Tensor& y, const at::Tensor& mq,
                        const at::Tensor& mp) {
  check_args(op, {{"draft_state", &y, Kind::kState}, {"draft_mean", &mq, Kind::kState},
                  {"target_mean", &mp, Kind::kState}});
  check_cpu_float(y, op, "draft_state");
  check_cpu_float(mq, op, "draft_mean");
  check_cpu_float(mp, op, "target_mean");
  TORCH_CHECK(y.dim() >= 2, op, ": draft_state must have shape [B, *E], got ", y.sizes());
  TORCH_CHECK(mq.sizes() == y.sizes() && mp.sizes() == y.sizes(), op,
              ": draft_state, draft_mean and target_mean must share a shape, got ", y.sizes(), ", ",
              mq.sizes(), ", ", mp.sizes());
  TORCH_CHECK(mq.scalar_type() == y.scalar_type() && mp.scalar_type() == y.scalar_type(), op,
              ": draft_state, draft_mean and target_mean must share a dtype, got ", y.scalar_type(),
              ", ", mq.scalar_type(), ", ", mp.scalar_type());
}

at::Tensor reflect_resample_cpu(const at::Tensor& draft_state, const at::Tensor& draft_mean,
                                const at::Tensor& target_mean) {
  const char* op = "specdiff::reflect_resample";
  check_reflect_args(op, draft_state, draft_mean, target_mean);
  const int64_t B = draft_state.size(0), D = event_numel(draft_state, op, 1);
  at::Tensor y = draft_state.contiguous(), mq = draft_mean.contiguous(), mp = target_mean.contiguous();
  at::Tensor out = at::empty_like(y);
  if (B == 0) return out;
  const int64_t nb = num_blocks(D);
  SPECDIFF_DISPATCH_FLOATING(y.scalar_type(), "reflect_resample", [&] {
    // A window of length 1 is exactly this op's layout.
    const Window<scalar_t> w{y.data_ptr<scalar_t>(), mq.data_ptr<scalar_t>(),
                             mp.data_ptr<scalar_t>(), B, 1, D};
    const std::vector<SumPair> parts = window_partial_sums(w);
    std::vector<double> coef(B);
    for (int64_t c = 0; c < B; ++c) coef[c] = reflection_coef(sum_blocks(parts, c, nb));
    scalar_t* o = out.data_ptr<scalar_t>();
    cpu::parallel_for_isa(B * nb, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t c = task / nb;
        commit_block(w, ChainCommit{c, 0, true, coef[c]}, o + c * D, task % nb);
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------- speculative_verify
// Three steps per chain, as the round ops' verify (round_cpu.cpp) and the Triton kernels: the sums
// of every step (the only O(L D) work: each input element read once), the decision (O(L): log
// ratios and the first rejection) and the commit (O(D): the reflected state, or a copy of y_n).

// The acceptance rule's inputs: sigma and the uniforms [B, L] (fp64) and the window lengths.
struct Rule {
  const double* sigma;
  const double* u;
  const int64_t* n;
};

// The op's small outputs, written by decide().
struct Decisions {
  float* log_ratio;       // [B, L]
  int64_t* num_accepted;  // [B]
};

// Step 2 for chain c from its L step sums ab: writes its log ratios and number of accepted steps,
// returns what the commit writes.
SPECDIFF_NOINLINE ChainCommit decide(const Rule& rule, const Decisions& out, int64_t c, int64_t L,
                     const SumPair* ab, double* lr) {
  for (int64_t j = 0; j < L; ++j) {
    lr[j] = log_ratio_of(ab[j], rule.sigma[c * L + j]);
    out.log_ratio[c * L + j] = static_cast<float>(lr[j]);
  }
  const int64_t n = rule.n[c], first = scan_first_rejection(lr, rule.u + c * L, n);
  out.num_accepted[c] = first;
  if (first < n) return ChainCommit{c, first, true, reflection_coef(ab[first])};
  return ChainCommit{c, n - 1, false, 1.0};
}

// The log ratio of step j of chain c, written out. Not inlined into the task bodies: its fp64
// arithmetic stays the portable one (no FMA contraction), as in decide().
SPECDIFF_NOINLINE double step_log_ratio(const Rule& rule, const Decisions& out, int64_t c,
                                        int64_t j, int64_t L, const SumPair& ab) {
  const double lr = log_ratio_of(ab, rule.sigma[c * L + j]);
  out.log_ratio[c * L + j] = static_cast<float>(lr);
  return lr;
}

// <d, r> and ||d||^2 of row (c, j): its blocks combined in block order, as sum_blocks does.
template <typename scalar_t>
inline SumPair row_sums(const Window<scalar_t>& w, int64_t c, int64_t j, int64_t nb) {
  SumPair s;
  for (int64_t k = 0; k < nb; ++k) {
    const SumPair p = row_block_sums(w, c, j, k);
    s.a += p.a;
    s.b += p.b;
  }
  return s;
}

// Chain c in one task, its steps in order: the step that decides the commit (the first rejected
// one, or the last of the window) is committed as soon as its sums are known, while its rows are
// still in this core's cache; the later steps only add their log ratios.
template <typename scalar_t>
inline void verify_chain(const Window<scalar_t>& w, const Rule& rule, const Decisions& out,
                         scalar_t* next_state, int64_t c) {
  const int64_t nb = num_blocks(w.D), n = rule.n[c];
  bool open = n > 0;
  for (int64_t j = 0; j < w.L; ++j) {
    const SumPair ab = row_sums(w, c, j, nb);
    const double lr = step_log_ratio(rule, out, c, j, w.L, ab);
    if (!open) continue;
    const bool accepted = accepts(lr, rule.u[c * w.L + j]);
    if (accepted && j < n - 1) continue;
    const ChainCommit commit = accepted ? ChainCommit{c, j, false, 1.0}
                                        : ChainCommit{c, j, true, reflection_coef(ab)};
    out.num_accepted[c] = accepted ? n : j;
    for (int64_t k = 0; k < nb; ++k) commit_block(w, commit, next_state + c * w.D, k);
    open = false;
  }
}

// The fused path (enough chains for every thread): one task per chain, one parallel region.
template <typename scalar_t>
void verify_by_chain(const Window<scalar_t>& w, const Rule& rule, const Decisions& out,
                     scalar_t* next_state) {
  cpu::parallel_for_isa(w.B, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) verify_chain(w, rule, out, next_state, c);
  });
}

// The split path (few chains, long rows): each step a parallel pass over (row, block) tasks.
template <typename scalar_t>
void verify_by_block(const Window<scalar_t>& w, const Rule& rule, const Decisions& out,
                     scalar_t* next_state) {
  const int64_t nb = num_blocks(w.D), L = w.L;
  const std::vector<SumPair> parts = window_partial_sums(w);
  std::vector<ChainCommit> commits;
  commits.reserve(static_cast<size_t>(w.B));
  std::vector<SumPair> ab(static_cast<size_t>(L));
  std::vector<double> lr(static_cast<size_t>(L));
  for (int64_t c = 0; c < w.B; ++c) {
    for (int64_t j = 0; j < L; ++j) ab[j] = sum_blocks(parts, c * L + j, nb);
    commits.push_back(decide(rule, out, c, L, ab.data(), lr.data()));
  }
  cpu::parallel_for_isa(w.B * nb, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task / nb;
      commit_block(w, commits[c], next_state + c * w.D, task % nb);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> speculative_verify_cpu(
    const at::Tensor& draft_states, const at::Tensor& draft_means, const at::Tensor& target_means,
    const at::Tensor& sigma, const at::Tensor& uniforms, const c10::optional<at::Tensor>& lengths) {
  const char* op = "specdiff::speculative_verify";
  check_args(op, {{"draft_states", &draft_states, Kind::kState},
                  {"draft_means", &draft_means, Kind::kState},
                  {"target_means", &target_means, Kind::kState}, {"sigma", &sigma, Kind::kFloat},
                  {"uniforms", &uniforms, Kind::kFloat},
                  {"lengths", lengths.has_value() ? &*lengths : nullptr, Kind::kInt}});
  const int64_t D = check_window(op, draft_states, draft_means, target_means);
  const int64_t B = draft_states.size(0), L = draft_states.size(1);
  const at::Tensor s = canonical_sigma(op, sigma, B, L), u = canonical_uniforms(op, uniforms, B, L);
  const std::vector<int64_t> n = canonical_lengths(op, lengths, B, L);
  const at::Tensor y = draft_states.contiguous(), mq = draft_means.contiguous(),
                   mp = target_means.contiguous();
  at::Tensor num_accepted = at::empty({B}, draft_states.options().dtype(at::kLong));
  at::Tensor next_state =
      at::empty(shape_with({B}, draft_states.sizes().slice(2)), draft_states.options());
  at::Tensor log_ratio = at::empty({B, L}, draft_states.options().dtype(at::kFloat));
  if (B == 0) return {num_accepted, next_state, log_ratio};
  const Rule rule{s.data_ptr<double>(), u.data_ptr<double>(), n.data()};
  const Decisions out{log_ratio.data_ptr<float>(), num_accepted.data_ptr<int64_t>()};
  // enough chains per thread to balance the load, else split the rows too (same sums either way)
  const int64_t threads = at::get_num_threads();
  const bool by_chain = threads == 1 || B >= 4 * threads;
  SPECDIFF_DISPATCH_FLOATING(y.scalar_type(), "speculative_verify", [&] {
    const Window<scalar_t> w{y.data_ptr<scalar_t>(), mq.data_ptr<scalar_t>(),
                             mp.data_ptr<scalar_t>(), B, L, D};
    if (by_chain) verify_by_chain(w, rule, out, next_state.data_ptr<scalar_t>());
    else verify_by_block(w, rule, out, next_state.data_ptr<scalar_t>());
  });
  return {num_accepted, next_state, log_ratio};
}

}  // namespace

TORCH_LIBRARY_IMPL(specdiff, CPU, m) {
  m.impl("gaussian_log_ratio", &gaussian_log_ratio_cpu);
  m.impl("first_rejection", &first_rejection_cpu);
  m.impl("reflect_resample", &reflect_resample_cpu);
  m.impl("speculative_verify", &speculative_verify_cpu);
}

}  // namespace specdiff
