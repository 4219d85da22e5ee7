// CPU kernels of the round ops (docs/design.md §6): chain_noise, frozen_draft, verify_frozen, round_stats.
// Semantics: specdiff_kernels/ops/reference/round.py (the oracle the tests compare with).
//
// Work is split into tasks of (chain[, window position], chunk of kChunk Philox counters). One
// counter feeds four elements (the quarter layout: lane * Q + i), so a task touches four
// contiguous runs of each vector. Chunk sizes are constants, not functions of the thread count:
// every reduction is summed in the same order whatever the parallelism.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"
#include "cpu_kernel_common.h"
#include "philox.h"

namespace specdiff {
namespace {

using philox::Key;
using philox::kTile;

constexpr int64_t kChunk = 512;  // counters per task (a multiple of kTile)
static_assert(kChunk % kTile == 0, "chunks hold whole tiles");

// The constants of specdiff_kernels/ops/layout.py: the rows of the coefficient table (ROW_*), the
// freeze modes (FREEZE_*) and the head slots of the static round's stats vector (STAT_*).
// kH, the multistep term H p_prev, is read only when the op is given prev.
enum Row { kA = 0, kE, kG, kStd, kX0Y, kX0F, kEpsY, kEpsP, kH, kNumRows };
constexpr int64_t kFreezeX0 = 0, kFreezeEps = 1;
enum Stat {
  kStatRounds = 0, kStatWindows, kStatSpecSteps, kStatDetSteps, kStatBadOutput, kStatBadRatio,
  kStatStepsDone, kStatLive, kStatHead
};

// The quarter layout of a D-vector: element lane * Q + i for counter i; lane l holds cnt[l] valid
// counters (the last lanes are short when 4 does not divide D).
struct Layout {
  int64_t D, Q, cnt[4];
  explicit Layout(int64_t d) : D(d), Q((d + 3) / 4) {
    for (int l = 0; l < 4; ++l) cnt[l] = std::max<int64_t>(0, std::min<int64_t>(Q, D - l * Q));
  }
  int64_t chunks() const { return std::max<int64_t>(1, (Q + kChunk - 1) / kChunk); }
  int64_t chunk_end(int64_t ch) const { return std::min(Q, (ch + 1) * kChunk); }
};

template <typename acc_t> struct StepCoef {
  acc_t v[kNumRows];
  StepCoef(const double* coef, int64_t N, int64_t k) {
    const int64_t kc = std::min<int64_t>(std::max<int64_t>(k, 0), N - 1);
    for (int r = 0; r < kNumRows; ++r) v[r] = static_cast<acc_t>(coef[r * N + kc]);
  }
};

template <typename acc_t> inline acc_t clip_to(acc_t p, acc_t c) {
  return std::min(std::max(p, -c), c);  // NaN stays NaN; c = inf is the identity
}

// The draft's x0-hat at y (frozen x0: f itself; frozen eps: x0 from eps).
template <typename acc_t>
inline acc_t draft_x0(const StepCoef<acc_t>& c, acc_t y, acc_t f, bool eps) {
  return eps ? c.v[kX0Y] * y - c.v[kX0F] * f : f;
}

template <typename acc_t>
inline acc_t affine_mean(const StepCoef<acc_t>& c, acc_t p, acc_t x, acc_t clip) {
  return c.v[kA] * clip_to(p, clip) + c.v[kE] * p + c.v[kG] * x;
}

// m_p(y) - m_q(y): only the x0-hats differ.
template <typename acc_t>
inline acc_t mean_gap(const StepCoef<acc_t>& c, acc_t p, acc_t pq, acc_t clip) {
  return c.v[kA] * (clip_to(p, clip) - clip_to(pq, clip)) + c.v[kE] * (p - pq);
}

template <typename acc_t>
inline acc_t freeze_value(const StepCoef<acc_t>& c, acc_t y, acc_t p, bool eps) {
  return eps ? c.v[kEpsY] * y - c.v[kEpsP] * p : p;
}

// Counters of tile i0 that exist (the last tile of the vector may be short).
inline int tile_count(const Layout& lay, int64_t i0) {
  return static_cast<int>(std::min<int64_t>(kTile, lay.Q - i0));
}

// The normals of tile i0 of xi(key, chain, k): nz[lane][l] is element lane * Q + i0 + l.
template <typename acc_t>
inline void draw_tile(Key key, const Layout& lay, uint32_t chain, int64_t k, int64_t i0,
                      acc_t nz[4][kTile]) {
  philox::normal_tile<acc_t>(key, chain, k, static_cast<uint32_t>(i0), tile_count(lay, i0), nz);
}

// dst = src on the four runs of counters [i_lo, i_hi).
template <typename scalar_t>
inline void copy_chunk(const Layout& lay, int64_t i_lo, int64_t i_hi, const scalar_t* src,
                       scalar_t* dst) {
  for (int lane = 0; lane < 4; ++lane) {
    const int64_t lo = lane * lay.Q + i_lo, hi = lane * lay.Q + std::min(i_hi, lay.cnt[lane]);
    if (hi > lo) std::copy(src + lo, src + hi, dst + lo);
  }
}

// Calls fn(lane, l, e) for every valid element of tile i0 (counter i0 + l, element e).
template <typename Fn>
inline void for_tile(const Layout& lay, int64_t i0, Fn&& fn) {
  for (int lane = 0; lane < 4; ++lane) {
    const int64_t lim = std::min<int64_t>(kTile, lay.cnt[lane] - i0);
    const int64_t base = lane * lay.Q + i0;
#pragma omp simd
    for (int64_t l = 0; l < lim; ++l) fn(lane, l, base + l);
  }
}

// ---------------------------------------------------------------- argument checks
int64_t check_seed(const at::Tensor& seed, const char* op) {
  check_cpu(seed, op, "seed");
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1, op,
              ": seed must be an int64 tensor with one element, got ", seed.scalar_type(),
              " of shape ", seed.sizes());
  return seed.reshape({}).item<int64_t>();
}

std::vector<uint32_t> check_chain_ids(const at::Tensor& ids, const char* op, int64_t B) {
  check_int64_vector(ids, op, "chain_ids", B);
  const std::vector<int64_t> p = int64_values(ids);
  std::vector<uint32_t> out(B);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(p[b] >= 0 && p[b] < (int64_t(1) << 32), op, ": chain_ids must lie in [0, 2^32), got ",
                p[b], " at index ", b);
    out[b] = static_cast<uint32_t>(p[b]);
  }
  return out;
}

std::vector<int64_t> check_range(const at::Tensor& t, const char* op, const char* name, int64_t B,
                                 int64_t lo, int64_t hi) {
  check_int64_vector(t, op, name, B);
  std::vector<int64_t> out = int64_values(t);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(out[b] >= lo && out[b] <= hi, op, ": ", name, " must lie in ", lo, "..", hi,
                ", got ", out[b], " at index ", b);
  }
  return out;
}

// The arguments frozen_draft and verify_frozen share, as their schemas pass them (verify_frozen's
// root is states[:, 0] and its window the states' L).
struct RoundInputs {
  const at::Tensor& root;
  const at::Tensor& frozen;
  const at::Tensor& steps;
  const at::Tensor& lengths;
  const at::Tensor& coef;
  const at::Tensor& seed;
  const at::Tensor& chain_ids;
  const std::optional<at::Tensor>& prev;
  int64_t window;
  int64_t freeze;
  double clip;
};

// A round op's checked per-call constants: what every task reads.
struct Round {
  int64_t B, D, N, L;                 // chains, event elements, schedule steps, window
  std::vector<int64_t> step, length;  // per chain: the window's first step k and its length n
  std::vector<uint32_t> chain;        // per chain: the Philox chain word
  Key key;
  Layout lay;
  at::Tensor coef;  // contiguous float64 [9, N]
  bool eps;         // the frozen value is an eps (else an x0-hat)
  bool multistep;   // prev given: the means carry H times the previous prediction
  double clip;

  const double* table() const { return coef.data_ptr<double>(); }
  template <typename acc_t> StepCoef<acc_t> at_step(int64_t k) const {
    return StepCoef<acc_t>(table(), N, k);
  }
  double std_at(int64_t k) const { return table()[kStd * N + std::min(k, N - 1)]; }
};

void check_round_tensors(const char* op, const RoundInputs& in) {
  check_cpu_float(in.frozen, op, "frozen");
  TORCH_CHECK(in.frozen.sizes() == in.root.sizes() &&
                  in.frozen.scalar_type() == in.root.scalar_type(),
              op, ": frozen must match the root states' shape and dtype, got ", in.frozen.sizes(),
              " ", in.frozen.scalar_type(), " vs ", in.root.sizes(), " ", in.root.scalar_type());
  if (in.prev.has_value()) {
    const at::Tensor& prev = *in.prev;
    check_cpu_float(prev, op, "prev");
    TORCH_CHECK(prev.sizes() == in.root.sizes() && prev.scalar_type() == in.root.scalar_type(), op,
                ": prev must match the root states' shape and dtype, got ", prev.sizes(), " ",
                prev.scalar_type(), " vs ", in.root.sizes(), " ", in.root.scalar_type());
  }
  check_cpu(in.coef, op, "coef");
  TORCH_CHECK(in.coef.scalar_type() == at::kDouble && in.coef.dim() == 2 &&
                  in.coef.size(0) == kNumRows && in.coef.size(1) >= 1,
              op, ": coef must be the float64 [9, N] table of round_tables(transitions), got ",
              in.coef.scalar_type(), " ", in.coef.sizes());
  TORCH_CHECK(in.window >= 1, op, ": window must be >= 1, got ", in.window);
  TORCH_CHECK(in.freeze == kFreezeX0 || in.freeze == kFreezeEps, op,
              ": freeze must be 0 (x0) or 1 (eps), got ", in.freeze);
  TORCH_CHECK(in.clip > 0, op, ": clip must be > 0 (inf: no clipping), got ", in.clip);
}

// verify_frozen's windows must cover stochastic steps only (a draft step with std 0 is the
// deterministic step itself, which frozen_draft may take).
void check_stochastic_windows(const char* op, const Round& r) {
  const double* std = r.table() + kStd * r.N;
  for (int64_t b = 0; b < r.B; ++b) {
    for (int64_t j = 0; j < r.length[b]; ++j) {
      const int64_t k = r.step[b] + j;
      TORCH_CHECK(k < r.N && std[k] > 0.0, op, ": lengths[", b, "] = ", r.length[b], " from step ",
                  r.step[b], " reaches a deterministic step or the end of the schedule (N = ", r.N,
                  "); windows must cover stochastic steps only");
    }
  }
}

Round check_round(const char* op, const RoundInputs& in, bool stochastic_only) {
  check_round_tensors(op, in);
  const int64_t B = in.root.size(0), D = event_numel(in.root, op, 1), N = in.coef.size(1);
  const int64_t seed = check_seed(in.seed, op);
  std::vector<uint32_t> chain = check_chain_ids(in.chain_ids, op, B);
  std::vector<int64_t> step = check_range(in.steps, op, "steps", B, 0, N);
  std::vector<int64_t> length = check_range(in.lengths, op, "lengths", B, 0, in.window);
  Round r{B,
          D,
          N,
          in.window,
          std::move(step),
          std::move(length),
          std::move(chain),
          Key(seed),
          Layout(D),
          in.coef.contiguous(),
          /*eps=*/in.freeze == kFreezeEps,
          /*multistep=*/in.prev.has_value(),
          in.clip};
  if (stochastic_only) check_stochastic_windows(op, r);
  return r;
}

// ---------------------------------------------------------------- chain_noise
std::tuple<at::Tensor, at::Tensor> chain_noise_cpu(const at::Tensor& seed, const at::Tensor& chain_ids,
                                                   const at::Tensor& steps, int64_t window,
                                                   int64_t event_numel, at::ScalarType dtype) {
  const char* op = "specdiff::chain_noise";
  check_args(op, {{"seed", &seed, Kind::kInt64}, {"chain_ids", &chain_ids, Kind::kInt64},
                  {"steps", &steps, Kind::kInt64}});
  TORCH_CHECK(is_kernel_float(dtype), op,
              ": dtype must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK(chain_ids.dim() == 1, op, ": chain_ids must have shape [B], got ", chain_ids.sizes());
  const int64_t B = chain_ids.size(0);
  const Key key(check_seed(seed, op));
  std::vector<uint32_t> chain = check_chain_ids(chain_ids, op, B);
  std::vector<int64_t> k = check_range(steps, op, "steps", B, -1,
                                       (int64_t(1) << 32) - 2 - (int64_t(1) << 20));
  TORCH_CHECK(window >= 1, op, ": window must be >= 1, got ", window);
  TORCH_CHECK(event_numel >= 1, op, ": event_numel must be >= 1, got ", event_numel);
  const int64_t D = event_numel;
  at::Tensor xi = at::empty({B, window, D}, chain_ids.options().dtype(dtype));
  at::Tensor u = at::empty({B, window}, chain_ids.options().dtype(at::kFloat));
  float* up = u.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < window; ++j) up[b * window + j] = philox::uniform(key, chain[b], k[b] + j);
  const Layout lay(D);
  const int64_t nch = lay.chunks();
  SPECDIFF_DISPATCH_FLOATING(dtype, "chain_noise", [&] {
    using acc_t = acc_type<scalar_t>;
    scalar_t* out = xi.data_ptr<scalar_t>();
    cpu::parallel_for_isa(B * window * nch, [&](int64_t begin, int64_t end) {
      acc_t nz[4][kTile];
      for (int64_t task = begin; task < end; ++task) {
        const int64_t row = task / nch, ch = task % nch;
        const int64_t b = row / window, j = row % window;
        scalar_t* o = out + row * D;
        for (int64_t i0 = ch * kChunk; i0 < lay.chunk_end(ch); i0 += kTile) {
          draw_tile<acc_t>(key, lay, chain[b], k[b] + j, i0, nz);
          for_tile(lay, i0, [&](int lane, int64_t l, int64_t e) {
            o[e] = static_cast<scalar_t>(nz[lane][l]);
          });
        }
      }
    });
  });
  return {xi, u};
}

// ---------------------------------------------------------------- frozen_draft
// One chain's vectors for the draft rollout (contiguous): root x [D], frozen f [D], prev [D] (null
// without prev), and the output window Y [L+1, D].
template <typename scalar_t> struct DraftChain {
  const scalar_t* root;
  const scalar_t* frozen;
  const scalar_t* prev;
  scalar_t* window;
};

// Which previous prediction a multistep draft step adds (H times it): none (one-step), the op's
// prev (at j = 0), or the draft's own x0-hat at the stored state Y[j-1] (recomputed from the
// rounded state, as the oracle does).
enum class DraftPrev { kNone, kGiven, kRecomputed };

// Y[j+1] = the draft's mean at Y[j] + std xi_j over the counters [i_lo, i_hi) of chain b. The
// variant is chosen per step, outside the element loop.
template <typename scalar_t, DraftPrev kPrev, typename acc_t = acc_type<scalar_t>>
inline void draft_step(const Round& r, const DraftChain<scalar_t>& c, int64_t b, int64_t j,
                       int64_t i_lo, int64_t i_hi, acc_t (&nz)[4][kTile]) {
  const scalar_t* cur = c.window + j * r.D;  // the state drafted from (not the op's prev)
  scalar_t* next = c.window + (j + 1) * r.D;
  const scalar_t* prev_src = kPrev == DraftPrev::kGiven        ? c.prev
                             : kPrev == DraftPrev::kRecomputed ? cur - r.D
                                                               : nullptr;
  const StepCoef<acc_t> s = r.at_step<acc_t>(r.step[b] + j);
  const StepCoef<acc_t> s_before = r.at_step<acc_t>(r.step[b] + j - 1);
  const acc_t cl = static_cast<acc_t>(r.clip);
  const bool eps = r.eps;
  for (int64_t i0 = i_lo; i0 < i_hi; i0 += kTile) {
    draw_tile<acc_t>(r.key, r.lay, r.chain[b], r.step[b] + j, i0, nz);
    for_tile(r.lay, i0, [&](int lane, int64_t l, int64_t e) {
      const acc_t y = static_cast<acc_t>(cur[e]);
      const acc_t f = static_cast<acc_t>(c.frozen[e]);
      const acc_t p = draft_x0(s, y, f, eps);
      acc_t m = affine_mean(s, p, y, cl);
      if constexpr (kPrev == DraftPrev::kGiven) m = m + s.v[kH] * static_cast<acc_t>(prev_src[e]);
      if constexpr (kPrev == DraftPrev::kRecomputed)
        m = m + s.v[kH] * draft_x0(s_before, static_cast<acc_t>(prev_src[e]), f, eps);
      next[e] = static_cast<scalar_t>(m + s.v[kStd] * nz[lane][l]);
    });
  }
}

// Chain b's whole window over the counters of chunk ch: Y[0] = root, then L draft steps (a copy
// of the state past the chain's length).
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
inline void draft_chunk(const Round& r, const DraftChain<scalar_t>& c, int64_t b, int64_t ch,
                        acc_t (&nz)[4][kTile]) {
  const int64_t i_lo = ch * kChunk, i_hi = r.lay.chunk_end(ch);
  copy_chunk(r.lay, i_lo, i_hi, c.root, c.window);
  for (int64_t j = 0; j < r.L; ++j) {
    if (j >= r.length[b]) {
      copy_chunk(r.lay, i_lo, i_hi, c.window + j * r.D, c.window + (j + 1) * r.D);
    } else if (!r.multistep) {
      draft_step<scalar_t, DraftPrev::kNone>(r, c, b, j, i_lo, i_hi, nz);
    } else if (j == 0) {
      draft_step<scalar_t, DraftPrev::kGiven>(r, c, b, j, i_lo, i_hi, nz);
    } else {
      draft_step<scalar_t, DraftPrev::kRecomputed>(r, c, b, j, i_lo, i_hi, nz);
    }
  }
}

at::Tensor frozen_draft_cpu(const at::Tensor& root, const at::Tensor& frozen, const at::Tensor& steps,
                            const at::Tensor& lengths, const at::Tensor& coef, const at::Tensor& seed,
                            const at::Tensor& chain_ids, int64_t window, int64_t freeze, double clip,
                            const std::optional<at::Tensor>& prev) {
  const char* op = "specdiff::frozen_draft";
  check_args(op, {{"root", &root, Kind::kState}, {"frozen", &frozen, Kind::kState},
                  {"steps", &steps, Kind::kInt64}, {"lengths", &lengths, Kind::kInt64},
                  {"coef", &coef, Kind::kFloat64}, {"seed", &seed, Kind::kInt64},
                  {"chain_ids", &chain_ids, Kind::kInt64},
                  {"prev", prev.has_value() ? &*prev : nullptr, Kind::kState}});
  check_cpu_float(root, op, "root");
  TORCH_CHECK(root.dim() >= 2, op, ": root must have shape [B, *E], got ", root.sizes());
  const Round r = check_round(
      op, {root, frozen, steps, lengths, coef, seed, chain_ids, prev, window, freeze, clip}, false);
  at::Tensor Y = at::empty(shape_with({r.B, window + 1}, root.sizes().slice(1)),
                           root.options().memory_format(at::MemoryFormat::Contiguous));
  if (r.B == 0) return Y;
  const at::Tensor x = root.contiguous(), f = frozen.contiguous();
  const at::Tensor pv = r.multistep ? prev->contiguous() : at::Tensor();
  const int64_t nch = r.lay.chunks(), D = r.D;
  SPECDIFF_DISPATCH_FLOATING(root.scalar_type(), "frozen_draft", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* fp = f.data_ptr<scalar_t>();
    const scalar_t* pp = r.multistep ? pv.data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = Y.data_ptr<scalar_t>();
    cpu::parallel_for_isa(r.B * nch, [&](int64_t begin, int64_t end) {
      acc_t nz[4][kTile];
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / nch;
        const DraftChain<scalar_t> c{xp + b * D, fp + b * D, pp ? pp + b * D : nullptr,
                                     yp + b * (r.L + 1) * D};
        draft_chunk<scalar_t>(r, c, b, task % nch, nz);
      }
    });
  });
  return Y;
}

// ---------------------------------------------------------------- verify_frozen
// Three passes, as the Triton kernels (ops/triton/round.py): partial_sums (O(B L D), the noise
// drawn again in-kernel), decide (O(B L): log ratios, first rejection, what each chain commits),
// commit (O(B D): the next state, frozen value and previous prediction).

// verify_frozen's inputs as typed pointers into contiguous tensors.
template <typename scalar_t> struct VerifyInputs {
  const scalar_t* states;  // Y [B, L+1, D]: the root and the drafted states
  const scalar_t* x0_hat;  // P [B, L+1, D]: the target's x0-hats at Y
  const scalar_t* frozen;  // f [B, D]
  const scalar_t* prev;    // [B, D]: the previous prediction at the root; null without prev
};

// The op's seven results.
struct VerifyOutputs {
  at::Tensor num_accepted, committed, next_state, next_frozen, root_exact, log_ratio, next_prev;
};

using FrozenVerifyOut =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

FrozenVerifyOut as_tuple(const VerifyOutputs& o) {
  return {o.num_accepted, o.committed, o.next_state, o.next_frozen, o.root_exact, o.log_ratio,
          o.next_prev};
}

VerifyOutputs allocate_outputs(const Round& r, const at::Tensor& states) {
  const std::vector<int64_t> state_shape = shape_with({r.B}, states.sizes().slice(2));
  auto opts = states.options().memory_format(at::MemoryFormat::Contiguous);
  VerifyOutputs o;
  o.num_accepted = at::empty({r.B}, opts.dtype(at::kLong));
  o.committed = at::empty({r.B}, opts.dtype(at::kLong));
  o.next_state = at::empty(state_shape, opts);
  o.next_frozen = at::empty(state_shape, opts);
  o.root_exact = at::empty({r.B}, opts.dtype(at::kBool));
  o.log_ratio = at::zeros({r.B, r.L}, opts.dtype(at::kFloat));
  // the target's x0-hat at next_state's parent (multistep only; an empty [0] tensor without prev)
  o.next_prev = r.multistep ? at::empty(state_shape, opts) : at::empty({0}, opts);
  return o;
}

enum class Commit : uint8_t { kIdle, kAccept, kDeterministic, kReflect };

struct ChainDecision {
  Commit mode = Commit::kIdle;
  int64_t pos = 0;          // the window position whose state and prediction decide the commit
  bool new_frozen = false;  // next_frozen = freeze(Y_pos, P_pos); else the old frozen value
  double reflect = 1.0;     // 1 - 2 <d, r> / ||d||^2 at a rejection
};

// <d_j, xi_j> and ||d_j||^2 of window position j of chain b over chunk ch, d_j = m_p - m_q at
// Y_j. Multistep (kMulti, j >= 1): d_j gains H (P_{j-1} - p_q(Y_{j-1})), the gap of the two
// previous predictions; at j = 0 both means share prev, so d_0 has no H term.
template <typename scalar_t, bool kMulti, typename acc_t = acc_type<scalar_t>>
inline SumPair position_sums(const Round& r, const VerifyInputs<scalar_t>& in, int64_t b, int64_t j,
                             int64_t ch, acc_t (&nz)[4][kTile]) {
  const int64_t D = r.D;
  const StepCoef<acc_t> s = r.at_step<acc_t>(r.step[b] + j);
  const StepCoef<acc_t> s_before = r.at_step<acc_t>(r.step[b] + j - 1);
  const scalar_t* y = in.states + (b * (r.L + 1) + j) * D;
  const scalar_t* p = in.x0_hat + (b * (r.L + 1) + j) * D;
  const scalar_t* f = in.frozen + b * D;
  const acc_t cl = static_cast<acc_t>(r.clip);
  const bool eps = r.eps;
  acc_t av[kTile] = {}, bv[kTile] = {};
  for (int64_t i0 = ch * kChunk; i0 < r.lay.chunk_end(ch); i0 += kTile) {
    draw_tile<acc_t>(r.key, r.lay, r.chain[b], r.step[b] + j, i0, nz);
    for_tile(r.lay, i0, [&](int lane, int64_t l, int64_t e) {
      const acc_t fe = static_cast<acc_t>(f[e]);
      const acc_t pq = draft_x0(s, static_cast<acc_t>(y[e]), fe, eps);
      acc_t d = mean_gap(s, static_cast<acc_t>(p[e]), pq, cl);
      if constexpr (kMulti) {
        const acc_t pq_before = draft_x0(s_before, static_cast<acc_t>(y[e - D]), fe, eps);
        d = d + s.v[kH] * (static_cast<acc_t>(p[e - D]) - pq_before);
      }
      av[l] += d * nz[lane][l];
      bv[l] += d * d;
    });
  }
  return sum_lanes(av, bv);
}

// Pass 1: the sums of every (chain, position, chunk), parts[(b * L + j) * chunks + ch]; positions
// past a chain's length stay zero.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
std::vector<SumPair> partial_sums(const Round& r, const VerifyInputs<scalar_t>& in) {
  const int64_t nch = r.lay.chunks(), L = r.L;
  std::vector<SumPair> parts(static_cast<size_t>(r.B * L * nch));
  cpu::parallel_for_isa(r.B * L * nch, [&](int64_t begin, int64_t end) {
    acc_t nz[4][kTile];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / nch, ch = task % nch;
      const int64_t b = row / L, j = row % L;
      if (j >= r.length[b]) continue;
      parts[static_cast<size_t>(task)] = r.multistep && j > 0
                                             ? position_sums<scalar_t, true>(r, in, b, j, ch, nz)
                                             : position_sums<scalar_t, false>(r, in, b, j, ch, nz);
    }
  });
  return parts;
}

// Pass 2 (O(B L)): the log ratios (sums over xi, the draft step's noise: r = std xi), the
// uniforms, the first rejection and each chain's commit; writes the op's small outputs.
std::vector<ChainDecision> decide(const Round& r, const std::vector<SumPair>& parts,
                                  const VerifyOutputs& out) {
  const int64_t nch = r.lay.chunks(), L = r.L, N = r.N;
  float* log_ratio = out.log_ratio.data_ptr<float>();
  int64_t* num_accepted = out.num_accepted.data_ptr<int64_t>();
  int64_t* committed = out.committed.data_ptr<int64_t>();
  bool* root_exact = out.root_exact.data_ptr<bool>();
  std::vector<ChainDecision> decisions(r.B);
  for (int64_t b = 0; b < r.B; ++b) {
    const int64_t k = r.step[b], n = r.length[b];
    int64_t first = n;
    double reflect = 1.0;
    for (int64_t j = 0; j < n; ++j) {
      const SumPair dx = sum_blocks(parts, b * L + j, nch);
      const double s = r.std_at(k + j);
      const double lr = dx.a / s - dx.b / (2.0 * s * s);
      log_ratio[b * L + j] = static_cast<float>(lr);
      const double u = philox::uniform(r.key, r.chain[b], k + j);
      if (first == n && !accepts(lr, u)) {
        first = j;
        reflect = reflection_coef(dx, s);
      }
    }
    ChainDecision& d = decisions[b];
    num_accepted[b] = first;
    const bool live_next = k + n < N;
    const bool det_next = live_next && r.std_at(k + n) == 0.0;
    if (first < n) {
      d = {Commit::kReflect, first, true, reflect};
      committed[b] = first + 1;
    } else if (det_next) {
      d = {Commit::kDeterministic, n, true, 1.0};
      committed[b] = n + 1;
    } else {
      d = {n > 0 ? Commit::kAccept : Commit::kIdle, n, n > 0 && live_next, 1.0};
      committed[b] = n;
    }
    root_exact[b] = d.mode == Commit::kAccept && live_next;
  }
  return decisions;
}

// Where pass 3 writes chain b's vectors.
template <typename scalar_t> struct CommitTargets {
  scalar_t* state;
  scalar_t* frozen;
  scalar_t* prev;  // null without prev
};

// Pass 3 for chain b over chunk ch: the reflected draft step at a rejection, the deterministic
// step after a fully accepted window, else Y_pos; the frozen value and (multistep) the target's
// x0-hat at the new state's parent.
template <typename scalar_t, bool kMulti, typename acc_t = acc_type<scalar_t>>
inline void commit_chunk(const Round& r, const VerifyInputs<scalar_t>& in, const ChainDecision& d,
                         const CommitTargets<scalar_t>& out, int64_t b, int64_t ch,
                         acc_t (&nz)[4][kTile]) {
  const int64_t D = r.D, kp = r.step[b] + d.pos;
  const StepCoef<acc_t> s = r.at_step<acc_t>(kp);
  const StepCoef<acc_t> s_before = r.at_step<acc_t>(kp - 1);
  const scalar_t* y = in.states + (b * (r.L + 1) + d.pos) * D;
  const scalar_t* p = in.x0_hat + (b * (r.L + 1) + d.pos) * D;
  const scalar_t* f = in.frozen + b * D;
  const acc_t cl = static_cast<acc_t>(r.clip), refl = static_cast<acc_t>(d.reflect);
  const bool eps = r.eps;
  // the previous predictions at the deciding position: prev at the root, else the target's
  // P_{pos-1} and the draft's x0-hat at Y_{pos-1}
  const bool at_root = d.pos == 0;
  const scalar_t* prev = kMulti ? in.prev + b * D : nullptr;
  const scalar_t* y_before = at_root ? y : y - D;
  const scalar_t* p_before = at_root ? p : p - D;
  const bool parent_is_pos = d.mode == Commit::kReflect || d.mode == Commit::kDeterministic;
  for (int64_t i0 = ch * kChunk; i0 < r.lay.chunk_end(ch); i0 += kTile) {
    if (d.mode == Commit::kReflect) draw_tile<acc_t>(r.key, r.lay, r.chain[b], kp, i0, nz);
    for_tile(r.lay, i0, [&](int lane, int64_t l, int64_t e) {
      const acc_t ye = static_cast<acc_t>(y[e]);
      const acc_t pe = static_cast<acc_t>(p[e]);
      const acc_t fe = static_cast<acc_t>(f[e]);
      acc_t tq = 0, dq = 0;  // the target's and the draft's previous predictions
      if constexpr (kMulti) {
        if (at_root) {
          tq = dq = static_cast<acc_t>(prev[e]);
        } else {
          tq = static_cast<acc_t>(p_before[e]);
          dq = draft_x0(s_before, static_cast<acc_t>(y_before[e]), fe, eps);
        }
      }
      acc_t next = ye;
      if (d.mode == Commit::kReflect) {
        const acc_t pq = draft_x0(s, ye, fe, eps);
        acc_t mq = affine_mean(s, pq, ye, cl);
        acc_t gap = mean_gap(s, pe, pq, cl);
        if constexpr (kMulti) {
          mq = mq + s.v[kH] * dq;
          gap = gap + s.v[kH] * (tq - dq);
        }
        next = mq + s.v[kStd] * nz[lane][l] + refl * gap;
      } else if (d.mode == Commit::kDeterministic) {
        next = affine_mean(s, pe, ye, cl);
        if constexpr (kMulti) next = next + s.v[kH] * tq;
      }
      out.state[e] = static_cast<scalar_t>(next);
      out.frozen[e] = d.new_frozen ? static_cast<scalar_t>(freeze_value(s, ye, pe, eps)) : f[e];
      if constexpr (kMulti) out.prev[e] = parent_is_pos ? p[e] : static_cast<scalar_t>(tq);
    });
  }
}

// Pass 3: next_state, next_frozen (and next_prev), chunk by chunk.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
void commit(const Round& r, const VerifyInputs<scalar_t>& in,
            const std::vector<ChainDecision>& decisions, const VerifyOutputs& out) {
  const int64_t nch = r.lay.chunks(), D = r.D;
  scalar_t* state = out.next_state.data_ptr<scalar_t>();
  scalar_t* frozen = out.next_frozen.data_ptr<scalar_t>();
  scalar_t* prev = r.multistep ? out.next_prev.data_ptr<scalar_t>() : nullptr;
  cpu::parallel_for_isa(r.B * nch, [&](int64_t begin, int64_t end) {
    acc_t nz[4][kTile];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nch, ch = task % nch;
      const CommitTargets<scalar_t> t{state + b * D, frozen + b * D, prev ? prev + b * D : nullptr};
      if (r.multistep) commit_chunk<scalar_t, true>(r, in, decisions[b], t, b, ch, nz);
      else commit_chunk<scalar_t, false>(r, in, decisions[b], t, b, ch, nz);
    }
  });
}

FrozenVerifyOut verify_frozen_cpu(const at::Tensor& states, const at::Tensor& x0_hat,
                                  const at::Tensor& frozen, const at::Tensor& steps,
                                  const at::Tensor& lengths, const at::Tensor& coef,
                                  const at::Tensor& seed, const at::Tensor& chain_ids,
                                  int64_t freeze, double clip,
                                  const std::optional<at::Tensor>& prev) {
  const char* op = "specdiff::verify_frozen";
  check_args(op, {{"states", &states, Kind::kState}, {"x0_hat", &x0_hat, Kind::kState},
                  {"frozen", &frozen, Kind::kState}, {"steps", &steps, Kind::kInt64},
                  {"lengths", &lengths, Kind::kInt64}, {"coef", &coef, Kind::kFloat64},
                  {"seed", &seed, Kind::kInt64}, {"chain_ids", &chain_ids, Kind::kInt64},
                  {"prev", prev.has_value() ? &*prev : nullptr, Kind::kState}});
  check_cpu_float(states, op, "states");
  check_cpu_float(x0_hat, op, "x0_hat");
  TORCH_CHECK(states.dim() >= 3 && states.size(1) >= 2, op,
              ": states must have shape [B, L+1, *E] with L >= 1, got ", states.sizes());
  TORCH_CHECK(x0_hat.sizes() == states.sizes() && x0_hat.scalar_type() == states.scalar_type(), op,
              ": x0_hat must match states' shape and dtype, got ", x0_hat.sizes(), " ",
              x0_hat.scalar_type());
  const at::Tensor root = states.select(1, 0);
  const Round r = check_round(op,
                              {root, frozen, steps, lengths, coef, seed, chain_ids, prev,
                               states.size(1) - 1, freeze, clip},
                              true);
  const VerifyOutputs out = allocate_outputs(r, states);
  if (r.B == 0) return as_tuple(out);
  const at::Tensor Y = states.contiguous(), P = x0_hat.contiguous(), F = frozen.contiguous();
  const at::Tensor prev_c = r.multistep ? prev->contiguous() : at::Tensor();
  SPECDIFF_DISPATCH_FLOATING(states.scalar_type(), "verify_frozen", [&] {
    const VerifyInputs<scalar_t> in{Y.data_ptr<scalar_t>(), P.data_ptr<scalar_t>(),
                                    F.data_ptr<scalar_t>(),
                                    r.multistep ? prev_c.data_ptr<scalar_t>() : nullptr};
    const std::vector<SumPair> parts = partial_sums<scalar_t>(r, in);
    const std::vector<ChainDecision> decisions = decide(r, parts, out);
    commit<scalar_t>(r, in, decisions, out);
  });
  return as_tuple(out);
}

// Whether each of the `rows` rows of t (its elements in memory order, numel / rows per row) is
// all finite: one pass rather than at::isfinite(...).all() per row, since each aten call costs
// as much as the loop.
std::vector<char> finite_rows(const at::Tensor& t, int64_t rows) {
  const at::Tensor c = t.contiguous();
  const int64_t D = c.numel() / std::max<int64_t>(1, rows);
  std::vector<char> finite(static_cast<size_t>(rows));
  SPECDIFF_DISPATCH_FLOATING(c.scalar_type(), "round_stats", [&] {
    const scalar_t* p = c.data_ptr<scalar_t>();
    for (int64_t r = 0; r < rows; ++r) {
      bool ok = true;
      for (int64_t e = 0; e < D; ++e) ok &= std::isfinite(static_cast<double>(p[r * D + e]));
      finite[r] = ok;
    }
  });
  return finite;
}

// The static round's counters after one round (ops/reference/round.py round_stats, laid out by
// ops/layout.py StatsLayout): one
// pass over the chains instead of ~200 small eager ops. Returns a new vector (the round is pure:
// a CUDA-graph warm-up or a compiled trace may run it twice).
at::Tensor round_stats_cpu(const at::Tensor& stats, const at::Tensor& steps, const at::Tensor& lengths,
                           const at::Tensor& num_accepted, const at::Tensor& committed,
                           const at::Tensor& log_ratio, const at::Tensor& output, int64_t num_steps) {
  const char* op = "specdiff::round_stats";
  check_args(op, {{"stats", &stats, Kind::kInt64}, {"steps", &steps, Kind::kInt64},
                  {"lengths", &lengths, Kind::kInt64},
                  {"num_accepted", &num_accepted, Kind::kInt64},
                  {"committed", &committed, Kind::kInt64}, {"log_ratio", &log_ratio, Kind::kFloat},
                  {"output", &output, Kind::kFloat}});
  TORCH_CHECK(log_ratio.dim() == 2, op, ": log_ratio must have shape [B, L], got ", log_ratio.sizes());
  const int64_t B = log_ratio.size(0), L = log_ratio.size(1), N = num_steps;
  TORCH_CHECK(N >= 1 && L >= 1, op, ": num_steps and L must be >= 1, got ", N, " and ", L);
  check_int64_vector(steps, op, "steps", B);
  check_int64_vector(lengths, op, "lengths", B);
  check_int64_vector(num_accepted, op, "num_accepted", B);
  check_int64_vector(committed, op, "committed", B);
  const int64_t size = kStatHead + 4 * L + 2 + 2 * N + B;
  TORCH_CHECK(stats.scalar_type() == at::kLong && stats.dim() == 1 && stats.size(0) == size, op,
              ": stats must be the int64 vector of StatsLayout(L, N, B) (", size, " entries), got ",
              stats.scalar_type(), " ", stats.sizes());
  TORCH_CHECK(output.dim() >= 2 && output.size(0) == B && output.size(1) == L + 1, op,
              ": output must have shape [B, L+1, ...] = [", B, ", ", L + 1, ", ...], got ", output.sizes());
  check_cpu_float(output, op, "output");
  check_cpu_float(log_ratio, op, "log_ratio");
  at::Tensor out = stats.contiguous().clone();
  if (B == 0) return out;
  int64_t* s = out.data_ptr<int64_t>();
  int64_t* pos_acc = s + kStatHead;
  int64_t* pos_att = pos_acc + L;
  int64_t* len_hist = pos_att + L;
  int64_t* win_hist = len_hist + L + 1;
  int64_t* step_acc = win_hist + L + 1;
  int64_t* step_att = step_acc + N;
  int64_t* chain_rounds = step_att + N;
  const std::vector<int64_t> k = int64_values(steps), n = int64_values(lengths),
                             na = int64_values(num_accepted), cm = int64_values(committed);
  // finiteness of each (chain, position) of the output and of each log ratio
  const std::vector<char> fo = finite_rows(output, B * (L + 1)), fr = finite_rows(log_ratio, B * L);
  const int64_t rounds = s[kStatRounds] + 1;
  int64_t windows = 0, spec_total = 0, det_total = 0, done = 0, live = 0;
  int64_t bad_out = s[kStatBadOutput], bad_ratio = s[kStatBadRatio];
  for (int64_t b = 0; b < B; ++b) {
    const int64_t kb = k[b], nb = n[b], ab = na[b];
    TORCH_CHECK(nb >= 0 && nb <= L && ab >= 0 && ab <= nb, op, ": chain ", b,
                " has lengths = ", nb, " and num_accepted = ", ab, " (need 0 <= num_accepted <= lengths <= L = ", L, ")");
    const int64_t spec = nb > 0 ? 1 : 0;
    const int64_t spec_steps = (ab + (ab < nb ? 1 : 0)) * spec;
    windows += spec;
    spec_total += spec_steps;
    det_total += cm[b] - spec_steps;
    len_hist[ab] += spec;
    win_hist[nb] += spec;
    const int64_t code0 = b * (N + 1) + kb;
    for (int64_t j = 0; j < L; ++j) {
      const bool attempted = j < nb && j <= ab, accepted = j < ab;
      const int64_t kw = std::min(kb + j, N - 1);
      pos_acc[j] += accepted;
      pos_att[j] += attempted;
      step_acc[kw] += accepted;
      step_att[kw] += attempted;
      if (attempted && !fr[b * L + j]) bad_ratio = std::min(bad_ratio, code0 + j);
    }
    if (kb < N) {
      for (int64_t j = 0; j <= nb; ++j)
        if (!fo[b * (L + 1) + j]) bad_out = std::min(bad_out, code0 + j);
    }
    const int64_t k_new = kb + cm[b];
    done += std::min(k_new, N);
    live += k_new < N;
    if (kb < N && k_new >= N) chain_rounds[b] = rounds;
  }
  s[kStatRounds] = rounds;
  s[kStatWindows] += windows;
  s[kStatSpecSteps] += spec_total;
  s[kStatDetSteps] += det_total;
  s[kStatBadOutput] = bad_out;
  s[kStatBadRatio] = bad_ratio;
  s[kStatStepsDone] = done;
  s[kStatLive] = live;
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(specdiff, CPU, m) {
  m.impl("chain_noise", &chain_noise_cpu);
  m.impl("frozen_draft", &frozen_draft_cpu);
  m.impl("verify_frozen", &verify_frozen_cpu);
  m.impl("round_stats", &round_stats_cpu);
}

}  // namespace specdiff
