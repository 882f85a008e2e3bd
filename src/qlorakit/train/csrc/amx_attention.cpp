// Causal attention over packed segments, forward and backward, on AMX tiles through oneDNN's
// batch-reduce GEMM micro-kernel (ATen's cpublas::brgemm, the one PyTorch's own CPU flash attention
// calls): bf16 operands, fp32 results. Used by qlorakit/train/attention.py on CPUs where ATen can
// pack bf16 operands for it (AMX); elsewhere the flash kernel and segment_attention.cpp run.
//
// Per segment and kv head, the queries of a group are rows t G + g of one (L G, D) matrix (the
// layout attention.py gives q), so a block of 32 query tokens is one brgemm M of 32 G rows against
// the segment's keys. Work is done in blocks of 32 tokens and only up to the causal diagonal:
//
//   forward,  per (kv head, query block): S = Q K^T (fp32), the causal softmax in fp32 (row max,
//             exp, sum), O = P V with P the unnormalised exp in bf16 and O divided by the sum in
//             fp32, as the flash kernel does; the log-sum-exp is kept for the backward.
//   backward, per (kv head, query block): S again and dP = dO V^T (both fp32), P = exp(S scale - lse),
//             dS = P (dP - delta) scale in fp32, then dQ = dS (K - mean K) (bf16 dS; the keys less
//             their segment mean as in attention.py); P and dS are also stored transposed, and
//             per (kv head, key block): dV = P^T dO and dK = dS^T Q over the queries at and after it.
//
// The scores, the shift by the log-sum-exp and dP - delta are fp32 here (no bf16 rounding before
// the exp), so no shift columns are needed (attention.py's bf16 products need them).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <vector>

#include "common.h"

// fbgemm's AVX-512 transpose, built into libtorch_cpu on x86-64 (ATen's cpu/utils.h calls it)
namespace fbgemm {
template <typename T>
void transpose_simd(int64_t M, int64_t N, const T* src, int64_t ld_src, T* dst, int64_t ld_dst);
}  // namespace fbgemm

namespace {

using namespace qlorakit;
namespace cpublas = at::native::cpublas;

constexpr int64_t kB = 32;  // tokens a block, and columns a block of a packed operand

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }


// bf16 elements of the scratch buffer for segments up to lmax tokens: per kv head, the forward's
// packed K^T and V; the backward's packed K^T, V^T and K - mean, dO rows, Q^T, dO^T, packed P and dS
int64_t scratch_numel(int64_t n_kv, int64_t groups, int64_t d, int64_t lmax) {
  const int64_t lp = round_up(lmax, kB), r = lp * groups;
  return n_kv * (3 * d * lp + 3 * r * d + 2 * lp * r);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define QLORAKIT_AMX_BUILT 1

// ---- AVX-512 helpers (every CPU with AMX has AVX-512 F/BW/VL) ------------------------------------

// exp(x) for 16 lanes: common.h's exp_approx (Cody-Waite reduction, the Cephes polynomial), with 2^n
// applied by scalef (subnormal results come out subnormal); 0 below -104, infinity above 88.72
inline __m512 exp16(__m512 x) {
  const __m512 xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693359375f), xc);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  __m512 y = _mm512_scalef_ps(p, n);
  y = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-104.0f), _CMP_LT_OQ), y, _mm512_setzero_ps());
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(88.72f), _CMP_GT_OQ), y,
                              _mm512_set1_ps(std::numeric_limits<float>::infinity()));
}

// bf16 bit patterns (round to nearest even, as float_to_bf16) in the low halves of 16 lanes
inline __m512i bf16_bits16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
}

inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? 0xffff : static_cast<__mmask16>((1u << left) - 1); }

// out[0, n) = bf16(x[0, n) * mul)
inline void store_bf16(uint16_t* out, const float* x, int64_t n, float mul = 1.0f) {
  const __m512 vm = _mm512_set1_ps(mul);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = tail_mask(n - j);
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + j), vm);
    _mm256_mask_storeu_epi16(out + j, k, _mm512_cvtepi32_epi16(bf16_bits16(v)));
  }
}

inline const at::BFloat16* as_bf16(const uint16_t* p) { return reinterpret_cast<const at::BFloat16*>(p); }

// C (M, N) fp32 [ldc] = A (M, K) bf16 [lda] x B, with B (K', N) packed for the micro-kernel (VNNI: row
// pairs interleaved) in blocks of kB columns, each [K'/2][kB][2] and `block_stride` elements apart;
// `B` points at the first used row pair of block 0 (K rows are used, K even)
inline void gemm(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B,
                 int64_t block_stride, float* C, int64_t ldc) {
  for (int64_t c = 0; c < N; c += kB)
    cpublas::brgemm(M, kB, K, lda, kB, ldc, false, as_bf16(A), as_bf16(B + (c / kB) * block_stride), C + c);
}

// rows [0, n) of a (rows, cols) matrix packed as a B operand (row pairs interleaved, blocks of kB
// columns), rows [n, rows) zero; `load(r, c)` gives row r's columns [c, c + 16) as bf16 bit patterns
// in the low halves of 16 lanes
template <class Load>
void pack_rows(uint16_t* out, int64_t rows, int64_t cols, int64_t n, const Load& load) {
  uint32_t* o = reinterpret_cast<uint32_t*>(out);
  for (int64_t r = 0; r < rows; r += 2)
    for (int64_t c = 0; c < cols; c += 16) {
      const __m512i a = r < n ? load(r, c) : _mm512_setzero_si512();
      const __m512i b = r + 1 < n ? load(r + 1, c) : _mm512_setzero_si512();
      _mm512_storeu_si512(o + (c / kB) * rows * kB / 2 + (r / 2) * kB + c % kB, _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
    }
}

// rows [0, n) of a contiguous (rows, cols) bf16 matrix `src`, transposed and packed as a B operand
// (cols, rows) in blocks of kB of its columns, rows [n, rows) zero: each block is the (kB, cols / 2)
// matrix of 32-bit words (pairs of columns) transposed
void pack_transposed(uint16_t* out, int64_t rows, int64_t cols, int64_t n, const uint16_t* src) {
  const int64_t w = cols / 2;
  const float* words = reinterpret_cast<const float*>(src);  // moved as bit patterns only
  float* o = reinterpret_cast<float*>(out);
  for (int64_t b = 0; b < rows; b += kB) {
    const int64_t m = std::clamp<int64_t>(n - b, 0, kB);
    float* blk = o + (b / kB) * w * kB;
    if (m > 0) fbgemm::transpose_simd<float>(m, w, words + b * w, w, blk, kB);
    if (m < kB)
      for (int64_t p = 0; p < w; ++p) std::memset(blk + p * kB + m, 0, (kB - m) * sizeof(float));
  }
}

// dst (cols, ld) = src (n, cols)^T, with columns [n, ld) of dst zero
void transpose_rows(uint16_t* dst, int64_t ld, const uint16_t* src, int64_t n, int64_t cols) {
  fbgemm::transpose_simd<uint16_t>(n, cols, src, cols, dst, ld);
  for (int64_t c = 0; c < cols; ++c) std::memset(dst + c * ld + n, 0, (ld - n) * sizeof(uint16_t));
}

inline __m512i load_bf16_16(const uint16_t* p) {
  return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

inline __m512 bf16_16_to_ps(const uint16_t* p) { return _mm512_castsi512_ps(_mm512_slli_epi32(load_bf16_16(p), 16)); }

// tasks [0, n) over the intra-op threads, taken in order as threads come free
template <class F>
void run_tasks(int64_t n, const F& f) {
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) f(i);
    cpublas::brgemm_release();
  });
}

template <class T>
T* grow(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  return v.data();
}

struct Shape {
  int64_t n_kv, n, groups, d, hq;
};

Shape check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::IntArrayRef starts,
            at::IntArrayRef ends, const char* name) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k, &v})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->is_contiguous(), name, ": expected contiguous bf16 q, k, v");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 3 && v.sizes() == k.sizes() && k.size(0) == q.size(0) &&
                  k.size(1) == q.size(1) && k.size(2) == q.size(3),
              name, ": expected q (Hkv, N, G, D) and k, v (Hkv, N, D)");
  const Shape s{q.size(0), q.size(1), q.size(2), q.size(3), q.size(0) * q.size(2)};
  TORCH_CHECK(s.d % kB == 0, name, ": head size ", s.d, " is not a multiple of ", kB);
  TORCH_CHECK(starts.size() == ends.size() && !starts.empty(), name, ": bad segments");
  for (size_t i = 0; i < starts.size(); ++i)
    TORCH_CHECK(0 <= starts[i] && starts[i] < ends[i] && ends[i] <= s.n, name, ": segment ", i, " [", starts[i],
                ", ", ends[i], ") is not inside the ", s.n, " tokens");
  return s;
}

int64_t longest(at::IntArrayRef starts, at::IntArrayRef ends) {
  int64_t m = 0;
  for (size_t i = 0; i < starts.size(); ++i) m = std::max(m, round_up(ends[i] - starts[i], kB));
  return m;
}


void check_scratch(const at::Tensor& scratch, const Shape& sh, at::IntArrayRef starts, at::IntArrayRef ends,
                   const char* name) {
  const int64_t need = scratch_numel(sh.n_kv, sh.groups, sh.d, longest(starts, ends));
  TORCH_CHECK(scratch.scalar_type() == at::kBFloat16 && scratch.is_contiguous() && scratch.numel() >= need, name,
              ": scratch of ", scratch.numel(), " bf16 elements, needs ", need);
}

thread_local std::vector<float> t_s, t_dp, t_c;
thread_local std::vector<uint16_t> t_p;

// o (N, Hkv G D) bf16 and lse (Hkv, N, G) fp32 (of the scaled scores) from q, k, v
void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::IntArrayRef starts,
             at::IntArrayRef ends, double scale, at::Tensor& o, at::Tensor& lse, at::Tensor& scratch) {
  const Shape sh = check(q, k, v, starts, ends, "amx_attention_forward");
  TORCH_CHECK(o.scalar_type() == at::kBFloat16 && o.is_contiguous() && o.numel() == q.numel() &&
                  lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.numel() == sh.n * sh.hq,
              "amx_attention_forward: bad outputs");
  check_scratch(scratch, sh, starts, ends, "amx_attention_forward");
  const int64_t n_kv = sh.n_kv, n = sh.n, G = sh.groups, D = sh.d, hq = sh.hq;
  const float sc = static_cast<float>(scale);
  const uint16_t *qb = bits(q), *kb = bits(k), *vb = bits(v);
  uint16_t* ob = bits(o);
  float* lb = lse.data_ptr<float>();
  uint16_t* ws = bits(scratch);
  for (size_t seg = 0; seg < starts.size(); ++seg) {
    const int64_t s = starts[seg], L = ends[seg] - s, lp = round_up(L, kB), nq = lp / kB;
    uint16_t* kt_pk = ws;                   // per head (D, lp) packed
    uint16_t* v_pk = ws + n_kv * D * lp;    // per head (lp, D) packed
    run_tasks(n_kv, [&](int64_t h) {
      const uint16_t* kh = kb + (h * n + s) * D;
      const uint16_t* vh = vb + (h * n + s) * D;
      pack_transposed(kt_pk + h * D * lp, lp, D, L, kh);
      pack_rows(v_pk + h * D * lp, lp, D, L, [&](int64_t r, int64_t c) { return load_bf16_16(vh + r * D + c); });
    });
    // the largest query blocks first
    run_tasks(n_kv * nq, [&](int64_t task) {
      const int64_t qblk = nq - 1 - task / n_kv, h = task % n_kv;
      const int64_t t0 = qblk * kB, nt = std::min(kB, L - t0), rows = nt * G, nk = t0 + kB;
      float* S = grow(t_s, kB * G * lp);
      uint16_t* P = grow(t_p, kB * G * lp);
      float* C = grow(t_c, kB * G * D);
      const uint16_t* qrows = qb + ((h * n + s) * G + t0 * G) * D;
      gemm(rows, nk, D, qrows, D, kt_pk + h * D * lp, D * kB, S, nk);
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t t = t0 + i / G, g = i % G, valid = t + 1;
        float* srow = S + i * nk;
        __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
        for (int64_t j = 0; j < valid; j += 16)
          vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(vmax, tail_mask(valid - j), srow + j));
        const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(vmax) * sc);  // the largest scaled score
        const __m512 vsc = _mm512_set1_ps(sc);
        __m512 vsum = _mm512_setzero_ps();
        uint16_t* prow = P + i * nk;
        for (int64_t j = 0; j < valid; j += 16) {
          const __mmask16 k = tail_mask(valid - j);
          const __m512 e = _mm512_maskz_mov_ps(k, exp16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(k, srow + j), vsc, m)));
          vsum = _mm512_add_ps(vsum, e);
          _mm256_mask_storeu_epi16(prow + j, k, _mm512_cvtepi32_epi16(bf16_bits16(e)));
        }
        const float sum = _mm512_reduce_add_ps(vsum);
        std::memset(prow + valid, 0, (nk - valid) * sizeof(uint16_t));
        lb[(h * n + s + t) * G + g] = _mm512_cvtss_f32(m) + std::log(sum);
        srow[0] = 1.0f / sum;  // S's row is no longer needed: keep the normaliser there
      }
      gemm(rows, D, nk, P, nk, v_pk + h * D * lp, lp * kB, C, D);
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t t = t0 + i / G, g = i % G;
        const float inv = S[i * nk];
        store_bf16(ob + (s + t) * hq * D + (h * G + g) * D, C + i * D, D, inv);
      }
    });
  }
}

// dq, dk, dv from q, k, v (as in the forward), d_out (N, Hkv G D) bf16, lse (Hkv, N, G) fp32 and
// delta (N, Hkv G) fp32 = rowsum(d_out * o)
void backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& d_out,
              const at::Tensor& lse, const at::Tensor& delta, at::IntArrayRef starts, at::IntArrayRef ends,
              double scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& scratch) {
  const Shape sh = check(q, k, v, starts, ends, "amx_attention_backward");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&d_out, &dq, &dk, &dv})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->is_contiguous(), "amx_attention_backward: expected contiguous bf16 tensors");
  TORCH_CHECK(d_out.numel() == q.numel() && dq.numel() == q.numel() && dk.numel() == k.numel() && dv.numel() == v.numel(),
              "amx_attention_backward: bad gradient shapes");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && delta.scalar_type() == at::kFloat && lse.is_contiguous() &&
                  delta.is_contiguous() && lse.numel() == sh.n * sh.hq && delta.numel() == sh.n * sh.hq,
              "amx_attention_backward: expected contiguous fp32 lse and delta");
  check_scratch(scratch, sh, starts, ends, "amx_attention_backward");
  const int64_t n_kv = sh.n_kv, n = sh.n, G = sh.groups, D = sh.d, hq = sh.hq;
  const float sc = static_cast<float>(scale);
  const uint16_t *qb = bits(q), *kb = bits(k), *vb = bits(v), *dob = bits(d_out);
  uint16_t *dqb = bits(dq), *dkb = bits(dk), *dvb = bits(dv);
  const float* lb = lse.data_ptr<float>();
  const float* db = delta.data_ptr<float>();
  uint16_t* ws = bits(scratch);
  for (size_t seg = 0; seg < starts.size(); ++seg) {
    const int64_t s = starts[seg], L = ends[seg] - s, lp = round_up(L, kB), nq = lp / kB, R = lp * G;
    // per head: (D, lp) packed K^T and V^T, (lp, D) packed K - mean, dO as (R, D) rows, Q^T and dO^T
    // (D, R), and P and dS (R, lp) packed, each a B operand
    uint16_t* kt_pk = ws;
    uint16_t* vt_pk = kt_pk + n_kv * D * lp;
    uint16_t* kp_pk = vt_pk + n_kv * D * lp;
    uint16_t* do_rows = kp_pk + n_kv * D * lp;
    uint16_t* qt = do_rows + n_kv * R * D;
    uint16_t* dot = qt + n_kv * R * D;
    uint16_t* p_pk = dot + n_kv * R * D;
    uint16_t* ds_pk = p_pk + n_kv * lp * R;
    // the operands, four tasks a head
    run_tasks(n_kv * 4, [&](int64_t task) {
      const int64_t h = task / 4, part = task % 4;
      const uint16_t* kh = kb + (h * n + s) * D;
      if (part == 0) {
        pack_transposed(kt_pk + h * D * lp, lp, D, L, kh);
        pack_transposed(vt_pk + h * D * lp, lp, D, L, vb + (h * n + s) * D);
      } else if (part == 1) {  // dO rows and dO^T
        uint16_t* dr = do_rows + h * R * D;
        for (int64_t t = 0; t < L; ++t)
          std::memcpy(dr + t * G * D, dob + (s + t) * hq * D + h * G * D, G * D * sizeof(uint16_t));
        transpose_rows(dot + h * R * D, R, dr, L * G, D);
      } else if (part == 2) {
        transpose_rows(qt + h * R * D, R, qb + (h * n + s) * G * D, L * G, D);
      } else {  // k less its mean over the segment (fp32 sums in token order, as attention.py's index_add_)
        std::vector<float> mean(D, 0.0f);
        for (int64_t t = 0; t < L; ++t)
          for (int64_t j = 0; j < D; ++j) mean[j] += bf16_to_float(kh[t * D + j]);
        for (int64_t j = 0; j < D; ++j) mean[j] = mean[j] / static_cast<float>(L);
        pack_rows(kp_pk + h * D * lp, lp, D, L, [&](int64_t r, int64_t c) {
          return bf16_bits16(_mm512_sub_ps(bf16_16_to_ps(kh + r * D + c), _mm512_loadu_ps(mean.data() + c)));
        });
      }
    });
    run_tasks(n_kv * nq, [&](int64_t task) {
      const int64_t qblk = nq - 1 - task / n_kv, h = task % n_kv;
      const int64_t t0 = qblk * kB, nt = std::min(kB, L - t0), rows = nt * G, nk = t0 + kB, row0 = t0 * G;
      float* S = grow(t_s, 2 * kB * G * lp);
      float* dP = S + kB * G * lp;
      uint16_t* dS = grow(t_p, kB * G * lp);
      float* C = grow(t_c, kB * G * D);
      gemm(rows, nk, D, qb + ((h * n + s) * G + row0) * D, D, kt_pk + h * D * lp, D * kB, S, nk);
      gemm(rows, nk, D, do_rows + (h * R + row0) * D, D, vt_pk + h * D * lp, D * kB, dP, nk);
      // P = exp(S scale - lse) and dS = P (dP - delta) scale, zero past the causal end and on query
      // rows past the segment's end: dS as bf16 rows (for dQ), and both packed as B operands, a pair
      // of rows at a time (their words interleave)
      uint32_t* pp = reinterpret_cast<uint32_t*>(p_pk + h * lp * R);
      uint32_t* dp = reinterpret_cast<uint32_t*>(ds_pk + h * lp * R);
      const __m512 vsc = _mm512_set1_ps(sc);
      for (int64_t i = 0; i < kB * G; i += 2) {
        int64_t valid[2] = {0, 0};
        __m512 shift[2], dl[2];
        for (int64_t u = 0; u < 2; ++u) {
          const int64_t r = i + u;
          if (r >= rows) continue;
          const int64_t t = t0 + r / G, g = r % G;
          valid[u] = t + 1;
          shift[u] = _mm512_set1_ps(lb[(h * n + s + t) * G + g]);
          dl[u] = _mm512_set1_ps(db[(s + t) * hq + h * G + g]);
        }
        for (int64_t j = 0; j < nk; j += 16) {
          __m512i pw[2], dw[2];
          for (int64_t u = 0; u < 2; ++u) {
            const __mmask16 k = valid[u] > j ? tail_mask(valid[u] - j) : 0;
            if (k == 0) {
              pw[u] = dw[u] = _mm512_setzero_si512();
            } else {
              const int64_t r = i + u;
              const __m512 pv = _mm512_maskz_mov_ps(k, exp16(_mm512_fmsub_ps(_mm512_loadu_ps(S + r * nk + j), vsc, shift[u])));
              const __m512 dv = _mm512_mul_ps(_mm512_mul_ps(pv, _mm512_sub_ps(_mm512_loadu_ps(dP + r * nk + j), dl[u])), vsc);
              pw[u] = bf16_bits16(pv);
              dw[u] = bf16_bits16(dv);
            }
            if (i + u < rows) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dS + (i + u) * nk + j), _mm512_cvtepi32_epi16(dw[u]));
          }
          const int64_t at = (j / kB) * R * kB / 2 + ((row0 + i) / 2) * kB + j % kB;
          _mm512_storeu_si512(pp + at, _mm512_or_si512(pw[0], _mm512_slli_epi32(pw[1], 16)));
          _mm512_storeu_si512(dp + at, _mm512_or_si512(dw[0], _mm512_slli_epi32(dw[1], 16)));
        }
      }
      gemm(rows, D, nk, dS, nk, kp_pk + h * D * lp, lp * kB, C, D);
      uint16_t* dqrows = dqb + ((h * n + s) * G + row0) * D;
      store_bf16(dqrows, C, rows * D);
    });
    // dV^T = dO^T P and dK^T = Q^T dS per key block, over the query rows at and after it
    run_tasks(n_kv * nq, [&](int64_t task) {
      const int64_t kblk = task / n_kv, h = task % n_kv;
      const int64_t j0 = kblk * kB, nj = std::min(kB, L - j0), r0 = j0 * G, kk = R - r0;
      float* C = grow(t_c, 2 * D * kB);
      float* C2 = C + D * kB;
      gemm(D, kB, kk, dot + h * R * D + r0, R, p_pk + h * lp * R + kblk * R * kB + r0 * kB, R * kB, C, kB);
      gemm(D, kB, kk, qt + h * R * D + r0, R, ds_pk + h * lp * R + kblk * R * kB + r0 * kB, R * kB, C2, kB);
      float* Ct = grow(t_s, 2 * kB * D);
      fbgemm::transpose_simd<float>(D, kB, C, kB, Ct, D);
      fbgemm::transpose_simd<float>(D, kB, C2, kB, Ct + kB * D, D);
      store_bf16(dvb + (h * n + s + j0) * D, Ct, nj * D);
      store_bf16(dkb + (h * n + s + j0) * D, Ct + kB * D, nj * D);
    });
  }
}

#else  // no AVX-512 here, so no AMX either: available() is false and the Python side never calls these

void forward(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef, at::IntArrayRef, double,
             at::Tensor&, at::Tensor&, at::Tensor&) {
  TORCH_CHECK(false, "amx_attention_forward: built without AVX-512");
}

void backward(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, at::IntArrayRef, at::IntArrayRef, double, at::Tensor&, at::Tensor&, at::Tensor&,
              at::Tensor&) {
  TORCH_CHECK(false, "amx_attention_backward: built without AVX-512");
}

#endif

}  // namespace

bool available() {
#ifdef QLORAKIT_AMX_BUILT
  return cpublas::could_pack(at::kBFloat16);
#else
  return false;
#endif
}

TORCH_LIBRARY(qlorakit_amx, m) {
  m.def("available() -> bool", &available);
  m.def("scratch_numel(int n_kv, int groups, int d, int longest) -> int", &scratch_numel);
  m.def("forward(Tensor q, Tensor k, Tensor v, int[] starts, int[] ends, float scale, Tensor(a!) o, "
        "Tensor(b!) lse, Tensor(c!) scratch) -> ()");
  m.def("backward(Tensor q, Tensor k, Tensor v, Tensor d_out, Tensor lse, Tensor delta, int[] starts, "
        "int[] ends, float scale, Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv, Tensor(d!) scratch) -> ()");
}

TORCH_LIBRARY_IMPL(qlorakit_amx, CPU, m) {
  m.impl("forward", &forward);
  m.impl("backward", &backward);
}
