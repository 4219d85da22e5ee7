// Counter-based noise for the round ops (docs/design.md §6, §7): Philox4x32-10 and the Box-Muller transform,
// written so that GCC/Clang vectorise them (tiles of counters, branch-free polynomial log and
// sincos for fp32). The definition every backend follows is
// specdiff_kernels/ops/reference/round.py.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace specdiff {
namespace philox {

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
constexpr uint32_t kStreamNormal = 0, kStreamUniform = 1;
constexpr int kTile = 64;  // counters per vectorised Philox call

struct Key {
  uint32_t k0, k1;
  explicit Key(int64_t seed)
      : k0(static_cast<uint32_t>(static_cast<uint64_t>(seed))),
        k1(static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32)) {}
};

// Counter word 1 of sampling step k (k = -1: the initial state).
inline uint32_t step_word(int64_t k) { return static_cast<uint32_t>(k + 1); }

// One Philox4x32-10 block per lane l < count of a tile: counters (i0 + l, c1, c2, c3). count is
// below kTile only for the last tile of a short vector (D < 4 kTile: no lanes computed in vain).
inline void tile(uint32_t i0, int count, uint32_t c1, uint32_t c2, uint32_t c3, Key key,
                 uint32_t x0[kTile], uint32_t x1[kTile], uint32_t x2[kTile], uint32_t x3[kTile]) {
#pragma omp simd
  for (int l = 0; l < count; ++l) {
    x0[l] = i0 + static_cast<uint32_t>(l);
    x1[l] = c1;
    x2[l] = c2;
    x3[l] = c3;
  }
  uint32_t k0 = key.k0, k1 = key.k1;
  for (int r = 0; r < 10; ++r) {
#pragma omp simd
    for (int l = 0; l < count; ++l) {
      const uint64_t p0 = static_cast<uint64_t>(kM0) * x0[l];
      const uint64_t p1 = static_cast<uint64_t>(kM1) * x2[l];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ x1[l] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ x3[l] ^ k1;
      x1[l] = static_cast<uint32_t>(p1);
      x3[l] = static_cast<uint32_t>(p0);
      x0[l] = n0;
      x2[l] = n2;
    }
    k0 += kW0;
    k1 += kW1;
  }
}

// Scalar Philox (uniforms, tests).
inline void block(uint32_t c[4], Key key) {
  uint32_t k0 = key.k0, k1 = key.k1;
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(kM0) * c[0];
    const uint64_t p1 = static_cast<uint64_t>(kM1) * c[2];
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c[1] ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c[3] ^ k1;
    c[1] = static_cast<uint32_t>(p1);
    c[3] = static_cast<uint32_t>(p0);
    c[0] = n0;
    c[2] = n2;
    k0 += kW0;
    k1 += kW1;
  }
}

// Acceptance uniform u(seed, chain, k) in [0, 1): exact in fp32.
inline float uniform(Key key, uint32_t chain, int64_t k) {
  uint32_t c[4] = {0u, step_word(k), chain, kStreamUniform};
  block(c, key);
  return static_cast<float>(c[0] >> 8) * 0x1p-24f;
}

// Box-Muller's inputs, exact in fp32: radius uniform v in (0, 1), angle uniform t in [0, 1).
inline float radius_uniform(uint32_t x) { return static_cast<float>(2u * (x >> 9) + 1u) * 0x1p-24f; }
inline float angle_uniform(uint32_t x) { return static_cast<float>(x >> 8) * 0x1p-24f; }

// ln(v) for normal v > 0: v = m 2^e with m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh(s),
// s = (m - 1) / (m + 1), |s| <= 0.172: the odd series to s^9 is within fp32 rounding.
// Integer-only range reduction (no float compare or select), so the loop vectorises even for a
// baseline x86-64 (SSE2) build.
inline float fast_log(float v) {
  const uint32_t bits = __builtin_bit_cast(uint32_t, v);
  uint32_t mbits = (bits & 0x7fffffu) | 0x3f800000u;          // m in [1, 2)
  const uint32_t big = mbits > 0x3fb504f3u ? 1u : 0u;          // m > sqrt(2)
  mbits -= big << 23;                                          // then m / 2
  const int32_t e = static_cast<int32_t>((bits >> 23) & 0xffu) - 127 + static_cast<int32_t>(big);
  const float m = __builtin_bit_cast(float, mbits);
  const float s = (m - 1.0f) / (m + 1.0f);
  const float s2 = s * s;
  const float poly = 1.0f + s2 * (1.0f / 3 + s2 * (1.0f / 5 + s2 * (1.0f / 7 + s2 * (1.0f / 9))));
  return static_cast<float>(e) * 0.693147180559945309f + 2.0f * s * poly;
}

// cos and sin of 2 pi t for t in [0, 1]: quadrant q = round(4t), x = 2 pi (t - q/4) in
// [-pi/4, pi/4] (t - q/4 is exact), Taylor polynomials to x^9 / x^8 (error < 4e-8).
inline void fast_sincos_2pi(float t, float& c, float& s) {
  const int q = static_cast<int>(4.0f * t + 0.5f);
  const float x = (t - 0.25f * static_cast<float>(q)) * 6.28318530717958648f;
  const float x2 = x * x;
  const float sx = x * (1.0f + x2 * (-1.0f / 6 + x2 * (1.0f / 120 + x2 * (-1.0f / 5040 +
                                                                          x2 * (1.0f / 362880)))));
  const float cx = 1.0f + x2 * (-0.5f + x2 * (1.0f / 24 + x2 * (-1.0f / 720 + x2 * (1.0f / 40320))));
  const int r = q & 3;
  c = r == 0 ? cx : (r == 1 ? -sx : (r == 2 ? -cx : sx));
  s = r == 0 ? sx : (r == 1 ? cx : (r == 2 ? -sx : -cx));
}

template <typename acc_t> struct BoxMuller;

template <> struct BoxMuller<float> {
  static inline void pair(uint32_t xa, uint32_t xb, float& n0, float& n1) {
    const float r = std::sqrt(-2.0f * fast_log(radius_uniform(xa)));
    float c, s;
    fast_sincos_2pi(angle_uniform(xb), c, s);
    n0 = r * c;
    n1 = r * s;
  }
};

template <> struct BoxMuller<double> {
  static inline void pair(uint32_t xa, uint32_t xb, double& n0, double& n1) {
    const double r = std::sqrt(-2.0 * std::log(static_cast<double>(radius_uniform(xa))));
    const double th = 6.283185307179586477 * static_cast<double>(angle_uniform(xb));
    n0 = r * std::cos(th);
    n1 = r * std::sin(th);
  }
};

// Normals of counters i0 .. i0 + count - 1 of xi(key, chain, k): out[lane][l] is element
// lane * Q + i0 + l of the D-vector (the quarter layout of ops/reference/round.py).
template <typename acc_t>
inline void normal_tile(Key key, uint32_t chain, int64_t k, uint32_t i0, int count,
                        acc_t out[4][kTile]) {
  uint32_t x0[kTile], x1[kTile], x2[kTile], x3[kTile];
  tile(i0, count, step_word(k), chain, kStreamNormal, key, x0, x1, x2, x3);
#pragma omp simd
  for (int l = 0; l < count; ++l) {
    BoxMuller<acc_t>::pair(x0[l], x1[l], out[0][l], out[1][l]);
    BoxMuller<acc_t>::pair(x2[l], x3[l], out[2][l], out[3][l]);
  }
}

}  // namespace philox
}  // namespace specdiff
