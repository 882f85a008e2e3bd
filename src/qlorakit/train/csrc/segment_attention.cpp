// The CPU backward of qlorakit's segment attention (qlorakit/train/attention.py) in native code,
// with the values of its Python loop: per packed segment, the operands (q and do with three shift
// columns each, k and v with three columns of ones, k less its segment mean) are written into
// contiguous blocks of one reused buffer, the five batched products run on them through ATen
// (oneDNN), and the two elementwise steps between them (probabilities from shifted scores, the
// softmax backward) are vectorised loops that skip the causally masked half of each score matrix.
// From Python, the same loop pays a dispatch per op and segment, a guard check per compiled kernel,
// and a copy of every operand view the batched matmul takes only contiguous.
//
// Built on first use by torch.utils.cpp_extension (qlorakit/train/native.py); the Python loop is
// the reference and the fallback.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <vector>

#include "common.h"

namespace {

using namespace qlorakit;

// the causal length of score row r (query token r / groups): keys 0..r/groups, none past `valid`
inline int64_t row_keys(int64_t r, int64_t groups, int64_t valid, int64_t cols) {
  const int64_t q = r / groups;
  return q < valid ? std::min(q + 1, cols) : 0;
}

// row[0, n) = bf16(exp(row * scale)) (the probabilities from shifted scores), row[n, C) = 0
inline void probs_row(uint16_t* row, int64_t n, int64_t cols, float scale) {
  float buf[kBlock];
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const int64_t m = std::min(kBlock, n - j0);
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) buf[j] = bf16_to_float(row[j0 + j]) * scale;
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) buf[j] = exp_approx(buf[j]);
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) row[j0 + j] = float_to_bf16(buf[j]);
  }
  std::memset(row + n, 0, sizeof(uint16_t) * (cols - n));
}

// d[0, n) = bf16(p * d * scale) (the softmax backward, d holding dp - delta), d[n, C) = 0
inline void dscores_row(const uint16_t* p, uint16_t* d, int64_t n, int64_t cols, float scale) {
  float buf[kBlock];
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const int64_t m = std::min(kBlock, n - j0);
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) buf[j] = bf16_to_float(p[j0 + j]) * bf16_to_float(d[j0 + j]) * scale;
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) d[j0 + j] = float_to_bf16(buf[j]);
  }
  std::memset(d + n, 0, sizeof(uint16_t) * (cols - n));
}

// x (H, R, C): probabilities on and below the causal diagonal (row r is query token r / groups),
// 0 above it and on rows of query tokens at or past `valid`
void probs_inplace(at::Tensor& x, float scale, int64_t groups, int64_t valid) {
  const int64_t rows = x.size(0) * x.size(1), R = x.size(1), C = x.size(2);
  uint16_t* base = bits(x);
  at::parallel_for(0, rows, 8, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) probs_row(base + i * C, row_keys(i % R, groups, valid, C), C, scale);
  });
}

// ds = p * ds * scale where p may be non-zero, 0 elsewhere
void dscores_inplace(const at::Tensor& p, at::Tensor& ds, float scale, int64_t groups, int64_t valid) {
  const int64_t rows = ds.size(0) * ds.size(1), R = ds.size(1), C = ds.size(2);
  const uint16_t* pb = bits(p);
  uint16_t* db = bits(ds);
  at::parallel_for(0, rows, 8, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) dscores_row(pb + i * C, db + i * C, row_keys(i % R, groups, valid, C), C, scale);
  });
}

constexpr uint16_t kOne = 0x3f80;  // 1.0 in bf16

inline uint16_t negate(uint16_t h) { return h ^ 0x8000u; }

// -shift split exactly into three bf16 parts (hi + mid + lo = shift in fp32), as attention.py's
// _with_shift does: hi = bf16(shift), mid = bf16(shift - hi), lo = bf16(shift - hi - mid)
inline void shift_columns(float shift, uint16_t* out) {
  const uint16_t hi = float_to_bf16(shift);
  const float r = shift - bf16_to_float(hi);
  const uint16_t mid = float_to_bf16(r);
  const uint16_t lo = float_to_bf16(r - bf16_to_float(mid));
  out[0] = negate(hi);
  out[1] = negate(mid);
  out[2] = negate(lo);
}

// The views of one segment's operands in the scratch buffer, each contiguous and sized for the
// segment's padded length lp; the regions are laid out for the longest segment, so a segment's
// blocks stay at the same addresses and in cache from one product to the next
struct Blocks {
  at::Tensor qa, doa, ka, va, kp, p, ds, dq, dk_t, dv_t;
};

Blocks carve(at::Tensor& scratch, int64_t n_kv, int64_t groups, int64_t d, int64_t lmax, int64_t lp) {
  const int64_t d3 = d + 3;
  int64_t off = 0;
  auto take = [&](int64_t capacity, at::IntArrayRef shape) {
    int64_t numel = 1;
    for (int64_t x : shape) numel *= x;
    at::Tensor t = scratch.narrow(0, off, numel).view(shape);
    off += capacity;
    return t;
  };
  const int64_t S = n_kv * lmax * groups, T = n_kv * lmax;
  Blocks b;
  b.qa = take(S * d3, {n_kv, lp * groups, d3});
  b.doa = take(S * d3, {n_kv, lp * groups, d3});
  b.ka = take(T * d3, {n_kv, lp, d3});
  b.va = take(T * d3, {n_kv, lp, d3});
  b.kp = take(T * d, {n_kv, lp, d});
  b.p = take(S * lmax, {n_kv, lp * groups, lp});
  b.ds = take(S * lmax, {n_kv, lp * groups, lp});
  b.dq = take(S * d, {n_kv, lp * groups, d});
  b.dk_t = take(T * d3, {n_kv, d3, lp});
  b.dv_t = take(T * d3, {n_kv, d3, lp});
  TORCH_CHECK(off <= scratch.numel(), "segment_attention_backward: scratch buffer too small");
  return b;
}

// (attention.py's native_scratch_numel computes the same)
int64_t scratch_numel(int64_t n_kv, int64_t groups, int64_t d, int64_t lmax) {
  const int64_t d3 = d + 3, S = n_kv * lmax * groups, T = n_kv * lmax;
  return 2 * S * d3 + 4 * T * d3 + T * d + 2 * S * lmax + S * d;
}


// The backward of attention.py's _SegmentAttention, segment by segment, with the same values as its
// Python loop: each segment's operands (q and do with their three shift columns, k and v with
// three columns of ones, k less its segment mean) are written into contiguous blocks, padded with
// zero rows to a multiple of `pad`, and the five batched products run on them.
// q (Hkv, N, G, D), k, v (Hkv, N, D), d_out (N, Hkv G D) bf16; q_shift (Hkv, N, G) = lse / scale
// and delta (N, Hkv G) fp32; dq, dk, dv as q, k, v.
void segment_attention_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& d_out, const at::Tensor& q_shift, const at::Tensor& delta,
                                at::IntArrayRef starts, at::IntArrayRef ends, double scale, int64_t pad,
                                at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& scratch) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k, &v, &d_out, &dq, &dk, &dv, &scratch})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->is_contiguous(),
                "segment_attention_backward: expected contiguous bf16 tensors");
  TORCH_CHECK(q_shift.scalar_type() == at::kFloat && delta.scalar_type() == at::kFloat && q_shift.is_contiguous() &&
                  delta.is_contiguous(), "segment_attention_backward: expected contiguous fp32 shifts");
  TORCH_CHECK(starts.size() == ends.size() && !starts.empty(), "segment_attention_backward: bad segments");
  const int64_t n_kv = q.size(0), n = q.size(1), groups = q.size(2), d = q.size(3), d3 = d + 3;
  const int64_t hq = n_kv * groups;
  int64_t lmax = 0;
  for (size_t i = 0; i < starts.size(); ++i) {
    TORCH_CHECK(0 <= starts[i] && starts[i] < ends[i] && ends[i] <= n, "segment_attention_backward: segment ", i,
                " [", starts[i], ", ", ends[i], ") is not inside the ", n, " tokens");
    lmax = std::max(lmax, (ends[i] - starts[i] + pad - 1) / pad * pad);
  }
  TORCH_CHECK(scratch.numel() >= scratch_numel(n_kv, groups, d, lmax), "segment_attention_backward: scratch of ",
              scratch.numel(), " elements, needs ", scratch_numel(n_kv, groups, d, lmax));
  const float sc = static_cast<float>(scale);
  const uint16_t *qb = bits(q), *kb = bits(k), *vb = bits(v), *dob = bits(d_out);
  const float* qsh = q_shift.data_ptr<float>();
  const float* dsh = delta.data_ptr<float>();
  uint16_t *dqb = bits(dq), *dkb = bits(dk), *dvb = bits(dv);
  for (size_t i = 0; i < starts.size(); ++i) {
    const int64_t s = starts[i], length = ends[i] - s, lp = (length + pad - 1) / pad * pad;
    Blocks b = carve(scratch, n_kv, groups, d, lmax, lp);
    uint16_t *qa = bits(b.qa), *doa = bits(b.doa);
    uint16_t *ka = bits(b.ka), *va = bits(b.va), *kp = bits(b.kp);
    const int64_t R = lp * groups;
    // operands: one task per (kv head, token) row
    at::parallel_for(0, n_kv * lp, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t row = lo; row < hi; ++row) {
        const int64_t h = row / lp, t = row % lp;
        const bool real = t < length;
        for (int64_t g = 0; g < groups; ++g) {
          const int64_t r = t * groups + g;
          uint16_t* qrow = qa + (h * R + r) * d3;
          uint16_t* drow = doa + (h * R + r) * d3;
          if (real) {
            std::memcpy(qrow, qb + ((h * n + s + t) * groups + g) * d, d * sizeof(uint16_t));
            std::memcpy(drow, dob + (s + t) * hq * d + (h * groups + g) * d, d * sizeof(uint16_t));
            shift_columns(qsh[(h * n + s + t) * groups + g], qrow + d);
            shift_columns(dsh[(s + t) * hq + h * groups + g], drow + d);
          } else {
            std::memset(qrow, 0, d3 * sizeof(uint16_t));
            std::memset(drow, 0, d3 * sizeof(uint16_t));
          }
        }
        uint16_t* krow = ka + (h * lp + t) * d3;
        uint16_t* vrow = va + (h * lp + t) * d3;
        if (real) {
          std::memcpy(krow, kb + (h * n + s + t) * d, d * sizeof(uint16_t));
          std::memcpy(vrow, vb + (h * n + s + t) * d, d * sizeof(uint16_t));
          krow[d] = krow[d + 1] = krow[d + 2] = kOne;
          vrow[d] = vrow[d + 1] = vrow[d + 2] = kOne;
        } else {
          std::memset(krow, 0, d3 * sizeof(uint16_t));
          std::memset(vrow, 0, d3 * sizeof(uint16_t));
        }
      }
    });
    // k less its mean over the segment (fp32 sums in token order, as index_add_ takes them)
    at::parallel_for(0, n_kv, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> mean(d);
      for (int64_t h = lo; h < hi; ++h) {
        std::fill(mean.begin(), mean.end(), 0.0f);
        for (int64_t t = 0; t < length; ++t) {
          const uint16_t* krow = kb + (h * n + s + t) * d;
          for (int64_t j = 0; j < d; ++j) mean[j] += bf16_to_float(krow[j]);
        }
        const float len = static_cast<float>(length);
        for (int64_t j = 0; j < d; ++j) mean[j] = mean[j] / len;
        for (int64_t t = 0; t < lp; ++t) {
          uint16_t* out = kp + (h * lp + t) * d;
          if (t < length) {
            const uint16_t* krow = kb + (h * n + s + t) * d;
            for (int64_t j = 0; j < d; ++j) out[j] = float_to_bf16(bf16_to_float(krow[j]) - mean[j]);
          } else {
            std::memset(out, 0, d * sizeof(uint16_t));
          }
        }
      }
    });
    at::bmm_out(b.p, b.qa, b.ka.transpose(1, 2));
    probs_inplace(b.p, sc, groups, length);
    // the (D + 3, L G) operands are transposed views: the matmul reads them as they are
    at::bmm_out(b.dv_t, b.doa.transpose(1, 2), b.p);  // (Hkv, D + 3, lp): sums over the group
    at::bmm_out(b.ds, b.doa, b.va.transpose(1, 2));
    dscores_inplace(b.p, b.ds, sc, groups, length);
    at::bmm_out(b.dq, b.ds, b.kp);
    at::bmm_out(b.dk_t, b.qa.transpose(1, 2), b.ds);
    const uint16_t *dqs = bits(b.dq), *dk_t = bits(b.dk_t), *dv_t = bits(b.dv_t);
    at::parallel_for(0, n_kv * length, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t row = lo; row < hi; ++row) {
        const int64_t h = row / length, t = row % length;
        std::memcpy(dqb + ((h * n + s + t) * groups) * d, dqs + (h * R + t * groups) * d, groups * d * sizeof(uint16_t));
        uint16_t* dkrow = dkb + (h * n + s + t) * d;
        uint16_t* dvrow = dvb + (h * n + s + t) * d;
        for (int64_t j = 0; j < d; ++j) {
          dkrow[j] = dk_t[(h * d3 + j) * lp + t];
          dvrow[j] = dv_t[(h * d3 + j) * lp + t];
        }
      }
    });
  }
}

// the elementwise steps alone, for tests
at::Tensor probs(const at::Tensor& x, double scale, int64_t groups, int64_t valid) {
  at::Tensor out = x.contiguous().clone();
  probs_inplace(out, static_cast<float>(scale), groups, valid);
  return out;
}

at::Tensor dscores(const at::Tensor& p, const at::Tensor& x, double scale, int64_t groups, int64_t valid) {
  at::Tensor out = x.contiguous().clone();
  dscores_inplace(p.contiguous(), out, static_cast<float>(scale), groups, valid);
  return out;
}

}  // namespace

TORCH_LIBRARY(qlorakit_attn, m) {
  m.def("segment_attention_backward(Tensor q, Tensor k, Tensor v, Tensor d_out, Tensor q_shift, Tensor delta, "
        "int[] starts, int[] ends, float scale, int pad, Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv, "
        "Tensor(d!) scratch) -> ()");
  m.def("probs(Tensor x, float scale, int groups, int valid) -> Tensor");
  m.def("dscores(Tensor p, Tensor x, float scale, int groups, int valid) -> Tensor");
}

TORCH_LIBRARY_IMPL(qlorakit_attn, CPU, m) {
  m.impl("segment_attention_backward", &segment_attention_backward);
  m.impl("probs", &probs);
  m.impl("dscores", &dscores);
}
