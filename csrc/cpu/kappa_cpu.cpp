// The fused CPU cores of kappa (KappaForwardFn / KappaBackwardFn in
// csrc/barrier_ops.h): flash-attention style, query blocks in parallel, an
// online softmax over key blocks, never a T x T buffer.
#include "barrier_ops.h"
#include "cpu/cpu_blas.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace barrier_ops {

namespace {

using cpu::Trans;

// Block sizes trade GEMM efficiency (larger blocks) against scratch per
// thread; 64 x 128 keeps each block's scores inside L2 for d up to 256.
constexpr int64_t kQueryBlock = 64;
constexpr int64_t kKeyBlock = 128;
// The forward's key blocks are wider: each of its two GEMMs per block (the
// scores, then the weights against [k | w | g]) repacks its operands and
// loads and stores its output tile per call, and 512 keys make a quarter as
// many calls, the second with k = 512 instead of 128. The
// 64 x 512 score tile (128 KiB) stays in L2. Measured interleaved, one
// thread: forward -3 to -6% at T = 1024..8192 against 128; 256 gave -2%,
// 1024 nothing.
constexpr int64_t kForwardKeyBlock = 512;

// Keys packed per query head as [k | w | g] with g_s = <k_s, w_s>: one GEMM of
// the softmax weights against this gives sum(alpha k), sum(alpha w) and
// sum(alpha g) together.
//
// Padded rows are zeroed (here and in q): a masked key gets weight exactly 0,
// but the block GEMMs would still form 0 * NaN from whatever it holds.
at::Tensor pack_keys(const at::Tensor& k, const at::Tensor& w, const at::Tensor& real) {
  at::Tensor k_h = k.to(accumulation_dtype(k.scalar_type()));
  at::Tensor w_a = w.to(k_h.scalar_type());
  if (real.defined()) {
    k_h = at::where(real, k_h, 0.0);
    w_a = at::where(real, w_a, 0.0);
  }
  const at::Tensor g = (k_h * w_a).sum(-1, /*keepdim=*/true);
  return at::cat({k_h, w_a, g}, -1).contiguous();
}

// [B, 1, T, 1] view of the key padding mask (True = real), or undefined.
at::Tensor real_rows(const KappaProblem& problem) {
  const at::Tensor& mask = problem.key_padding_mask;
  return mask.defined() ? mask.view({problem.B(), 1, problem.T(), 1}) : at::Tensor();
}

// Whether a row at position pos is a query: not an empty slot (pos >= 0; CPU
// row sets are checked to lie in [-1, T)) and a real token.
inline bool is_query_position(int64_t pos, const bool* mask_row) {
  return pos >= 0 && (mask_row == nullptr || mask_row[pos]);
}

// The CPU cores read through every position (the mask, the causal range), so
// the row set's values are checked here, before any read: -1 (an empty slot)
// or a position in [0, T).
void check_positions_in_range(const KappaProblem& problem) {
  const int64_t* positions = problem.positions_ptr();
  if (positions == nullptr) return;
  const int64_t n = problem.B() * problem.R(), T = problem.T();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(positions[i] >= -1 && positions[i] < T,
                      "query_positions must hold positions in [0, T) or -1 for an empty slot (T=",
                      T, "), got ", positions[i], " at [", i / problem.R(), ", ",
                      i % problem.R(), "]");
  }
}

// [B, 1, R, 1] bool: row r holds a query (not an empty slot, a real token),
// or undefined when every row does. Without a row set this is real_rows.
at::Tensor query_rows(const KappaProblem& problem) {
  if (!problem.has_row_set()) return real_rows(problem);
  const int64_t B = problem.B(), R = problem.R(), T = problem.T();
  at::Tensor is_query = at::empty({B, 1, R, 1}, problem.q.options().dtype(at::kBool));
  bool* out = is_query.data_ptr<bool>();
  const int64_t* positions = problem.positions_ptr();
  const bool* mask = problem.mask_ptr();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t r = 0; r < R; ++r) {
      out[b * R + r] = is_query_position(positions[b * R + r], mask ? mask + b * T : nullptr);
    }
  }
  return is_query;
}

// q in the accumulation dtype with the rows that are no query zeroed (a
// padded position or an empty slot may hold anything, NaN included).
at::Tensor queries_in(const KappaProblem& problem, at::ScalarType acc) {
  at::Tensor q = problem.q.to(acc);
  const at::Tensor real = query_rows(problem);
  return (real.defined() ? at::where(real, q, 0.0) : q).contiguous();
}

// Keys s < row_key_end(causal, pos, T) may be allowed for a row at position
// pos (before the padding mask); an empty slot (pos < 0) gets 0, so it never
// extends a block's key range. A padded position keeps its causal end, as
// without a row set: the row set 0..T-1 then gives the key ranges, hence the
// GEMM shapes and the bits, of the problem without a row set (a sampler draws
// no padded position, so nothing is lost).
inline int64_t row_key_end(CausalMode causal, int64_t pos, int64_t T) {
  return pos < 0 ? 0 : causal_key_end(causal, pos, T);
}

// The row loops below are compiled once per ISA clone; GCC inlines a helper
// built for the baseline ISA into an x86-64-v4 clone only when forced (the
// arch differs), and a call per element defeats the vectorization.
#define BARRIER_OPS_ALWAYS_INLINE inline __attribute__((always_inline))

// exp for the softmax weights. std::exp is a library call per element and
// dominates the fused loops; this float version (Cephes' expf polynomial,
// about 2 ulp on [-87, 88]) is plain arithmetic, so the loops around it
// vectorize on any x86-64 or ARM target. Arguments here are <= 0 (logit minus
// its row max or lse); below -87 the result is ~1e-38 instead of 0, and
// callers map masked (-inf) entries to an exact 0 themselves. float64 keeps
// std::exp: it is the accuracy path.
BARRIER_OPS_ALWAYS_INLINE float softmax_exp(float x) {
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
BARRIER_OPS_ALWAYS_INLINE double softmax_exp(double x) { return std::exp(x); }

// The three element-wise row loops of the fused kernels. Keys j >= allowed_end
// (after the query, causal) or with key_mask[j] false get weight exactly 0.
// Each loop runs over the allowed prefix only, with the mask (when there is
// one) applied as a select, and zero-fills the tail separately: a loop body
// with a branch in it is not vectorized by GCC even under omp simd, and these
// loops then ran scalar (measured: the backward row loop was 11% of a
// fwd+bwd at T=1024). The mask is read as bytes because GCC has no vector
// type for bool loads. The reductions may be reassociated (omp simd): a max,
// and sums of non-negative weights, where the order changes nothing beyond
// rounding; it lets them vectorize without -ffast-math.
// The forward's score GEMM applies the softmax scale itself (its alpha), so
// this pass only reads the row unless a mask has to write -inf into it.
//
// The max is kept in kMaxLanes independent partial maxima, each updated by a
// compare and select: GCC does not vectorize a max reduction through
// std::max (it returns a reference) even under omp simd, and the scalar
// vmaxss chain this loop compiled to was as slow as the exp pass (perf:
// 5.8% of the forward against row_exp_sum's 5.1% at T = 4096). A NaN never
// wins a compare, so NaNs are skipped as std::max(max, x) skips them.
constexpr int64_t kMaxLanes = 16;

template <typename T>
BARRIER_OPS_ALWAYS_INLINE T lanes_max(const T* lanes) {
  T result = lanes[0];
  for (int64_t l = 1; l < kMaxLanes; ++l) result = result < lanes[l] ? lanes[l] : result;
  return result;
}

template <typename T>
BARRIER_OPS_ALWAYS_INLINE T row_max_impl(T* __restrict row, int64_t nk, int64_t allowed_end,
                                         const bool* key_mask) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const int64_t n = std::max<int64_t>(std::min(nk, allowed_end), 0);
  const int64_t n_full = n / kMaxLanes * kMaxLanes;
  T lanes[kMaxLanes];
  for (int64_t l = 0; l < kMaxLanes; ++l) lanes[l] = neg_inf;
  if (key_mask == nullptr) {
    for (int64_t j0 = 0; j0 < n_full; j0 += kMaxLanes) {
#pragma omp simd
      for (int64_t l = 0; l < kMaxLanes; ++l) {
        const T x = row[j0 + l];
        lanes[l] = lanes[l] < x ? x : lanes[l];
      }
    }
    for (int64_t j = n_full; j < n; ++j) {
      lanes[0] = lanes[0] < row[j] ? row[j] : lanes[0];
    }
  } else {
    const uint8_t* __restrict keep = reinterpret_cast<const uint8_t*>(key_mask);
    for (int64_t j0 = 0; j0 < n_full; j0 += kMaxLanes) {
#pragma omp simd
      for (int64_t l = 0; l < kMaxLanes; ++l) {
        const T x = keep[j0 + l] != 0 ? row[j0 + l] : neg_inf;
        row[j0 + l] = x;
        lanes[l] = lanes[l] < x ? x : lanes[l];
      }
    }
    for (int64_t j = n_full; j < n; ++j) {
      row[j] = keep[j] != 0 ? row[j] : neg_inf;
      lanes[0] = lanes[0] < row[j] ? row[j] : lanes[0];
    }
  }
  for (int64_t j = n; j < nk; ++j) row[j] = neg_inf;
  return lanes_max(lanes);
}

// The online softmax's rescale of one accumulator row (2d + 1 wide): as many
// multiplies per key block as the score row has exps, so it is vectorized
// like them.
template <typename T>
BARRIER_OPS_ALWAYS_INLINE void row_rescale_impl(T* __restrict row, int64_t n, T factor) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) row[c] *= factor;
}

template <typename T>
BARRIER_OPS_ALWAYS_INLINE T row_exp_sum_impl(T* __restrict row, int64_t nk, T shift) {
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
BARRIER_OPS_ALWAYS_INLINE void row_backward_impl(T* __restrict scores, T* __restrict cross,
                                                 const T* __restrict g, T* __restrict coef,
                                                 int64_t nk, int64_t allowed_end,
                                                 const bool* key_mask, T scale, T lse, T beta_c,
                                                 T hbar) {
  const int64_t n = std::min(nk, allowed_end);
  if (key_mask == nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const T pb = beta_c * softmax_exp(scale * scores[j] - lse);
      scores[j] = pb * (g[j] - cross[j] - hbar);
      cross[j] = pb;
      coef[j] += pb;
    }
  } else {
    const uint8_t* __restrict keep = reinterpret_cast<const uint8_t*>(key_mask);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const T alpha = softmax_exp(scale * scores[j] - lse);
      const T pb = keep[j] != 0 ? beta_c * alpha : T(0);
      scores[j] = pb * (g[j] - cross[j] - hbar);
      cross[j] = pb;
      coef[j] += pb;
    }
  }
  for (int64_t j = std::max<int64_t>(n, 0); j < nk; ++j) {
    scores[j] = 0;
    cross[j] = 0;
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

BARRIER_OPS_CPU_CLONES float row_max(float* row, int64_t nk, int64_t allowed_end,
                                     const bool* key_mask) {
  return row_max_impl(row, nk, allowed_end, key_mask);
}
double row_max(double* row, int64_t nk, int64_t allowed_end, const bool* key_mask) {
  return row_max_impl(row, nk, allowed_end, key_mask);
}
BARRIER_OPS_CPU_CLONES void row_rescale(float* row, int64_t n, float factor) {
  row_rescale_impl(row, n, factor);
}
void row_rescale(double* row, int64_t n, double factor) { row_rescale_impl(row, n, factor); }
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

// One query block, rows [r0, r0 + nq), of one (b, h) against all its keys.
// positions_row: this sequence's row set ([R]) or nullptr (row r is position
// r). packed: this head's [k | w | g] rows (T x width). scores: kQueryBlock x
// kForwardKeyBlock scratch; accum: kQueryBlock x width scratch. kappa, lse, stats:
// this head's output rows (R of them).
template <typename scalar_t>
void forward_query_block(const scalar_t* q_block, const scalar_t* packed, int64_t r0, int64_t nq,
                         const int64_t* positions_row, int64_t T, int64_t d, double scale_d,
                         CausalMode causal, const bool* mask_row, int64_t first_real,
                         scalar_t* scores, scalar_t* accum, scalar_t* kappa, scalar_t* lse,
                         scalar_t* stats) {
  const scalar_t scale = static_cast<scalar_t>(scale_d);
  const scalar_t neg_inf = -std::numeric_limits<scalar_t>::infinity();
  const int64_t width = 2 * d + 1;
  std::vector<scalar_t> row_max(nq, neg_inf), row_sum(nq, 0);
  std::fill(accum, accum + nq * width, scalar_t(0));
  // Causal: keys after the block's last (largest) query position are never
  // allowed, so those blocks are skipped rather than computed and masked.
  // Rows need not be sorted: the end is the maximum over the block.
  int64_t row_end[kQueryBlock];
  int64_t key_end = 0;
  for (int64_t i = 0; i < nq; ++i) {
    row_end[i] = row_key_end(causal, row_position(positions_row, r0 + i), T);
    key_end = std::max(key_end, row_end[i]);
  }
  key_end = std::min(T, key_end);
  for (int64_t s0 = 0; s0 < key_end; s0 += kForwardKeyBlock) {
    const int64_t nk = std::min(kForwardKeyBlock, key_end - s0);
    const scalar_t* key_rows = packed + s0 * width;
    cpu::gemm(Trans::kNo, Trans::kYes, nq, nk, d, scale, q_block, d, key_rows, width,
              scalar_t(0), scores, kForwardKeyBlock);
    const bool* key_mask = mask_row ? mask_row + s0 : nullptr;
    for (int64_t i = 0; i < nq; ++i) {
      scalar_t* row = scores + i * kForwardKeyBlock;
      const int64_t allowed_end = std::min(nk, row_end[i] - s0);
      const scalar_t block_max = detail::row_max(row, nk, allowed_end, key_mask);
      if (block_max == neg_inf) {
        // No finite logit among this block's allowed keys. The max reduction
        // skips NaN, so a NaN logit (NaN/inf in q or k) can land here: it
        // poisons the row instead of vanishing with the block.
        if (std::any_of(row, row + nk, [](scalar_t x) { return std::isnan(x); })) {
          row_sum[i] = std::numeric_limits<scalar_t>::quiet_NaN();
        }
        std::fill(row, row + nk, scalar_t(0));
        continue;
      }
      const scalar_t new_max = std::max(row_max[i], block_max);
      const scalar_t correction = softmax_exp(row_max[i] - new_max);
      const scalar_t block_sum = detail::row_exp_sum(row, nk, new_max);
      row_sum[i] = row_sum[i] * correction + block_sum;
      row_max[i] = new_max;
      if (correction != scalar_t(1)) detail::row_rescale(accum + i * width, width, correction);
    }
    cpu::gemm(Trans::kNo, Trans::kNo, nq, width, nk, scalar_t(1), scores, kForwardKeyBlock,
              key_rows, width, scalar_t(1), accum, width);
  }
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t t = r0 + i;  // the output row
    const int64_t pos = row_position(positions_row, t);
    // Validity is structural (a real query with a real allowed key), never
    // read from the row sum: a NaN/inf input makes the sum NaN (or 0), and a
    // test on it would report that row as invalid, i.e. a margin of exactly 1.
    const bool valid =
        is_query_position(pos, mask_row) && first_real < causal_key_end(causal, pos, T);
    if (!valid) continue;  // outputs keep their "invalid" fill: kappa 0, lse -inf, stats 0
    if (!(row_sum[i] > 0)) {  // a valid row whose softmax is undefined: NaN, never a value
      const scalar_t nan = std::numeric_limits<scalar_t>::quiet_NaN();
      kappa[t] = nan;
      lse[t] = nan;
      std::fill(stats + t * 2 * d, stats + (t + 1) * 2 * d, nan);
      continue;
    }
    const scalar_t inv = scalar_t(1) / row_sum[i];
    const scalar_t* acc_row = accum + i * width;
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

namespace {

// What both CPU cores start from: the shapes, q in the accumulation dtype
// (rows that are no query zeroed) and the keys packed per head as [k | w | g].
struct CpuOperands {
  explicit CpuOperands(const KappaProblem& problem)
      : checked((check_positions_in_range(problem), true)),
        B(problem.B()), H(problem.H()), T(problem.T()), R(problem.R()), d(problem.d()),
        width(2 * d + 1),
        scale(problem.scale), causal(problem.causal),
        acc(accumulation_dtype(problem.q.scalar_type())),
        opts(problem.q.options().dtype(acc)),
        q(queries_in(problem, acc)),
        packed(pack_keys(problem.k, problem.w, real_rows(problem))) {}
  const bool checked;  // the row set's values, before q is gathered from them
  const int64_t B, H, T, R, d, width;  // T keys, R query rows
  const double scale;
  const CausalMode causal;
  const at::ScalarType acc;
  const at::TensorOptions opts;
  const at::Tensor q, packed;
};

}  // namespace

KappaState kappa_forward_cpu(const KappaProblem& problem) {
  const CpuOperands ops(problem);
  const int64_t B = ops.B, H = ops.H, T = ops.T, R = ops.R, d = ops.d, width = ops.width;
  const double scale = ops.scale;
  const CausalMode causal = ops.causal;
  const auto acc = ops.acc;
  const auto opts = ops.opts;
  const at::Tensor& q_a = ops.q;
  const at::Tensor& packed = ops.packed;
  at::Tensor kappa = at::zeros({B, H, R}, opts);
  at::Tensor lse = at::full({B, H, R}, -std::numeric_limits<double>::infinity(), opts);
  at::Tensor stats = at::zeros({B, H, R, 2 * d}, opts);
  const int64_t n_qblocks = (R + kQueryBlock - 1) / kQueryBlock;
  if (B * H * n_qblocks == 0) return {kappa, lse, stats};
  AT_DISPATCH_FLOATING_TYPES(acc, "kappa_forward_cpu", [&] {
    const bool* mask_ptr = problem.mask_ptr();
    const int64_t* positions_ptr = problem.positions_ptr();
    const scalar_t* q_ptr = q_a.const_data_ptr<scalar_t>();
    const scalar_t* packed_ptr = packed.const_data_ptr<scalar_t>();
    scalar_t* kappa_ptr = kappa.data_ptr<scalar_t>();
    scalar_t* lse_ptr = lse.data_ptr<scalar_t>();
    scalar_t* stats_ptr = stats.data_ptr<scalar_t>();
    // Per sequence, the first real key (T if none): query t has an allowed
    // real key iff first_real < causal_key_end(t).
    std::vector<int64_t> first_real(B, 0);
    if (mask_ptr != nullptr) {
      for (int64_t b = 0; b < B; ++b) {
        const bool* row = mask_ptr + b * T;
        first_real[b] = std::find(row, row + T, true) - row;
      }
    }
    at::parallel_for(0, B * H * n_qblocks, 1, [&](int64_t begin, int64_t end) {
      const cpu::BlasOnCallingThread single_threaded_blas;
      std::vector<scalar_t> scores(kQueryBlock * kForwardKeyBlock), accum(kQueryBlock * width);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bh = task / n_qblocks, b = bh / H;
        const int64_t r0 = (task % n_qblocks) * kQueryBlock;
        const int64_t nq = std::min(kQueryBlock, R - r0);
        const bool* mask_row = mask_ptr ? mask_ptr + b * T : nullptr;
        const int64_t* positions_row = positions_ptr ? positions_ptr + b * R : nullptr;
        if (mask_row != nullptr || positions_row != nullptr) {
          bool any_query = false;
          for (int64_t i = 0; i < nq && !any_query; ++i) {
            any_query = is_query_position(row_position(positions_row, r0 + i), mask_row);
          }
          // every row of the block is padding or an empty slot: no margins to compute
          if (!any_query) continue;
        }
        forward_query_block<scalar_t>(q_ptr + (bh * R + r0) * d, packed_ptr + bh * T * width, r0,
                                      nq, positions_row, T, d, scale, causal, mask_row,
                                      first_real[b], scores.data(), accum.data(),
                                      kappa_ptr + bh * R, lse_ptr + bh * R,
                                      stats_ptr + bh * R * 2 * d);
      }
    });
  });
  return {kappa, lse, stats};
}

namespace {

// One (b, h)'s operands and outputs, all contiguous rows of this head: R
// query rows, T keys (R = T without a row set).
template <typename scalar_t>
struct HeadBackward {
  const scalar_t* q;              // R x d
  const scalar_t* packed;         // T x (2d + 1): [k | w | g]
  const scalar_t* g;              // T
  const scalar_t* stats;          // R x 2d: [kbar | wbar]
  const scalar_t* swapped;        // R x 2d: [wbar | kbar]
  const scalar_t* beta;           // R: dL/dkappa
  const scalar_t* kappa;          // R
  const scalar_t* lse;            // R
  const bool* mask_row;           // T, or nullptr
  const int64_t* positions_row;   // R, or nullptr (row r is position r)
  scalar_t* dq;                   // R x d, zero on entry
  scalar_t* dk;                   // T x d
  scalar_t* dw;                   // T x d
};

// Per-thread scratch of the backward: one block's scores/cross, and the
// key-side sums of the head being processed.
template <typename scalar_t>
struct BackwardScratch {
  BackwardScratch(int64_t T, int64_t d)
      : scores(kQueryBlock * kKeyBlock), cross(kQueryBlock * kKeyBlock), kq(T * d),
        bars(T * 2 * d), coef(T), hbar(kQueryBlock), row_end(kQueryBlock), active(kQueryBlock) {}
  std::vector<scalar_t> scores, cross;
  std::vector<scalar_t> kq;    // c sum_t dz_ts q_t
  std::vector<scalar_t> bars;  // sum_t Pb_ts [kbar_t | wbar_t]
  std::vector<scalar_t> coef;  // sum_t Pb_ts
  std::vector<scalar_t> hbar;  // per query of the block: kappa_t / c - <kbar_t, wbar_t>
  std::vector<int64_t> row_end;  // per query of the block: its causal key end (row_key_end)
  std::vector<char> active;    // per query of the block: has a margin and a nonzero beta
};

// Backward of one (b, h): query blocks outer, key blocks inner, from the
// spec's formulas with alpha recomputed from the saved lse. The key-side sums
// stay in this thread's scratch until the head is done, then become dk, dw:
//   dk_s = c sum_t dz q_t + coef_s w_s - sum_t Pb wbar_t
//   dw_s = coef_s k_s - sum_t Pb kbar_t
template <typename scalar_t>
void backward_head(const HeadBackward<scalar_t>& head, BackwardScratch<scalar_t>& scratch,
                   int64_t T, int64_t R, int64_t d, double scale_d, CausalMode causal) {
  const scalar_t scale = static_cast<scalar_t>(scale_d);
  const int64_t width = 2 * d + 1;
  scalar_t* scores = scratch.scores.data();
  scalar_t* cross = scratch.cross.data();
  scalar_t* kq = scratch.kq.data();
  scalar_t* bars = scratch.bars.data();
  scalar_t* coef = scratch.coef.data();
  std::fill(scratch.kq.begin(), scratch.kq.end(), scalar_t(0));
  std::fill(scratch.bars.begin(), scratch.bars.end(), scalar_t(0));
  std::fill(scratch.coef.begin(), scratch.coef.end(), scalar_t(0));
  const bool has_row_set = head.positions_row != nullptr;
  for (int64_t t0 = 0; t0 < R; t0 += kQueryBlock) {
    const int64_t nq = std::min(kQueryBlock, R - t0);
    bool any_active = false;
    int64_t key_end = 0;
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t t = t0 + i;
      const int64_t pos = row_position(head.positions_row, t);
      // Invalid rows have lse = -inf. A NaN lse (a valid row with NaN/inf
      // inputs) stays active, so its gradients are NaN as well, not 0. A row
      // that is no query is inactive whatever state it was given.
      const bool active = head.lse[t] != -std::numeric_limits<scalar_t>::infinity() &&
                          head.beta[t] != scalar_t(0) &&
                          (!has_row_set || is_query_position(pos, head.mask_row));
      scratch.active[i] = active;
      any_active = any_active || active;
      // Every row but an empty slot counts, active or not, as in the forward
      // (so the row set 0..T-1 keeps the key ranges of no row set); rows in
      // any order.
      scratch.row_end[i] = row_key_end(causal, pos, T);
      key_end = std::max(key_end, scratch.row_end[i]);
      scalar_t kw = 0;
      const scalar_t* stat_row = head.stats + t * 2 * d;
      for (int64_t c = 0; c < d; ++c) kw += stat_row[c] * stat_row[d + c];
      scratch.hbar[i] = head.kappa[t] / scale - kw;
    }
    if (!any_active) continue;
    const scalar_t* q_block = head.q + t0 * d;
    const scalar_t* stats_block = head.stats + t0 * 2 * d;
    key_end = std::min(T, key_end);
    for (int64_t s0 = 0; s0 < key_end; s0 += kKeyBlock) {
      const int64_t nk = std::min(kKeyBlock, key_end - s0);
      const scalar_t* key_rows = head.packed + s0 * width;  // k_s at column 0, w_s at d
      cpu::gemm(Trans::kNo, Trans::kYes, nq, nk, d, scalar_t(1), q_block, d, key_rows, width,
                scalar_t(0), scores, kKeyBlock);
      // cross_ts = <wbar_t, k_s> + <kbar_t, w_s> = [wbar|kbar]_t . [k|w]_s in
      // one GEMM of width 2d, so h_ts = g_s - cross_ts.
      cpu::gemm(Trans::kNo, Trans::kYes, nq, nk, 2 * d, scalar_t(1), head.swapped + t0 * 2 * d,
                2 * d, key_rows, width, scalar_t(0), cross, kKeyBlock);
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t t = t0 + i;  // the row; scratch.row_end holds its position's key end
        scalar_t* srow = scores + i * kKeyBlock;
        scalar_t* crow = cross + i * kKeyBlock;
        if (!scratch.active[i]) {
          std::fill(srow, srow + nk, scalar_t(0));
          std::fill(crow, crow + nk, scalar_t(0));
          continue;
        }
        const int64_t allowed_end = std::min(nk, scratch.row_end[i] - s0);
        detail::row_backward(srow, crow, head.g + s0, coef + s0, nk, allowed_end,
                             head.mask_row ? head.mask_row + s0 : nullptr, scale, head.lse[t],
                             head.beta[t] * scale, scratch.hbar[i]);
      }
      // dq_t += c sum_s dz_ts k_s ; kq_s += c sum_t dz_ts q_t ; bars_s += sum_t Pb_ts stats_t
      cpu::gemm(Trans::kNo, Trans::kNo, nq, d, nk, scale, scores, kKeyBlock, key_rows, width,
                scalar_t(1), head.dq + t0 * d, d);
      cpu::gemm(Trans::kYes, Trans::kNo, nk, d, nq, scale, scores, kKeyBlock, q_block, d,
                scalar_t(1), kq + s0 * d, d);
      cpu::gemm(Trans::kYes, Trans::kNo, nk, 2 * d, nq, scalar_t(1), cross, kKeyBlock,
                stats_block, 2 * d, scalar_t(1), bars + s0 * 2 * d, 2 * d);
    }
  }
  for (int64_t s = 0; s < T; ++s) {
    const scalar_t* k_row = head.packed + s * width;
    const scalar_t* w_row = k_row + d;
    const scalar_t* kbar_sum = bars + s * 2 * d;
    const scalar_t* wbar_sum = kbar_sum + d;
    const scalar_t* kq_row = kq + s * d;
    scalar_t* dk_row = head.dk + s * d;
    scalar_t* dw_row = head.dw + s * d;
    const scalar_t coef_s = coef[s];
    for (int64_t c = 0; c < d; ++c) {
      dk_row[c] = kq_row[c] + coef_s * w_row[c] - wbar_sum[c];
      dw_row[c] = coef_s * k_row[c] - kbar_sum[c];
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> kappa_backward_cpu(const KappaProblem& problem,
                                                                  const at::Tensor& grad_kappa,
                                                                  const KappaState& state) {
  const CpuOperands ops(problem);
  const int64_t B = ops.B, H = ops.H, T = ops.T, R = ops.R, d = ops.d, width = ops.width;
  const double scale = ops.scale;
  const CausalMode causal = ops.causal;
  const auto acc = ops.acc;
  const auto opts = ops.opts;
  const at::Tensor& q_a = ops.q;
  const at::Tensor& packed = ops.packed;
  const at::Tensor g = packed.select(-1, 2 * d).contiguous();  // [B, H, T]: g_s read per key
  const at::Tensor beta = grad_kappa.to(acc).contiguous();
  const at::Tensor kappa_c = state.kappa.contiguous(), lse_c = state.lse.contiguous();
  const at::Tensor stats_c = state.stats.contiguous();
  // [wbar | kbar]: the saved [kbar | wbar] with halves swapped, to pair with
  // the packed [k | w] in the cross GEMM.
  const at::Tensor swapped_stats =
      at::cat({stats_c.narrow(-1, d, d), stats_c.narrow(-1, 0, d)}, -1);
  at::Tensor dq = at::zeros({B, H, R, d}, opts);  // query blocks with no active row stay 0
  at::Tensor dk = at::empty({B, H, T, d}, opts);  // every row written by its head
  at::Tensor dw = at::empty({B, H, T, d}, opts);
  if (B * H * T > 0) {
    AT_DISPATCH_FLOATING_TYPES(acc, "kappa_backward_cpu", [&] {
      const bool* mask_ptr = problem.mask_ptr();
      const int64_t* positions_ptr = problem.positions_ptr();
      const scalar_t* q_ptr = q_a.const_data_ptr<scalar_t>();
      const scalar_t* packed_ptr = packed.const_data_ptr<scalar_t>();
      const scalar_t* g_ptr = g.const_data_ptr<scalar_t>();
      const scalar_t* stats_ptr = stats_c.const_data_ptr<scalar_t>();
      const scalar_t* swapped_ptr = swapped_stats.const_data_ptr<scalar_t>();
      const scalar_t* beta_ptr = beta.const_data_ptr<scalar_t>();
      const scalar_t* kappa_ptr = kappa_c.const_data_ptr<scalar_t>();
      const scalar_t* lse_ptr = lse_c.const_data_ptr<scalar_t>();
      scalar_t* dq_ptr = dq.data_ptr<scalar_t>();
      scalar_t* dk_ptr = dk.data_ptr<scalar_t>();
      scalar_t* dw_ptr = dw.data_ptr<scalar_t>();
      at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
        const cpu::BlasOnCallingThread single_threaded_blas;
        BackwardScratch<scalar_t> scratch(T, d);
        for (int64_t bh = begin; bh < end; ++bh) {
          const int64_t rows = bh * R, keys = bh * T, b = bh / H;
          const HeadBackward<scalar_t> head{q_ptr + rows * d,
                                            packed_ptr + keys * width,
                                            g_ptr + keys,
                                            stats_ptr + rows * 2 * d,
                                            swapped_ptr + rows * 2 * d,
                                            beta_ptr + rows,
                                            kappa_ptr + rows,
                                            lse_ptr + rows,
                                            mask_ptr ? mask_ptr + b * T : nullptr,
                                            positions_ptr ? positions_ptr + b * R : nullptr,
                                            dq_ptr + rows * d,
                                            dk_ptr + keys * d,
                                            dw_ptr + keys * d};
          backward_head<scalar_t>(head, scratch, T, R, d, scale, causal);
        }
      });
    });
  }
  return {dq, dk, dw};
}

}  // namespace barrier_ops
