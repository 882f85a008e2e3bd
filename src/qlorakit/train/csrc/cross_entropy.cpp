// The fast path's cross-entropy over the vocabulary in native code, for bf16 logits on the CPU:
// qlorakit/train/kernels.py's ce_fwd_bwd_ (the summed loss, and the gradient written over the
// logits). Each row goes once through an fp32 buffer that stays in cache: its maximum, exp(x - max)
// kept in the buffer while summed, then the gradient exp(x - max) / sum - onehot from the buffer,
// one exp an element where the inductor kernel takes two (on the packaged model's (2048, 49152)
// logits, exp is most of that kernel's time).
//
// Built with the other sources into one library (qlorakit/train/native.py).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common.h"

namespace {

using namespace qlorakit;

// logits (n, V) bf16, written over with d loss / d logits; target (n,) int64 -> summed loss (fp32)
at::Tensor ce_fwd_bwd_(at::Tensor& logits, const at::Tensor& target) {
  TORCH_CHECK(logits.scalar_type() == at::kBFloat16 && logits.is_contiguous() && logits.dim() == 2,
              "ce_fwd_bwd_: expected contiguous bf16 (n, V) logits, got ", logits.scalar_type(), " ", logits.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() == 1 && target.size(0) == logits.size(0),
              "ce_fwd_bwd_: expected ", logits.size(0), " int64 targets, got ", target.scalar_type(), " ", target.sizes());
  const int64_t n = logits.size(0), vocab = logits.size(1);
  const at::Tensor tgt = target.contiguous();
  const int64_t* tp = tgt.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r)
    TORCH_CHECK(0 <= tp[r] && tp[r] < vocab, "ce_fwd_bwd_: target ", tp[r], " of row ", r, " is outside the vocabulary of ", vocab);
  uint16_t* base = bits(logits);
  std::vector<float> row_loss(n);
  at::parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> buf(vocab);
    float* x = buf.data();
    for (int64_t r = lo; r < hi; ++r) {
      uint16_t* row = base + r * vocab;
      float m = -std::numeric_limits<float>::infinity();
      // converted, then reduced: in one loop gcc vectorises neither well (1.2 against 0.22 ns an element)
#pragma omp simd
      for (int64_t j = 0; j < vocab; ++j) x[j] = bf16_to_float(row[j]);
#pragma omp simd reduction(max : m)
      for (int64_t j = 0; j < vocab; ++j) m = x[j] > m ? x[j] : m;
      const float picked = x[tp[r]];
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < vocab; ++j) {
        x[j] = exp_approx(x[j] - m);
        s += x[j];
      }
      const float inv = 1.0f / s;
#pragma omp simd
      for (int64_t j = 0; j < vocab; ++j) row[j] = float_to_bf16(x[j] * inv);
      row[tp[r]] = float_to_bf16(x[tp[r]] * inv - 1.0f);
      row_loss[r] = m + std::log(s) - picked;
    }
  });
  double total = 0.0;
  for (float v : row_loss) total += v;
  return at::scalar_tensor(static_cast<float>(total), logits.options().dtype(at::kFloat));
}

}  // namespace

TORCH_LIBRARY(qlorakit_ce, m) { m.def("ce_fwd_bwd_(Tensor(a!) logits, Tensor target) -> Tensor"); }

TORCH_LIBRARY_IMPL(qlorakit_ce, CPU, m) { m.impl("ce_fwd_bwd_", &ce_fwd_bwd_); }
