// token_margins and its backward: schemas, the device-generic parts, and the
// fused CPU cores (flash-attention style: query blocks in parallel, an online
// softmax over key blocks, never a T x T buffer).
#include "barrier_ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

// MKL's thread-local thread count, exported by torch builds that link MKL;
// weak, so a torch built with another BLAS loads this extension too. This is
// the C entry point (mkl_service.h maps mkl_set_num_threads_local to it); the
// lowercase symbol is the Fortran one, which takes an int*.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace barrier_ops {

namespace {

// The block GEMMs run inside at::parallel_for tasks and must stay on the
// calling thread. Under torch's default settings MKL otherwise opens a nested
// parallel region per call, which costs more than the small GEMM itself
// (measured here: 2 threads slower than 1, 3-5x slower with a passive OpenMP
// wait policy).
class BlasOnCallingThread {
 public:
  BlasOnCallingThread()
      : previous_(MKL_Set_Num_Threads_Local != nullptr ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~BlasOnCallingThread() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous_);
  }
  BlasOnCallingThread(const BlasOnCallingThread&) = delete;
  BlasOnCallingThread& operator=(const BlasOnCallingThread&) = delete;

 private:
  int previous_;
};

// Block sizes trade GEMM efficiency (larger blocks) against scratch per
// thread; 64 x 128 keeps each block's scores inside L2 for d up to 256.
constexpr int64_t kQueryBlock = 64;
constexpr int64_t kKeyBlock = 128;

// A kv-head tensor [B, Hkv, T, *] as one slice per query head [B, H, T, *] in
// the accumulation dtype. GQA: query head h reads kv head h / (H / Hkv).
at::Tensor per_query_head(const at::Tensor& kv, int64_t H) {
  const int64_t group = H / kv.size(1);
  at::Tensor out = kv.to(accumulation_dtype(kv.scalar_type()));
  return group > 1 ? out.repeat_interleave(group, 1) : out;
}

// w = A_h v for every query head, in the accumulation dtype, from v already
// sliced per query head.
at::Tensor coupled_values(const at::Tensor& v_h, const std::optional<at::Tensor>& coupling) {
  if (!coupling.has_value()) return v_h;
  const at::Tensor A = coupling->to(v_h.scalar_type());
  if (A.dim() == 1) return v_h * A.view({1, -1, 1, 1});
  return at::matmul(v_h, A.transpose(-1, -2));  // [B,H,T,dv] x [H,dv,d]
}

// Keys packed per query head as [k | w | g] with g_s = <k_s, w_s>: one GEMM of
// the softmax weights against this gives sum(alpha k), sum(alpha w) and
// sum(alpha g) together.
at::Tensor pack_keys(const at::Tensor& k, const at::Tensor& w, int64_t H) {
  const at::Tensor k_h = per_query_head(k, H);
  const at::Tensor w_a = w.to(k_h.scalar_type());
  const at::Tensor g = (k_h * w_a).sum(-1, /*keepdim=*/true);
  return at::cat({k_h, w_a, g}, -1).contiguous();
}

// exp for the softmax weights. std::exp is a library call per element and
// dominates the fused loops; this float version (Cephes' expf polynomial,
// about 2 ulp on [-87, 88]) is plain arithmetic, so the loops around it
// vectorize on any x86-64 or ARM target. Arguments here are <= 0 (logit minus
// its row max or lse); below -87 the result is ~1e-38 instead of 0, and
// callers map masked (-inf) entries to an exact 0 themselves. float64 keeps
// std::exp: it is the accuracy path.
inline float softmax_exp(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = (x * kLog2e + kRoundMagic) - kRoundMagic;
  const float r = x - n * 0.693359375f - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t exponent_bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_to_n;
  std::memcpy(&two_to_n, &exponent_bits, sizeof(float));
  return y * two_to_n;
}
inline double softmax_exp(double x) { return std::exp(x); }

#define BARRIER_OPS_ALWAYS_INLINE inline __attribute__((always_inline))

// The three element-wise row loops of the fused kernels. Keys j >= allowed_end
// (after the query, causal) or with key_mask[j] false get weight exactly 0.
// The reductions may be reassociated (omp simd): a max, and sums of
// non-negative weights, where the order changes nothing beyond rounding; it
// lets them vectorize without -ffast-math.
template <typename T>
BARRIER_OPS_ALWAYS_INLINE T row_scale_max_impl(T* row, int64_t nk, T scale, int64_t allowed_end,
                                               const bool* key_mask) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  T block_max = neg_inf;
#pragma omp simd reduction(max : block_max)
  for (int64_t j = 0; j < nk; ++j) {
    const bool ok = j < allowed_end && (key_mask == nullptr || key_mask[j]);
    row[j] = ok ? scale * row[j] : neg_inf;
    block_max = std::max(block_max, row[j]);
  }
  return block_max;
}

template <typename T>
BARRIER_OPS_ALWAYS_INLINE T row_exp_sum_impl(T* row, int64_t nk, T shift) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < nk; ++j) {
    const T e = softmax_exp(row[j] - shift);
    row[j] = row[j] == neg_inf ? T(0) : e;
    sum += row[j];
  }
  return sum;
}

// scores -> dz_ts, cross -> Pb_ts = beta_t c alpha_ts, coef_s += Pb_ts.
template <typename T>
BARRIER_OPS_ALWAYS_INLINE void row_backward_impl(T* scores, T* cross, const T* g, T* coef,
                                                 int64_t nk, int64_t allowed_end,
                                                 const bool* key_mask, T scale, T lse, T beta_c,
                                                 T hbar) {
#pragma omp simd
  for (int64_t j = 0; j < nk; ++j) {
    const bool ok = j < allowed_end && (key_mask == nullptr || key_mask[j]);
    const T alpha = ok ? softmax_exp(scale * scores[j] - lse) : T(0);
    const T pb = beta_c * alpha;
    scores[j] = pb * (g[j] - cross[j] - hbar);
    cross[j] = pb;
    coef[j] += pb;
  }
}

}  // namespace

// The extension is built for the baseline ISA so that one binary runs on any
// x86-64 machine; the float row loops are also compiled for x86-64-v3 (AVX2,
// FMA) and v4 (AVX-512), and the loader picks the best one (GCC ifunc).
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define BARRIER_OPS_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BARRIER_OPS_CPU_CLONES
#endif

namespace detail {

BARRIER_OPS_CPU_CLONES float row_scale_max(float* row, int64_t nk, float scale,
                                           int64_t allowed_end, const bool* key_mask) {
  return row_scale_max_impl(row, nk, scale, allowed_end, key_mask);
}
double row_scale_max(double* row, int64_t nk, double scale, int64_t allowed_end,
                     const bool* key_mask) {
  return row_scale_max_impl(row, nk, scale, allowed_end, key_mask);
}
BARRIER_OPS_CPU_CLONES float row_exp_sum(float* row, int64_t nk, float shift) {
  return row_exp_sum_impl(row, nk, shift);
}
double row_exp_sum(double* row, int64_t nk, double shift) {
  return row_exp_sum_impl(row, nk, shift);
}
BARRIER_OPS_CPU_CLONES void row_backward(float* scores, float* cross, const float* g, float* coef,
                                         int64_t nk, int64_t allowed_end, const bool* key_mask,
                                         float scale, float lse, float beta_c, float hbar) {
  row_backward_impl(scores, cross, g, coef, nk, allowed_end, key_mask, scale, lse, beta_c, hbar);
}
void row_backward(double* scores, double* cross, const double* g, double* coef, int64_t nk,
                  int64_t allowed_end, const bool* key_mask, double scale, double lse,
                  double beta_c, double hbar) {
  row_backward_impl(scores, cross, g, coef, nk, allowed_end, key_mask, scale, lse, beta_c, hbar);
}

}  // namespace detail

namespace {

template <typename scalar_t>
void forward_query_block(const at::Tensor& q_block, const at::Tensor& packed, int64_t t0,
                         int64_t nq, int64_t T, int64_t d, double scale_d, bool causal,
                         const bool* mask_row, at::Tensor& scores_buf, at::Tensor& accum_buf,
                         scalar_t* kappa, scalar_t* lse, scalar_t* stats) {
  const scalar_t scale = static_cast<scalar_t>(scale_d);
  const scalar_t neg_inf = -std::numeric_limits<scalar_t>::infinity();
  const int64_t width = 2 * d + 1;
  std::vector<scalar_t> row_max(nq, neg_inf), row_sum(nq, 0);
  at::Tensor accum = accum_buf.narrow(0, 0, nq);
  accum.zero_();
  scalar_t* accum_ptr = accum.data_ptr<scalar_t>();
  const int64_t accum_ld = accum.stride(0);
  // Causal: keys after the block's last query are never allowed, so those
  // blocks are skipped rather than computed and masked.
  const int64_t key_end = causal ? t0 + nq : T;
  for (int64_t s0 = 0; s0 < key_end; s0 += kKeyBlock) {
    const int64_t nk = std::min(kKeyBlock, key_end - s0);
    const at::Tensor key_rows = packed.narrow(0, s0, nk);
    at::Tensor scores = scores_buf.narrow(0, 0, nq).narrow(1, 0, nk);
    at::mm_out(scores, q_block, key_rows.narrow(1, 0, d).t());
    scalar_t* sp = scores.data_ptr<scalar_t>();
    const int64_t ld = scores.stride(0);
    const bool* key_mask = mask_row ? mask_row + s0 : nullptr;
    for (int64_t i = 0; i < nq; ++i) {
      scalar_t* row = sp + i * ld;
      const int64_t allowed_end = causal ? std::min(nk, t0 + i - s0 + 1) : nk;
      const scalar_t block_max = detail::row_scale_max(row, nk, scale, allowed_end, key_mask);
      if (block_max == neg_inf) {
        std::fill(row, row + nk, scalar_t(0));
        continue;
      }
      const scalar_t new_max = std::max(row_max[i], block_max);
      const scalar_t correction = softmax_exp(row_max[i] - new_max);
      const scalar_t block_sum = detail::row_exp_sum(row, nk, new_max);
      row_sum[i] = row_sum[i] * correction + block_sum;
      row_max[i] = new_max;
      if (correction != scalar_t(1)) {
        scalar_t* acc_row = accum_ptr + i * accum_ld;
        for (int64_t c = 0; c < width; ++c) acc_row[c] *= correction;
      }
    }
    accum.addmm_(scores, key_rows);
  }
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t t = t0 + i;
    const bool valid = row_sum[i] > 0 && (mask_row == nullptr || mask_row[t]);
    if (!valid) continue;  // outputs keep their "invalid" fill: kappa 0, lse -inf, stats 0
    const scalar_t inv = scalar_t(1) / row_sum[i];
    const scalar_t* acc_row = accum_ptr + i * accum_ld;
    scalar_t* stat_row = stats + t * 2 * d;
    scalar_t kw = 0;
    for (int64_t c = 0; c < d; ++c) {
      const scalar_t kbar = acc_row[c] * inv;
      const scalar_t wbar = acc_row[d + c] * inv;
      stat_row[c] = kbar;
      stat_row[d + c] = wbar;
      kw += kbar * wbar;
    }
    kappa[t] = scale * (acc_row[2 * d] * inv - kw);
    lse[t] = row_max[i] + std::log(row_sum[i]);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> kappa_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& w, double scale, bool causal,
    const std::optional<at::Tensor>& key_padding_mask) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), d = q.size(3);
  const auto acc = accumulation_dtype(q.scalar_type());
  const auto opts = q.options().dtype(acc);
  const at::Tensor q_a = q.to(acc).contiguous();
  const at::Tensor packed = pack_keys(k, w, H);
  const at::Tensor mask =
      key_padding_mask.has_value() ? key_padding_mask->contiguous() : at::Tensor();
  at::Tensor kappa = at::zeros({B, H, T}, opts);
  at::Tensor lse = at::full({B, H, T}, -std::numeric_limits<double>::infinity(), opts);
  at::Tensor stats = at::zeros({B, H, T, 2 * d}, opts);
  const int64_t n_qblocks = (T + kQueryBlock - 1) / kQueryBlock;
  if (B * H * n_qblocks == 0) return {kappa, lse, stats};
  AT_DISPATCH_FLOATING_TYPES(acc, "kappa_forward_cpu", [&] {
    const bool* mask_ptr = mask.defined() ? mask.data_ptr<bool>() : nullptr;
    scalar_t* kappa_ptr = kappa.data_ptr<scalar_t>();
    scalar_t* lse_ptr = lse.data_ptr<scalar_t>();
    scalar_t* stats_ptr = stats.data_ptr<scalar_t>();
    at::parallel_for(0, B * H * n_qblocks, 1, [&](int64_t begin, int64_t end) {
      const BlasOnCallingThread single_threaded_blas;
      at::Tensor scores_buf = at::empty({kQueryBlock, kKeyBlock}, opts);
      at::Tensor accum_buf = at::empty({kQueryBlock, 2 * d + 1}, opts);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bh = task / n_qblocks, b = bh / H, h = bh % H;
        const int64_t t0 = (task % n_qblocks) * kQueryBlock;
        const int64_t nq = std::min(kQueryBlock, T - t0);
        const bool* mask_row = mask_ptr ? mask_ptr + b * T : nullptr;
        if (mask_row && std::none_of(mask_row + t0, mask_row + t0 + nq, [](bool x) { return x; }))
          continue;  // every query of the block is padding: no margins to compute
        forward_query_block<scalar_t>(q_a[b][h].narrow(0, t0, nq), packed[b][h], t0, nq, T, d,
                                      scale, causal, mask_row, scores_buf, accum_buf,
                                      kappa_ptr + bh * T, lse_ptr + bh * T,
                                      stats_ptr + bh * T * 2 * d);
      }
    });
  });
  return {kappa, lse, stats};
}

namespace {

// Backward of one (b, h): query blocks outer, key blocks inner, from the
// spec's formulas with alpha recomputed from the saved lse. Key-side sums
// (sum_t dz q_t, sum_t Pb [kbar|wbar], coef) land in this (b, h)'s own rows,
// so (b, h) tasks never race.
template <typename scalar_t>
void backward_head(const at::Tensor& q_h, const at::Tensor& packed_h, const at::Tensor& g_h,
                   const at::Tensor& stats_h, const at::Tensor& swapped_stats_h,
                   const scalar_t* beta, const scalar_t* kappa, const scalar_t* lse, int64_t T,
                   int64_t d, double scale_d, bool causal, const bool* mask_row,
                   at::Tensor& dq_h, at::Tensor& kq_h, at::Tensor& bars_h, scalar_t* coef,
                   at::Tensor& scores_buf, at::Tensor& cross_buf, at::Tensor& dq_buf) {
  const scalar_t scale = static_cast<scalar_t>(scale_d);
  const scalar_t* g_col = g_h.data_ptr<scalar_t>();
  const scalar_t* stats_ptr = stats_h.data_ptr<scalar_t>();
  std::vector<scalar_t> hbar(kQueryBlock);
  for (int64_t t0 = 0; t0 < T; t0 += kQueryBlock) {
    const int64_t nq = std::min(kQueryBlock, T - t0);
    bool any_active = false;
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t t = t0 + i;
      const bool active = std::isfinite(lse[t]) && beta[t] != scalar_t(0);
      any_active = any_active || active;
      scalar_t kw = 0;
      const scalar_t* stat_row = stats_ptr + t * 2 * d;
      for (int64_t c = 0; c < d; ++c) kw += stat_row[c] * stat_row[d + c];
      hbar[i] = kappa[t] / scale - kw;
    }
    if (!any_active) continue;
    const at::Tensor q_block = q_h.narrow(0, t0, nq);
    const at::Tensor stats_block = stats_h.narrow(0, t0, nq);
    const at::Tensor swapped_block = swapped_stats_h.narrow(0, t0, nq);
    at::Tensor dq_acc = dq_buf.narrow(0, 0, nq);
    dq_acc.zero_();
    const int64_t key_end = causal ? t0 + nq : T;
    for (int64_t s0 = 0; s0 < key_end; s0 += kKeyBlock) {
      const int64_t nk = std::min(kKeyBlock, key_end - s0);
      const at::Tensor key_rows = packed_h.narrow(0, s0, nk);
      const at::Tensor k_block = key_rows.narrow(1, 0, d);
      at::Tensor scores = scores_buf.narrow(0, 0, nq).narrow(1, 0, nk);
      at::Tensor cross = cross_buf.narrow(0, 0, nq).narrow(1, 0, nk);
      at::mm_out(scores, q_block, k_block.t());
      // cross_ts = <wbar_t, k_s> + <kbar_t, w_s> = [wbar|kbar]_t . [k|w]_s in
      // one GEMM of width 2d, so h_ts = g_s - cross_ts.
      at::mm_out(cross, swapped_block, key_rows.narrow(1, 0, 2 * d).t());
      scalar_t* sp = scores.data_ptr<scalar_t>();
      scalar_t* cp = cross.data_ptr<scalar_t>();
      const int64_t lds = scores.stride(0), ldc = cross.stride(0);
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t t = t0 + i;
        scalar_t* srow = sp + i * lds;
        scalar_t* crow = cp + i * ldc;
        const bool active = std::isfinite(lse[t]) && beta[t] != scalar_t(0);
        if (!active) {
          std::fill(srow, srow + nk, scalar_t(0));
          std::fill(crow, crow + nk, scalar_t(0));
          continue;
        }
        const int64_t allowed_end = causal ? std::min<int64_t>(nk, t - s0 + 1) : nk;
        detail::row_backward(srow, crow, g_col + s0, coef + s0, nk, allowed_end,
                             mask_row ? mask_row + s0 : nullptr, scale, lse[t], beta[t] * scale,
                             hbar[i]);
      }
      dq_acc.addmm_(scores, k_block);
      kq_h.narrow(0, s0, nk).addmm_(scores.t(), q_block);
      bars_h.narrow(0, s0, nk).addmm_(cross.t(), stats_block);
    }
    dq_h.narrow(0, t0, nq).copy_(dq_acc).mul_(scale);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> kappa_backward_cpu(
    const at::Tensor& grad_kappa, const at::Tensor& q, const at::Tensor& k, const at::Tensor& w,
    const at::Tensor& kappa, const at::Tensor& lse, const at::Tensor& stats, double scale,
    bool causal, const std::optional<at::Tensor>& key_padding_mask) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), d = q.size(3);
  const auto acc = accumulation_dtype(q.scalar_type());
  const auto opts = q.options().dtype(acc);
  const at::Tensor q_a = q.to(acc).contiguous();
  const at::Tensor packed = pack_keys(k, w, H);
  const at::Tensor g = packed.select(-1, 2 * d).contiguous();  // [B, H, T]: g_s read per key
  const at::Tensor beta = grad_kappa.to(acc).contiguous();
  const at::Tensor kappa_c = kappa.contiguous(), lse_c = lse.contiguous();
  const at::Tensor stats_c = stats.contiguous();
  // [wbar | kbar]: the saved [kbar | wbar] with halves swapped, to pair with
  // the packed [k | w] in the cross GEMM.
  const at::Tensor swapped_stats =
      at::cat({stats_c.narrow(-1, d, d), stats_c.narrow(-1, 0, d)}, -1);
  const at::Tensor mask =
      key_padding_mask.has_value() ? key_padding_mask->contiguous() : at::Tensor();
  at::Tensor dq = at::zeros({B, H, T, d}, opts);
  at::Tensor kq = at::zeros({B, H, T, d}, opts);        // sum_t dz_ts q_t
  at::Tensor bars = at::zeros({B, H, T, 2 * d}, opts);  // sum_t Pb_ts [kbar_t | wbar_t]
  at::Tensor coef = at::zeros({B, H, T}, opts);         // sum_t Pb_ts
  if (B * H * T > 0) {
    AT_DISPATCH_FLOATING_TYPES(acc, "kappa_backward_cpu", [&] {
      const bool* mask_ptr = mask.defined() ? mask.data_ptr<bool>() : nullptr;
      const scalar_t* beta_ptr = beta.data_ptr<scalar_t>();
      const scalar_t* kappa_ptr = kappa_c.data_ptr<scalar_t>();
      const scalar_t* lse_ptr = lse_c.data_ptr<scalar_t>();
      scalar_t* coef_ptr = coef.data_ptr<scalar_t>();
      at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
        const BlasOnCallingThread single_threaded_blas;
        at::Tensor scores_buf = at::empty({kQueryBlock, kKeyBlock}, opts);
        at::Tensor cross_buf = at::empty({kQueryBlock, kKeyBlock}, opts);
        at::Tensor dq_buf = at::empty({kQueryBlock, d}, opts);
        for (int64_t bh = begin; bh < end; ++bh) {
          const int64_t b = bh / H, h = bh % H;
          at::Tensor dq_h = dq[b][h], kq_h = kq[b][h], bars_h = bars[b][h];
          backward_head<scalar_t>(q_a[b][h], packed[b][h], g[b][h], stats_c[b][h],
                                  swapped_stats[b][h], beta_ptr + bh * T,
                                  kappa_ptr + bh * T, lse_ptr + bh * T, T, d, scale, causal,
                                  mask_ptr ? mask_ptr + b * T : nullptr, dq_h, kq_h, bars_h,
                                  coef_ptr + bh * T, scores_buf, cross_buf, dq_buf);
        }
      });
    });
  }
  const at::Tensor k_h = packed.narrow(-1, 0, d);
  const at::Tensor w_h = packed.narrow(-1, d, d);
  const at::Tensor coef_col = coef.unsqueeze(-1);
  // dk_s = c sum_t dz q_t + coef_s w_s - sum_t Pb wbar_t ; dw_s = coef_s k_s - sum_t Pb kbar_t
  at::Tensor dk = kq.mul_(scale).addcmul_(coef_col, w_h).sub_(bars.narrow(-1, d, d));
  at::Tensor dw = (coef_col * k_h).sub_(bars.narrow(-1, 0, d));
  return {dq, dk, dw};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_margins_with(
    KappaForwardFn core, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& coupling, double scale, bool causal,
    const std::optional<at::Tensor>& key_padding_mask, bool combine_heads) {
  check_attention_inputs(q, k, v, coupling, key_padding_mask, scale);
  const at::Tensor w = coupled_values(per_query_head(v, q.size(1)), coupling).to(q.scalar_type());
  auto [kappa, lse, stats] = core(q, k, w, scale, causal, key_padding_mask);
  // Invalid positions carry kappa = 0, so their margin is exactly 1.
  at::Tensor margins = combine_heads ? at::rsub(kappa.sum(1), 1.0) : at::rsub(kappa, 1.0);
  return {margins, kappa, lse, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_margins_backward_with(
    KappaBackwardFn core, const at::Tensor& grad_kappa, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const std::optional<at::Tensor>& coupling, double scale, bool causal,
    const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& kappa,
    const at::Tensor& lse, const at::Tensor& stats) {
  check_attention_inputs(q, k, v, coupling, key_padding_mask, scale);
  check_saved_state(grad_kappa, q, kappa, lse, stats);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), d = q.size(3);
  const int64_t Hkv = k.size(1), group = H / Hkv, dv_dim = v.size(3);
  const auto acc = accumulation_dtype(q.scalar_type());
  // w is recomputed (one GEMM) rather than saved: the forward keeps only
  // kappa, lse and [kbar | wbar].
  const at::Tensor v_h = per_query_head(v, H);
  const at::Tensor w = coupled_values(v_h, coupling).to(q.scalar_type());
  auto [dq, dk_h, dw] = core(grad_kappa.to(acc), q, k, w, kappa, lse, stats, scale, causal,
                             key_padding_mask);
  // A kv head's gradient is the sum over the query heads of its group.
  at::Tensor dk = dk_h.view({B, Hkv, group, T, d}).sum(2);
  at::Tensor dv_h;
  at::Tensor dcoupling;
  if (!coupling.has_value()) {
    dv_h = dw;
    dcoupling = at::empty({0}, q.options());
  } else {
    const at::Tensor A = coupling->to(acc);
    if (A.dim() == 1) {
      dv_h = dw * A.view({1, H, 1, 1});
      dcoupling = (dw * v_h).sum({0, 2, 3});
    } else {
      dv_h = at::matmul(dw, A);  // dv_s = A^T dw_s : [B,H,T,d] x [H,d,dv]
      dcoupling = at::matmul(dw.transpose(-1, -2), v_h).sum(0);  // sum_s dw_s v_s^T
    }
    dcoupling = dcoupling.to(coupling->scalar_type());
  }
  at::Tensor dv = dv_h.reshape({B, Hkv, group, T, dv_dim}).sum(2);
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type()), dcoupling};
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_margins_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& coupling, double scale, bool causal,
    const std::optional<at::Tensor>& key_padding_mask, bool combine_heads) {
  return token_margins_with(&kappa_forward_cpu, q, k, v, coupling, scale, causal,
                            key_padding_mask, combine_heads);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_margins_backward_cpu(
    const at::Tensor& grad_kappa, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& coupling, double scale, bool causal,
    const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& kappa,
    const at::Tensor& lse, const at::Tensor& stats) {
  return token_margins_backward_with(&kappa_backward_cpu, grad_kappa, q, k, v, coupling, scale,
                                     causal, key_padding_mask, kappa, lse, stats);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(barrier_ops, m) {
  m.def(
      "token_margins(Tensor q, Tensor k, Tensor v, Tensor? coupling, float scale, bool causal, "
      "Tensor? key_padding_mask, bool combine_heads) -> (Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "token_margins_backward(Tensor grad_kappa, Tensor q, Tensor k, Tensor v, Tensor? coupling, "
      "float scale, bool causal, Tensor? key_padding_mask, Tensor kappa, Tensor lse, "
      "Tensor stats) -> (Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(barrier_ops, CPU, m) {
  m.impl("token_margins", &token_margins_cpu);
  m.impl("token_margins_backward", &token_margins_backward_cpu);
}

}  // namespace barrier_ops
