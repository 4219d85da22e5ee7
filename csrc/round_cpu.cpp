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

struct RoundArgs {
  int64_t B, D, N;
  std::vector<int64_t> k, n;
  std::vector<uint32_t> chain;
  int64_t seed;
  at::Tensor coef;  // contiguous float64 [9, N]
};

RoundArgs check_round(const char* op, const at::Tensor& root, const at::Tensor& frozen,
                      const at::Tensor& steps, const at::Tensor& lengths, const at::Tensor& coef,
                      const at::Tensor& seed, const at::Tensor& chain_ids, int64_t window,
                      int64_t freeze, double clip, bool stochastic_only,
                      const std::optional<at::Tensor>& prev) {
  check_cpu_float(frozen, op, "frozen");
  TORCH_CHECK(frozen.sizes() == root.sizes() && frozen.scalar_type() == root.scalar_type(), op,
              ": frozen must match the root states' shape and dtype, got ", frozen.sizes(), " ",
              frozen.scalar_type(), " vs ", root.sizes(), " ", root.scalar_type());
  if (prev.has_value()) {
    check_cpu_float(*prev, op, "prev");
    TORCH_CHECK(prev->sizes() == root.sizes() && prev->scalar_type() == root.scalar_type(), op,
                ": prev must match the root states' shape and dtype, got ", prev->sizes(), " ",
                prev->scalar_type(), " vs ", root.sizes(), " ", root.scalar_type());
  }
  check_cpu(coef, op, "coef");
  TORCH_CHECK(coef.scalar_type() == at::kDouble && coef.dim() == 2 && coef.size(0) == kNumRows &&
                  coef.size(1) >= 1,
              op, ": coef must be the float64 [9, N] table of round_tables(transitions), got ",
              coef.scalar_type(), " ", coef.sizes());
  TORCH_CHECK(window >= 1, op, ": window must be >= 1, got ", window);
  TORCH_CHECK(freeze == kFreezeX0 || freeze == kFreezeEps, op,
              ": freeze must be 0 (x0) or 1 (eps), got ", freeze);
  TORCH_CHECK(clip > 0, op, ": clip must be > 0 (inf: no clipping), got ", clip);
  RoundArgs a;
  a.B = root.size(0);
  a.D = event_numel(root, op, 1);
  a.N = coef.size(1);
  a.seed = check_seed(seed, op);
  a.chain = check_chain_ids(chain_ids, op, a.B);
  a.k = check_range(steps, op, "steps", a.B, 0, a.N);
  a.n = check_range(lengths, op, "lengths", a.B, 0, window);
  a.coef = coef.contiguous();
  if (!stochastic_only) return a;  // a draft step with std 0 is the deterministic step itself
  const double* std = a.coef.data_ptr<double>() + kStd * a.N;
  for (int64_t b = 0; b < a.B; ++b) {
    for (int64_t j = 0; j < a.n[b]; ++j) {
      const int64_t k = a.k[b] + j;
      TORCH_CHECK(k < a.N && std[k] > 0.0, op, ": lengths[", b, "] = ", a.n[b], " from step ",
                  a.k[b], " reaches a deterministic step or the end of the schedule (N = ", a.N,
                  "); windows must cover stochastic steps only");
    }
  }
  return a;
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
  RoundArgs a = check_round(op, root, frozen, steps, lengths, coef, seed, chain_ids, window, freeze,
                            clip, false, prev);
  at::Tensor Y = at::empty(shape_with({a.B, window + 1}, root.sizes().slice(1)),
                           root.options().memory_format(at::MemoryFormat::Contiguous));
  if (a.B == 0) return Y;
  at::Tensor x = root.contiguous(), fz = frozen.contiguous();
  const bool multistep = prev.has_value();
  at::Tensor pv = multistep ? prev->contiguous() : at::Tensor();
  const Key key(a.seed);
  const Layout lay(a.D);
  const int64_t nch = lay.chunks(), D = a.D, L = window, N = a.N;
  const bool eps = freeze == kFreezeEps;
  const double* cp = a.coef.data_ptr<double>();
  SPECDIFF_DISPATCH_FLOATING(root.scalar_type(), "frozen_draft", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* fp = fz.data_ptr<scalar_t>();
    const scalar_t* qp = multistep ? pv.data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = Y.data_ptr<scalar_t>();
    const acc_t cl = static_cast<acc_t>(clip);
    cpu::parallel_for_isa(a.B * nch, [&](int64_t begin, int64_t end) {
      acc_t nz[4][kTile];
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / nch, ch = task % nch;
        const int64_t i_lo = ch * kChunk, i_hi = lay.chunk_end(ch);
        const scalar_t* xb = xp + b * D;
        const scalar_t* fb = fp + b * D;
        scalar_t* yb = yp + b * (L + 1) * D;
        copy_chunk(lay, i_lo, i_hi, xb, yb);
        for (int64_t j = 0; j < L; ++j) {
          const scalar_t* cur = yb + j * D;  // (not the op's prev: the state drafted from)
          scalar_t* next = yb + (j + 1) * D;
          if (j >= a.n[b]) {
            copy_chunk(lay, i_lo, i_hi, cur, next);
            continue;
          }
          const StepCoef<acc_t> c(cp, N, a.k[b] + j);
          // the variant is chosen per step, outside the element loop (the one-step loop is the
          // one it always was): kMs 0 one-step; multistep, the draft's previous x0-hat is 1 prev
          // (j = 0), 2 its x0-hat at the stored Y[j-1] (recomputed from the rounded state, as the
          // oracle does)
          auto step = [&](auto ms) {
            constexpr int kMs = decltype(ms)::value;
            const scalar_t* qb = kMs == 1 ? qp + b * D : kMs == 2 ? yb + (j - 1) * D : nullptr;
            const StepCoef<acc_t> c1(cp, N, a.k[b] + j - 1);
            for (int64_t i0 = i_lo; i0 < i_hi; i0 += kTile) {
              draw_tile<acc_t>(key, lay, a.chain[b], a.k[b] + j, i0, nz);
              for_tile(lay, i0, [&](int lane, int64_t l, int64_t e) {
                const acc_t y = static_cast<acc_t>(cur[e]);
                const acc_t f = static_cast<acc_t>(fb[e]);
                const acc_t p = draft_x0(c, y, f, eps);
                acc_t m = affine_mean(c, p, y, cl);
                if constexpr (kMs == 1) m = m + c.v[kH] * static_cast<acc_t>(qb[e]);
                if constexpr (kMs == 2)
                  m = m + c.v[kH] * draft_x0(c1, static_cast<acc_t>(qb[e]), f, eps);
                next[e] = static_cast<scalar_t>(m + c.v[kStd] * nz[lane][l]);
              });
            }
          };
          if (!multistep) step(std::integral_constant<int, 0>{});
          else if (j == 0) step(std::integral_constant<int, 1>{});
          else step(std::integral_constant<int, 2>{});
        }
      }
    });
  });
  return Y;
}

// ---------------------------------------------------------------- verify_frozen
enum class Commit : uint8_t { kIdle, kAccept, kDeterministic, kReflect };

struct ChainDecision {
  Commit mode = Commit::kIdle;
  int64_t pos = 0;         // the window position whose state and prediction decide the commit
  bool new_frozen = false; // next_frozen = freeze(Y_pos, P_pos); else the old frozen value
  double reflect = 1.0;    // 1 - 2 <d, r> / ||d||^2 at a rejection
};

using FrozenVerifyOut =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

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
  const int64_t L = states.size(1) - 1;
  at::Tensor root = states.select(1, 0);
  RoundArgs a = check_round(op, root, frozen, steps, lengths, coef, seed, chain_ids, L, freeze, clip,
                            true, prev);
  const bool multistep = prev.has_value();
  const int64_t B = a.B, D = a.D, N = a.N;
  const std::vector<int64_t> sshape = shape_with({B}, states.sizes().slice(2));
  auto opts = states.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor num_accepted = at::empty({B}, opts.dtype(at::kLong));
  at::Tensor committed = at::empty({B}, opts.dtype(at::kLong));
  at::Tensor next_state = at::empty(sshape, opts);
  at::Tensor next_frozen = at::empty(sshape, opts);
  at::Tensor root_exact = at::empty({B}, opts.dtype(at::kBool));
  at::Tensor log_ratio = at::zeros({B, L}, opts.dtype(at::kFloat));
  // the target's x0-hat at next_state's parent (multistep only; an empty [0] tensor without prev)
  at::Tensor next_prev = multistep ? at::empty(sshape, opts) : at::empty({0}, opts);
  if (B == 0)
    return {num_accepted, committed, next_state, next_frozen, root_exact, log_ratio, next_prev};

  at::Tensor Yt = states.contiguous(), Pt = x0_hat.contiguous(), Ft = frozen.contiguous();
  at::Tensor Qt = multistep ? prev->contiguous() : at::Tensor();
  const Key key(a.seed);
  const Layout lay(D);
  const int64_t nch = lay.chunks();
  const bool eps = freeze == kFreezeEps;
  const double* cp = a.coef.data_ptr<double>();
  SPECDIFF_DISPATCH_FLOATING(states.scalar_type(), "verify_frozen", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* Y = Yt.data_ptr<scalar_t>();
    const scalar_t* P = Pt.data_ptr<scalar_t>();
    const scalar_t* F = Ft.data_ptr<scalar_t>();
    const scalar_t* Q = multistep ? Qt.data_ptr<scalar_t>() : nullptr;
    const acc_t cl = static_cast<acc_t>(clip);

    // Pass 1: <d_j, xi_j> and ||d_j||^2 per (chain, position, chunk); xi drawn in-kernel.
    // Multistep, j >= 1: d_j gains H (P_{j-1} - p_q(y_{j-1})) (the two previous predictions);
    // at j = 0 both means share prev, so d_0 has no H term.
    std::vector<SumPair> parts(static_cast<size_t>(B * L * nch));
    cpu::parallel_for_isa(B * L * nch, [&](int64_t begin, int64_t end) {
      acc_t nz[4][kTile];
      for (int64_t task = begin; task < end; ++task) {
        const int64_t row = task / nch, ch = task % nch;
        const int64_t b = row / L, j = row % L;
        if (j >= a.n[b]) continue;
        const StepCoef<acc_t> c(cp, N, a.k[b] + j);
        const scalar_t* yj = Y + (b * (L + 1) + j) * D;
        const scalar_t* pj = P + (b * (L + 1) + j) * D;
        const scalar_t* fb = F + b * D;
        acc_t av[kTile] = {}, bv[kTile] = {};
        auto sums = [&](auto ms) {
          constexpr bool kMulti = decltype(ms)::value;
          const StepCoef<acc_t> c1(cp, N, a.k[b] + j - 1);
          for (int64_t i0 = ch * kChunk; i0 < lay.chunk_end(ch); i0 += kTile) {
            draw_tile<acc_t>(key, lay, a.chain[b], a.k[b] + j, i0, nz);
            for_tile(lay, i0, [&](int lane, int64_t l, int64_t e) {
              const acc_t f = static_cast<acc_t>(fb[e]);
              const acc_t pq = draft_x0(c, static_cast<acc_t>(yj[e]), f, eps);
              acc_t d = mean_gap(c, static_cast<acc_t>(pj[e]), pq, cl);
              if constexpr (kMulti) {
                const acc_t pq1 = draft_x0(c1, static_cast<acc_t>(yj[e - D]), f, eps);
                d = d + c.v[kH] * (static_cast<acc_t>(pj[e - D]) - pq1);
              }
              av[l] += d * nz[lane][l];
              bv[l] += d * d;
            });
          }
        };
        if (multistep && j > 0) sums(std::true_type{});
        else sums(std::false_type{});
        parts[static_cast<size_t>(task)] = sum_lanes(av, bv);
      }
    });

    // Pass 2 (O(B L)): log ratios, uniforms, first rejection, and each chain's commit.
    std::vector<ChainDecision> dec(B);
    float* lro = log_ratio.data_ptr<float>();
    int64_t* nacc = num_accepted.data_ptr<int64_t>();
    int64_t* comm = committed.data_ptr<int64_t>();
    bool* exact = root_exact.data_ptr<bool>();
    for (int64_t b = 0; b < B; ++b) {
      const int64_t k = a.k[b], n = a.n[b];
      int64_t first = n;
      double reflect = 1.0;
      for (int64_t j = 0; j < n; ++j) {
        // sums over xi, the noise of the draft step: r = s * xi
        const SumPair dx = sum_blocks(parts, b * L + j, nch);
        const double s = cp[kStd * N + std::min(k + j, N - 1)];
        const double lr = dx.a / s - dx.b / (2.0 * s * s);
        lro[b * L + j] = static_cast<float>(lr);
        const double u = philox::uniform(key, a.chain[b], k + j);
        if (first == n && !accepts(lr, u)) {
          first = j;
          reflect = reflection_coef(dx, s);
        }
      }
      ChainDecision& d = dec[b];
      nacc[b] = first;
      const bool live_next = k + n < N;
      const bool det_next = live_next && cp[kStd * N + std::min(k + n, N - 1)] == 0.0;
      if (first < n) {
        d = {Commit::kReflect, first, true, reflect};
        comm[b] = first + 1;
      } else if (det_next) {
        d = {Commit::kDeterministic, n, true, 1.0};
        comm[b] = n + 1;
      } else {
        d = {n > 0 ? Commit::kAccept : Commit::kIdle, n, n > 0 && live_next, 1.0};
        comm[b] = n;
      }
      exact[b] = d.mode == Commit::kAccept && live_next;
    }

    // Pass 3: next_state and next_frozen (and next_prev), chunk by chunk.
    scalar_t* xs = next_state.data_ptr<scalar_t>();
    scalar_t* xf = next_frozen.data_ptr<scalar_t>();
    scalar_t* xq = multistep ? next_prev.data_ptr<scalar_t>() : nullptr;
    cpu::parallel_for_isa(B * nch, [&](int64_t begin, int64_t end) {
      acc_t nz[4][kTile];
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / nch, ch = task % nch;
        const ChainDecision& d = dec[b];
        const int64_t kp = a.k[b] + d.pos;
        const StepCoef<acc_t> c(cp, N, kp);
        const scalar_t* yj = Y + (b * (L + 1) + d.pos) * D;
        const scalar_t* pj = P + (b * (L + 1) + d.pos) * D;
        const scalar_t* fb = F + b * D;
        scalar_t* os = xs + b * D;
        scalar_t* of = xf + b * D;
        const acc_t refl = static_cast<acc_t>(d.reflect);
        auto commit = [&](auto ms) {
          constexpr bool kMulti = decltype(ms)::value;
          // the previous predictions at the deciding position: prev at the root, else the
          // target's P_{pos-1} and the draft's x0-hat at y_{pos-1}
          const bool at_root = d.pos == 0;
          const scalar_t* qb = kMulti ? Q + b * D : nullptr;
          const scalar_t* y1 = at_root ? yj : yj - D;
          const scalar_t* p1 = at_root ? pj : pj - D;
          const StepCoef<acc_t> c1(cp, N, kp - 1);
          // next_prev: the target's x0-hat at the new state's parent
          const bool parent_is_pos = d.mode == Commit::kReflect || d.mode == Commit::kDeterministic;
          scalar_t* oq = kMulti ? xq + b * D : nullptr;
          for (int64_t i0 = ch * kChunk; i0 < lay.chunk_end(ch); i0 += kTile) {
            if (d.mode == Commit::kReflect)
              draw_tile<acc_t>(key, lay, a.chain[b], kp, i0, nz);
            for_tile(lay, i0, [&](int lane, int64_t l, int64_t e) {
              const acc_t y = static_cast<acc_t>(yj[e]);
              const acc_t p = static_cast<acc_t>(pj[e]);
              const acc_t f = static_cast<acc_t>(fb[e]);
              acc_t tq = 0, dq = 0;  // the target's and the draft's previous predictions
              if constexpr (kMulti) {
                if (at_root) {
                  tq = dq = static_cast<acc_t>(qb[e]);
                } else {
                  tq = static_cast<acc_t>(p1[e]);
                  dq = draft_x0(c1, static_cast<acc_t>(y1[e]), f, eps);
                }
              }
              acc_t out = y;
              if (d.mode == Commit::kReflect) {
                const acc_t pq = draft_x0(c, y, f, eps);
                acc_t mq = affine_mean(c, pq, y, cl);
                acc_t gap = mean_gap(c, p, pq, cl);
                if constexpr (kMulti) {
                  mq = mq + c.v[kH] * dq;
                  gap = gap + c.v[kH] * (tq - dq);
                }
                out = mq + c.v[kStd] * nz[lane][l] + refl * gap;
              } else if (d.mode == Commit::kDeterministic) {
                out = affine_mean(c, p, y, cl);
                if constexpr (kMulti) out = out + c.v[kH] * tq;
              }
              os[e] = static_cast<scalar_t>(out);
              of[e] = d.new_frozen ? static_cast<scalar_t>(freeze_value(c, y, p, eps)) : fb[e];
              if constexpr (kMulti) oq[e] = parent_is_pos ? pj[e] : static_cast<scalar_t>(tq);
            });
          }
        };
        if (multistep) commit(std::true_type{});
        else commit(std::false_type{});
      }
    });
  });
  return {num_accepted, committed, next_state, next_frozen, root_exact, log_ratio, next_prev};
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
  // finiteness of each (chain, position) of the output (rows of D values) and of the log ratios,
  // in this pass rather than by at::isfinite(...).all(): each aten call costs as much as the loop
  const at::Tensor o = output.contiguous();
  const int64_t D = o.numel() / std::max<int64_t>(1, B * (L + 1));
  std::vector<char> fo(static_cast<size_t>(B * (L + 1))), fr(static_cast<size_t>(B * L));
  SPECDIFF_DISPATCH_FLOATING(o.scalar_type(), "round_stats", [&] {
    const scalar_t* p = o.data_ptr<scalar_t>();
    for (int64_t r = 0; r < B * (L + 1); ++r) {
      bool ok = true;
      for (int64_t e = 0; e < D; ++e) ok &= std::isfinite(static_cast<double>(p[r * D + e]));
      fo[r] = ok;
    }
  });
  const at::Tensor lrc = log_ratio.contiguous();
  SPECDIFF_DISPATCH_FLOATING(lrc.scalar_type(), "round_stats", [&] {
    const scalar_t* p = lrc.data_ptr<scalar_t>();
    for (int64_t r = 0; r < B * L; ++r) fr[r] = std::isfinite(static_cast<double>(p[r]));
  });
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
