// What the CPU kernels of both op families (verify_cpu.cpp, round_cpu.cpp) share: which dtypes a
// kernel takes and what it accumulates in, the argument checks (each message names the op and the
// argument), and the fixed-order reductions and verify-rule arithmetic (docs/design.md §3, §4).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <vector>

namespace specdiff {

// ---------------------------------------------------------------- dtypes
// Every kernel takes the same floating dtypes: fp16, bf16, fp32 and fp64 (ops/layout.py
// FLOAT_DTYPES).
#define SPECDIFF_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// The accumulation-dtype rule: elementwise arithmetic and within-block sums run in fp32 for fp16,
// bf16 and fp32 inputs, in fp64 for fp64 inputs (the PyTorch oracles follow the same rule, so the
// kernels can be compared with them). Sums across blocks are always fp64.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

// ---------------------------------------------------------------- argument checks
// The floating dtypes the kernels are instantiated for (at::isFloatingType also admits the float8
// types, which would pass the checks and fail in the dispatch macro, after allocating).
inline bool is_kernel_float(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

// The integer dtypes an index input may have (ops/_checks.py INT_DTYPES); converted to int64.
inline bool is_index_int(at::ScalarType t) {
  return t == at::kByte || t == at::kChar || t == at::kShort || t == at::kInt || t == at::kLong;
}

// What an argument's dtype may be (the contract of ops/_checks.py check_entry): kState a kernel
// floating dtype shared by every kState argument of the op; kFloat any kernel floating dtype
// (converted); kInt any index integer dtype (converted); kInt64 and kFloat64 exactly that.
enum class Kind { kState, kFloat, kInt, kInt64, kFloat64 };

// One tensor argument of an op, by its schema name; `t` null for an omitted optional.
struct NamedArg {
  const char* name;
  const at::Tensor* t;
  Kind kind;
};

inline const char* kind_dtypes(Kind kind) {
  switch (kind) {
    case Kind::kState:
    case Kind::kFloat: return "a float16, bfloat16, float32 or float64 tensor";
    case Kind::kInt: return "an integer tensor (int8, int16, int32, int64 or uint8)";
    case Kind::kInt64: return "an int64 tensor";
    default: return "a float64 tensor";
  }
}

inline bool kind_admits(Kind kind, at::ScalarType t) {
  switch (kind) {
    case Kind::kState:
    case Kind::kFloat: return is_kernel_float(t);
    case Kind::kInt: return is_index_int(t);
    case Kind::kInt64: return t == at::kLong;
    default: return t == at::kDouble;
  }
}

// Every tensor argument on the first one's device, that device the CPU, and each argument of its
// kind's dtypes: checked first, before any other check reads a value or anything is allocated.
// (The dispatcher sends a meta or CUDA tensor among CPU ones to the Meta or CUDA kernel, not here;
// a direct or redispatched call can still bring one.) Comparisons only: nothing is launched.
inline void check_args(const char* op, std::initializer_list<NamedArg> args) {
  const NamedArg& first = *args.begin();
  const at::Device device = first.t->device();
  for (const NamedArg& a : args) {
    if (a.t == nullptr || !a.t->defined()) continue;
    TORCH_CHECK(a.t->device() == device, op, ": ", a.name, " is on ", a.t->device(), " but ",
                first.name, " is on ", device);
  }
  TORCH_CHECK(device.is_cpu(), op, ": ", first.name,
              " must be a CPU tensor for the CPU kernel, got ", device);
  const NamedArg* state = nullptr;
  for (const NamedArg& a : args) {
    if (a.t == nullptr || !a.t->defined()) continue;
    const at::ScalarType t = a.t->scalar_type();
    TORCH_CHECK(kind_admits(a.kind, t), op, ": ", a.name, " must be ", kind_dtypes(a.kind),
                ", got ", t);
    if (a.kind != Kind::kState) continue;
    if (state == nullptr) {
      state = &a;
    } else {
      TORCH_CHECK(t == state->t->scalar_type(), op, ": ", a.name, " dtype ", t, " must equal ",
                  state->name, " dtype ", state->t->scalar_type(),
                  " (the states must share a dtype)");
    }
  }
}

inline void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor for the CPU kernel, got ",
              t.device());
}

// A state-like input: a CPU tensor of a kernel floating dtype.
inline void check_cpu_float(const at::Tensor& t, const char* op, const char* name) {
  check_cpu(t, op, name);
  TORCH_CHECK(is_kernel_float(t.scalar_type()), op, ": ", name,
              " must be a float16, bfloat16, float32 or float64 tensor, got ", t.scalar_type());
}

// A per-chain vector: shape [B].
inline void check_batch_vector(const at::Tensor& t, const char* op, const char* name, int64_t B) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B, op, ": ", name, " must have shape [B] = [", B,
              "], got ", t.sizes());
}

// A per-chain int64 CPU vector (the round ops' steps, lengths, chain ids).
inline void check_int64_vector(const at::Tensor& t, const char* op, const char* name, int64_t B) {
  check_cpu(t, op, name);
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name, " must be an int64 tensor, got ",
              t.scalar_type());
  check_batch_vector(t, op, name, B);
}

// The values of an integer tensor, in memory order, as int64 (no aten call for a contiguous int64
// tensor: the round ops call this every round).
inline std::vector<int64_t> int64_values(const at::Tensor& t) {
  const at::Tensor c = (t.scalar_type() == at::kLong ? t : t.to(at::kLong)).contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + c.numel());
}

// The number of event elements of t, whose first batch_dims dims index chains (and window
// positions); 0 when there are no chains, and an error when the event shape is empty.
inline int64_t event_numel(const at::Tensor& t, const char* op, int64_t batch_dims) {
  int64_t rows = 1;
  for (int64_t d = 0; d < batch_dims; ++d) rows *= t.size(d);
  const int64_t D = rows == 0 ? 0 : t.numel() / rows;
  TORCH_CHECK(rows == 0 || D > 0, op, ": the event shape must have at least one element");
  return D;
}

// The shape lead + tail, e.g. [B] + E for a state of each chain.
inline std::vector<int64_t> shape_with(std::initializer_list<int64_t> lead, at::IntArrayRef tail) {
  std::vector<int64_t> shape(lead);
  shape.insert(shape.end(), tail.begin(), tail.end());
  return shape;
}

// ---------------------------------------------------------------- reductions
// The two sums of the verify rule, carried together: a = <d, r> (or <d, xi>) and b = ||d||^2,
// d = m_p - m_q, over a block, or over a whole event once the blocks are combined.
struct SumPair {
  double a = 0.0, b = 0.0;
};

// n per-lane accumulators combined in lane order: fixed, whatever the vector width.
template <typename acc_t, size_t n>
inline SumPair sum_lanes(const acc_t (&a)[n], const acc_t (&b)[n]) {
  SumPair s;
  for (size_t l = 0; l < n; ++l) {
    s.a += static_cast<double>(a[l]);
    s.b += static_cast<double>(b[l]);
  }
  return s;
}

// The block partials of one row (parts[row * nb + k] for k < nb) combined in block order: the
// order does not depend on the thread count, so results are reproducible.
inline SumPair sum_blocks(const std::vector<SumPair>& parts, int64_t row, int64_t nb) {
  SumPair s;
  const SumPair* p = &parts[static_cast<size_t>(row * nb)];
  for (int64_t k = 0; k < nb; ++k) {
    s.a += p[k].a;
    s.b += p[k].b;
  }
  return s;
}

// ---------------------------------------------------------------- verify rule (docs/design.md §3)
// A step is accepted iff its log ratio is finite and log(u) <= log ratio.
inline bool accepts(double log_ratio, double u) {
  return std::isfinite(log_ratio) && std::log(u) <= log_ratio;
}

// The reflection coefficient 1 - 2 <d, r> / ||d||^2 where <d, r> = r_scale * s.a (the round ops
// sum <d, xi> and r = sigma * xi). ||d||^2 == 0 means p == q: every step is accepted and the
// "reflection" is the identity.
inline double reflection_coef(const SumPair& s, double r_scale = 1.0) {
  return s.b > 0.0 ? 1.0 - 2.0 * r_scale * s.a / s.b : 1.0;
}

}  // namespace specdiff
