// Helpers shared by the native kernels of the fast path: bf16 conversions and a vectorisable exp.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace qlorakit {

// a bf16 tensor's storage as raw 16-bit words
inline uint16_t* bits(at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); }
inline const uint16_t* bits(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); }

inline float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// round to nearest even, as c10::BFloat16 does for finite values
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// exp(x): Cody-Waite range reduction and a degree-7 minimax polynomial on
// [-ln2/2, ln2/2] (the Cephes coefficients), within 2 ulp of the correctly rounded value; results
// below the smallest normal float come out subnormal, as torch.exp's do (2^n is applied in two
// factors there), 0 below -104, exp(88) between 88 and 88.72 (where the float range ends) and
// infinity above
inline float exp_approx(float x) {
  const float xc = x < -104.0f ? -104.0f : (x > 88.0f ? 88.0f : x);
  // round to the nearest integer by adding and taking off 1.5 * 2^23 (|xc| log2(e) < 2^22)
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = std::fma(n, -0.693359375f, xc);
  r = std::fma(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p, r * r, r) + 1.0f;
  const bool tiny = n < -64.0f;
  const int32_t e = static_cast<int32_t>(n) + (tiny ? 127 + 64 : 127);
  const uint32_t pattern = static_cast<uint32_t>(e) << 23;
  float two_n;
  std::memcpy(&two_n, &pattern, sizeof two_n);
  const float y = p * two_n;
  const float z = x < -104.0f ? 0.0f : (tiny ? y * 5.42101086242752217e-20f : y);  // 2^-64
  return x > 88.72f ? std::numeric_limits<float>::infinity() : z;
}

// Rows are processed in blocks through an fp32 buffer: a loop that converts, exponentiates and
// rounds in one body is vectorised by gcc but runs several times slower than the three loops
// (measured 3.1 against 0.48 ns an element on one core)
constexpr int64_t kBlock = 64;

}  // namespace qlorakit
