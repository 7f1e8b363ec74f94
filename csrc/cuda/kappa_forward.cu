// Fused CUDA forward core of barrier_ops::kappa (KappaForwardFn):
// flash-attention style, one CTA per (b, h, block of queries), key blocks
// streamed through shared memory, no T x T buffer.
//
// Two passes over the keys: the first finds each row's log-sum-exp (online
// max / sum), the second forms the normalised softmax weights alpha exactly
// and accumulates sum(alpha g), sum(alpha k) and sum(alpha w) on tensor cores.
// The extra Q K^T costs a third more FLOPs than an online-rescaled single
// pass, but keeps the big accumulators in WMMA fragments (whose layout is
// opaque, so they cannot be rescaled per row), and the normalised weights
// (in [0, 1]) round to bf16/fp16 safely for the tensor-core product.
//
// kappa is formed from centred quantities (kernel_common.cuh, "Centring"):
// gc_s = <k_s - mu_k, w_s - mu_w> and kbar - mu_k, wbar - mu_w in the fp32
// epilogue, so keys / values with a large mean do not cancel.
#include "cuda_cores.h"
#include "kernel_common.cuh"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>

namespace barrier_ops {
namespace cuda {

namespace {

template <typename in_t, int D>
struct ForwardConfig {
  using acc_t = typename Traits<in_t>::acc_t;
  static constexpr int kWarps = Traits<in_t>::kFwdWarps;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int BQ = 16 * kWarps;           // queries per CTA, 16 per warp
  static constexpr int BK = Traits<in_t>::kFwdKeys;  // keys per streamed block
  static constexpr int LDD = D + Traits<in_t>::kPad;
  static constexpr int LDS = BK + Traits<in_t>::kAccPad;
  static constexpr int LDP = BK + Traits<in_t>::kPad;
  static_assert(D % 16 == 0 && BK % 16 == 0, "tiles are made of 16x16 blocks");
  static_assert(16 * LDS >= 256, "a warp's score rows double as its 16x16 staging area");

  struct Layout {
    size_t q, k, w, s, p, g, key_ok, bytes;
  };
  __host__ __device__ static constexpr Layout layout() {
    SmemCarver c;
    Layout l{};
    l.q = c.take<in_t>(BQ * LDD);
    l.k = c.take<in_t>(BK * LDD);
    l.w = c.take<in_t>(BK * LDD);
    l.s = c.take<acc_t>(BQ * LDS);
    l.p = c.take<in_t>(BQ * LDP);
    l.g = c.take<acc_t>(BK);
    l.key_ok = c.take<int>(BK);
    l.bytes = align_up(c.offset, 128);
    return l;
  }
};

template <typename in_t>
struct ForwardParams {
  using acc_t = typename Traits<in_t>::acc_t;
  const in_t* q;             // [B, H, R, d]  (R = T without a row set)
  const in_t* k;             // [B, H, T, d]  (one slice per query head)
  const in_t* w;             // [B, H, T, d]
  const acc_t* g;            // [B, H, T]  gc_s = <k_s - mu_k, w_s - mu_w>
  const acc_t* mu;           // [B, H, 2d] [mu_k | mu_w]
  const bool* mask;          // [B, T] or nullptr
  const int64_t* positions;  // [B, R] or nullptr (row r is position r)
  acc_t* kappa;              // [B, H, R]
  acc_t* lse;                // [B, H, R]
  acc_t* stats;              // [B, H, R, 2d]
  int64_t T, n_rows;         // keys, query rows (R)
  int H, d, n_qblocks;
  acc_t scale;
  int causal;  // CausalMode: 0 none, 1 inclusive, 2 strict
};

template <typename in_t, int D>
__global__ void __launch_bounds__(ForwardConfig<in_t, D>::kThreads)
    kappa_forward_kernel(const ForwardParams<in_t> p) {
  using Cfg = ForwardConfig<in_t, D>;
  using acc_t = typename Cfg::acc_t;
  using Mma = WarpMma<in_t>;
  constexpr int BQ = Cfg::BQ, BK = Cfg::BK, LDD = Cfg::LDD, LDS = Cfg::LDS, LDP = Cfg::LDP;
  constexpr int kThreads = Cfg::kThreads;
  constexpr auto L = Cfg::layout();
  extern __shared__ __align__(128) unsigned char smem[];
  in_t* Qs = reinterpret_cast<in_t*>(smem + L.q);
  in_t* Ks = reinterpret_cast<in_t*>(smem + L.k);
  in_t* Ws = reinterpret_cast<in_t*>(smem + L.w);
  acc_t* Ss = reinterpret_cast<acc_t*>(smem + L.s);
  in_t* Ps = reinterpret_cast<in_t*>(smem + L.p);
  acc_t* gs = reinterpret_cast<acc_t*>(smem + L.g);
  int* key_ok = reinterpret_cast<int*>(smem + L.key_ok);

  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const int64_t T = p.T, n_rows = p.n_rows;
  const int d = p.d;
  // Heavy (late, causal) query blocks first: they take the most key blocks.
  const int qb = p.n_qblocks - 1 - static_cast<int>(blockIdx.x % p.n_qblocks);
  const int64_t bh = blockIdx.x / p.n_qblocks;
  const int64_t b = bh / p.H;
  const int64_t t0 = static_cast<int64_t>(qb) * BQ;  // the block's first row
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  const in_t* q_bh = p.q + bh * n_rows * d;
  const in_t* k_bh = p.k + bh * T * d;
  const in_t* w_bh = p.w + bh * T * d;
  const acc_t* g_bh = p.g + bh * T;
  const bool* mask_row = p.mask ? p.mask + b * T : nullptr;
  const int64_t* positions_b = p.positions ? p.positions + b * n_rows : nullptr;

  // Softmax-stage ownership: lane pair (2r, 2r+1) of a warp owns row r of the
  // warp's 16 rows, each lane half of the key columns.
  const int row = 16 * warp + (lane >> 1);
  const int half = lane & 1;
  const int64_t t = t0 + row;  // the output row; its query sits at position pos
  const int64_t pos = t < n_rows ? query_position(positions_b, t) : -1;
  // A row whose position is outside [0, T) (past the rows, an empty slot or a
  // bad value) sees no key; without a row set this is t < T.
  const bool row_in_range = t < n_rows && pos >= 0 && pos < T;
  const bool query_real = row_in_range && (mask_row == nullptr || mask_row[pos]);

  // With a row set, the block's keys end at its largest position (rows in
  // any order); the CTA-wide maximum is gathered during the tile load.
  __shared__ unsigned long long rows_key_end;
  if (positions_b != nullptr) {
    if (threadIdx.x == 0) rows_key_end = 0;
    __syncthreads();
    if (half == 0 && row_in_range) {
      atomicMax(&rows_key_end, static_cast<unsigned long long>(causal_end(p.causal, pos, T)));
    }
  }
  // Padded query rows and empty slots load as zeros: their (unused) logits
  // stay finite.
  load_query_tile<D, kThreads>(Qs, LDD, q_bh, t0, BQ, n_rows, T, d, positions_b, mask_row);
  // A CTA whose queries are all padding skips both passes; its rows are then
  // written as invalid below (kappa 0, lse -inf, stats 0).
  const bool any_real = __syncthreads_or(query_real);
  // Without a row set the block's last query t0 + BQ - 1 sees keys
  // s <= t0 + BQ - 1 - diag.
  const int64_t key_end =
      !any_real                ? 0
      : positions_b != nullptr ? static_cast<int64_t>(rows_key_end)
                               : (p.causal != 0 ? min(T, t0 + BQ - causal_diag(p.causal)) : T);
  const int n_kblocks = static_cast<int>((key_end + BK - 1) / BK);

  const in_t* Q_warp = Qs + 16 * warp * LDD;
  acc_t* S_warp = Ss + 16 * warp * LDS;
  in_t* P_warp = Ps + 16 * warp * LDP;

  // S_warp = scale-free logits of the warp's 16 queries against the BK keys in Ks.
  auto warp_scores = [&]() {
#pragma unroll 1
    for (int n = 0; n < BK / 16; ++n) {
      typename Mma::Acc acc;
      Mma::zero(acc);
#pragma unroll 2
      for (int kk = 0; kk < D / 16; ++kk) {
        Mma::rc(acc, Q_warp + kk * 16, LDD, Ks + n * 16 * LDD + kk * 16, LDD);
      }
      Mma::store(S_warp + n * 16, LDS, acc);
    }
  };
  auto allowed = [&](int j, int64_t s) {
    return row_in_range && key_ok[j] != 0 && causally_allowed(p.causal, s, pos);
  };

  // ---- pass 1: row max and sum of exp (online), hence lse ----
  acc_t row_max = neg_inf, row_sum = 0;
  // Whether the row has an allowed real key at all: validity is structural,
  // never read from row_sum (NaN/inf inputs make it NaN or 0, and a test on it
  // would report the row as invalid, i.e. a margin of exactly 1).
  int any_allowed = 0;
  for (int kb = 0; kb < n_kblocks; ++kb) {
    const int64_t s0 = static_cast<int64_t>(kb) * BK;
    __syncthreads();  // the previous block's Ks / key_ok are no longer read
    load_tile<D, kThreads>(Ks, LDD, k_bh, s0, BK, T, d, mask_row);
    for (int j = threadIdx.x; j < BK; j += kThreads) {
      const int64_t s = s0 + j;
      key_ok[j] = s < T && (mask_row == nullptr || mask_row[s]);
    }
    __syncthreads();
    warp_scores();
    __syncwarp();
    acc_t local_max = neg_inf;
    for (int j = half * (BK / 2); j < (half + 1) * (BK / 2); ++j) {
      if (allowed(j, s0 + j)) {
        any_allowed = 1;
        local_max = max(local_max, p.scale * S_warp[(lane >> 1) * LDS + j]);
      }
    }
    const acc_t block_max = max(local_max, shfl_xor(local_max, 1));
    const acc_t new_max = max(row_max, block_max);
    acc_t local_sum = 0;
    if (new_max != neg_inf) {
      for (int j = half * (BK / 2); j < (half + 1) * (BK / 2); ++j) {
        if (allowed(j, s0 + j)) {
          local_sum += acc_exp(p.scale * S_warp[(lane >> 1) * LDS + j] - new_max);
        }
      }
    }
    local_sum += shfl_xor(local_sum, 1);
    if (new_max != neg_inf) {
      // exp(-inf) = 0 drops the empty history of a row's first allowed block.
      row_sum = row_sum * acc_exp(row_max - new_max) + local_sum;
      row_max = new_max;
    }
  }
  any_allowed |= shfl_xor(any_allowed, 1);
  const bool valid = query_real && any_allowed != 0;
  // A valid row whose softmax is undefined (row_sum NaN, or 0 when every
  // logit is NaN / -inf) gets lse NaN: pass 2 then makes kappa and stats NaN,
  // and the backward (which skips only lse == -inf) NaN gradients.
  const acc_t row_lse = !valid                 ? neg_inf
                        : row_sum > acc_t(0) ? row_max + acc_log(row_sum)
                                             : std::numeric_limits<acc_t>::quiet_NaN();

  // ---- pass 2: alpha = exp(z - lse); accumulate alpha [k | w] and alpha g ----
  typename Mma::Acc acc_k[D / 16], acc_w[D / 16];
#pragma unroll
  for (int j = 0; j < D / 16; ++j) {
    Mma::zero(acc_k[j]);
    Mma::zero(acc_w[j]);
  }
  // The weights actually multiplied (alpha rounded to the input dtype) are
  // summed too and divide the results: kappa is then exactly the covariance
  // under one (slightly perturbed) distribution, with no mismatch between the
  // g term and the kbar.wbar term.
  acc_t weight_sum = 0, g_sum = 0;
  for (int kb = 0; kb < n_kblocks; ++kb) {
    const int64_t s0 = static_cast<int64_t>(kb) * BK;
    __syncthreads();
    load_tile<D, kThreads>(Ks, LDD, k_bh, s0, BK, T, d, mask_row);
    load_tile<D, kThreads>(Ws, LDD, w_bh, s0, BK, T, d, mask_row);
    for (int j = threadIdx.x; j < BK; j += kThreads) {
      const int64_t s = s0 + j;
      const bool ok = s < T && (mask_row == nullptr || mask_row[s]);
      key_ok[j] = ok;
      gs[j] = ok ? g_bh[s] : acc_t(0);
    }
    __syncthreads();
    warp_scores();
    __syncwarp();
    for (int j = half * (BK / 2); j < (half + 1) * (BK / 2); ++j) {
      acc_t alpha = 0;
      if (valid && allowed(j, s0 + j)) {
        alpha = acc_exp(p.scale * S_warp[(lane >> 1) * LDS + j] - row_lse);
      }
      const in_t rounded = Cast<in_t>::from(alpha);
      const acc_t used = to_acc(rounded);
      weight_sum += used;
      g_sum += used * gs[j];
      P_warp[(lane >> 1) * LDP + j] = rounded;
    }
    __syncwarp();
#pragma unroll 1
    for (int kk = 0; kk < BK / 16; ++kk) {
#pragma unroll
      for (int j = 0; j < D / 16; ++j) {
        Mma::rr(acc_k[j], P_warp + kk * 16, LDP, Ks + kk * 16 * LDD + j * 16, LDD);
        Mma::rr(acc_w[j], P_warp + kk * 16, LDP, Ws + kk * 16 * LDD + j * 16, LDD);
      }
    }
  }
  weight_sum += shfl_xor(weight_sum, 1);
  g_sum += shfl_xor(g_sum, 1);
  // NaN weights (NaN lse) keep kappa NaN instead of dividing to 0.
  const acc_t inv = valid ? acc_t(1) / weight_sum : acc_t(0);

  // ---- epilogue: stats = [kbar | wbar], kappa, lse ----
  // The warp's own score rows are free now and serve as its staging area.
  // kappa = c (sum alpha gc - <kbar - mu_k, wbar - mu_w>): both terms are
  // O(var), not O(mean^2).
  acc_t kw = 0;
  acc_t* stats_row = p.stats + (bh * n_rows + t) * 2 * d;
  const acc_t* mu_bh = p.mu + bh * 2 * d;
#pragma unroll
  for (int j = 0; j < D / 16; ++j) {
    acc_t kbar[8], wbar[8];
    unstage<in_t>(acc_k[j], S_warp, kbar);
    unstage<in_t>(acc_w[j], S_warp, wbar);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int col = j * 16 + half * 8 + i;
      const acc_t kb_v = valid ? kbar[i] * inv : acc_t(0);
      const acc_t wb_v = valid ? wbar[i] * inv : acc_t(0);
      if (col < d) {
        if (valid) kw += (kb_v - mu_bh[col]) * (wb_v - mu_bh[d + col]);
        if (t < n_rows) {
          stats_row[col] = kb_v;
          stats_row[d + col] = wb_v;
        }
      }
    }
  }
  kw += shfl_xor(kw, 1);
  if (half == 0 && t < n_rows) {
    p.kappa[bh * n_rows + t] = valid ? p.scale * (g_sum * inv - kw) : acc_t(0);
    p.lse[bh * n_rows + t] = row_lse;
  }
}

// One warp per row (contract: prepare_rows in kernel_common.cuh). Rows are
// key rows ([B, H, T]: gc from k, w) or query rows ([B, H, R]: hbar and
// beta * c from the saved state), or both when they coincide (no row set);
// gc == nullptr skips the first part, stats == nullptr the second.
// rows_per_head: T or R, to find the row's (b, h).
template <typename in_t>
__global__ void row_prep_kernel(const in_t* __restrict__ k, const in_t* __restrict__ w,
                                const typename Traits<in_t>::acc_t* __restrict__ mu,
                                const typename Traits<in_t>::acc_t* __restrict__ stats,
                                const typename Traits<in_t>::acc_t* __restrict__ kappa,
                                const typename Traits<in_t>::acc_t* __restrict__ lse,
                                const typename Traits<in_t>::acc_t* __restrict__ beta,
                                const int64_t* __restrict__ positions,
                                const bool* __restrict__ mask,
                                typename Traits<in_t>::acc_t* __restrict__ gc,
                                typename Traits<in_t>::acc_t* __restrict__ hbar,
                                typename Traits<in_t>::acc_t* __restrict__ beta_c, int64_t rows,
                                int64_t rows_per_head, int64_t T, int H, int d,
                                typename Traits<in_t>::acc_t scale) {
  using acc_t = typename Traits<in_t>::acc_t;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // uniform per warp
  const int64_t bh = row / rows_per_head;
  const acc_t* mu_k = mu + bh * 2 * d;
  const acc_t* mu_w = mu_k + d;
  acc_t gdot = 0, corr = 0;
  for (int c = lane; c < d; c += 32) {
    if (gc != nullptr) {
      gdot += (to_acc(k[row * d + c]) - mu_k[c]) * (to_acc(w[row * d + c]) - mu_w[c]);
    }
    if (stats != nullptr) {
      const acc_t kb = stats[row * 2 * d + c], wb = stats[row * 2 * d + d + c];
      const acc_t kbc = kb - mu_k[c], wbc = wb - mu_w[c];
      // The same rounding as the kernels' bar tiles (load_bar_tiles).
      const acc_t rk = to_acc(Cast<in_t>::from(kbc)), rw = to_acc(Cast<in_t>::from(wbc));
      corr += kbc * wbc - kb * rw - rk * wb;
    }
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    gdot += shfl_xor(gdot, offset);
    corr += shfl_xor(corr, offset);
  }
  if (lane != 0) return;
  if (gc != nullptr) gc[row] = gdot;
  if (stats != nullptr) {
    hbar[row] = kappa[row] / scale + corr;
    // Invalid rows have lse = -inf. NaN beta and NaN lse (a valid row with
    // NaN/inf inputs) stay "active" so they propagate as on CPU. With a row
    // set, a row that is no query is inactive whatever state it was given: the
    // kernels then never read through its position.
    bool active = lse[row] != -std::numeric_limits<acc_t>::infinity() && beta[row] != acc_t(0);
    if (positions != nullptr) {
      const int64_t b = bh / H, r = row % rows_per_head;
      active = active && row_is_query(positions + b * rows_per_head,
                                      mask != nullptr ? mask + b * T : nullptr, r,
                                      rows_per_head, T);
    }
    beta_c[row] = active ? beta[row] * scale : acc_t(0);
  }
}

template <typename in_t, int D>
void launch_forward(const KappaProblem& pr, const at::Tensor& g, const at::Tensor& mu,
                    KappaState& out) {
  using Cfg = ForwardConfig<in_t, D>;
  using acc_t = typename Cfg::acc_t;
  const int64_t B = pr.B(), H = pr.H(), T = pr.T();  // T keys; pr.R() query rows
  ForwardParams<in_t> p;
  p.q = reinterpret_cast<const in_t*>(pr.q.const_data_ptr());
  p.k = reinterpret_cast<const in_t*>(pr.k.const_data_ptr());
  p.w = reinterpret_cast<const in_t*>(pr.w.const_data_ptr());
  p.g = g.const_data_ptr<acc_t>();
  p.mu = mu.const_data_ptr<acc_t>();
  p.mask = pr.mask_ptr();
  p.positions = pr.positions_ptr();
  p.kappa = out.kappa.data_ptr<acc_t>();
  p.lse = out.lse.data_ptr<acc_t>();
  p.stats = out.stats.data_ptr<acc_t>();
  p.T = T;
  p.n_rows = pr.R();
  p.H = static_cast<int>(H);
  p.d = static_cast<int>(pr.d());
  p.n_qblocks = static_cast<int>((p.n_rows + Cfg::BQ - 1) / Cfg::BQ);
  p.scale = static_cast<acc_t>(pr.scale);
  p.causal = static_cast<int>(pr.causal);
  const int64_t blocks = B * H * p.n_qblocks;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
              "barrier_ops.kappa: too many (batch, head, query block) tiles for one launch: ",
              blocks);
  constexpr size_t smem = Cfg::layout().bytes;
  auto kernel = &kappa_forward_kernel<in_t, D>;
  set_smem_limit(reinterpret_cast<const void*>(kernel), smem, "barrier_ops.kappa forward");
  kernel<<<static_cast<unsigned>(blocks), Cfg::kThreads, smem,
           at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void check_core_inputs(const at::Tensor& q) {
  TORCH_CHECK_VALUE(q.size(3) <= kMaxHeadDim,
                    "the CUDA kernels support head dims d <= ", kMaxHeadDim, ", got d=",
                    q.size(3), " (q dim 3)");
  // Every dtype: the kernels are built for sm_80 / sm_90 (+ PTX for newer
  // GPUs), the 16-bit paths use sm_80 tensor-core instructions and the tiles
  // assume sm_80's shared-memory opt-in. Older GPUs would otherwise fail with
  // "no kernel image is available" or an illegal instruction.
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(prop->major >= 8, "barrier_ops' fused CUDA kernels need a GPU of compute "
              "capability 8.0 or newer (Ampere, Hopper and later), but ", prop->name,
              " has compute capability ", prop->major, ".", prop->minor, " (", q.scalar_type(),
              " inputs); use backend=\"sdpa\" or compute on the CPU");
}

void set_smem_limit(const void* kernel, size_t smem, const char* what) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(smem <= prop->sharedMemPerBlockOptin, what, ": this head dim / dtype needs ", smem,
              " bytes of shared memory per block, but ", prop->name, " allows ",
              prop->sharedMemPerBlockOptin, " (the kernels target sm_80 / sm_90 data-center GPUs)");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
}

at::Tensor key_value_means(const KappaProblem& pr) {
  const auto acc = accumulation_dtype(pr.q.scalar_type());
  const int64_t B = pr.B(), T = pr.T();
  if (!pr.key_padding_mask.defined()) {
    const double inv_t = T > 0 ? 1.0 / static_cast<double>(T) : 0.0;
    return at::cat({at::sum(pr.k, {2}, false, acc), at::sum(pr.w, {2}, false, acc)}, -1)
        .mul_(inv_t);
  }
  // masked_fill, not a multiply: padded rows may hold NaN / inf.
  const at::Tensor pad = pr.key_padding_mask.logical_not().view({B, 1, T, 1});
  const at::Tensor count =
      pr.key_padding_mask.sum({1}, false, acc).clamp_min_(1.0).view({B, 1, 1});
  return at::cat({at::sum(pr.k.masked_fill(pad, 0), {2}, false, acc),
                  at::sum(pr.w.masked_fill(pad, 0), {2}, false, acc)},
                 -1)
      .div_(count);
}

void prepare_rows(const KappaProblem& pr, const at::Tensor& mu, const KappaState* state,
                  const at::Tensor& beta, at::Tensor& gc, at::Tensor& hbar, at::Tensor& beta_c) {
  constexpr int kWarpsPerBlock = 8;
  const bool backward = state != nullptr;
  // Key rows and query rows in one launch when they coincide (no row set),
  // as before row sets existed; else one launch each.
  const bool fused = !pr.has_row_set();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pr.q.scalar_type(), "row_prep", [&] {
    using in_t = typename NativeType<scalar_t>::type;
    using acc_t = typename Traits<in_t>::acc_t;
    auto run = [&](bool keys, bool queries, int64_t rows_per_head) {
      const int64_t rows = pr.B() * pr.H() * rows_per_head;
      if (rows == 0) return;
      const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
      TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "too many rows: ", rows);
      row_prep_kernel<in_t><<<static_cast<unsigned>(blocks), 32 * kWarpsPerBlock, 0,
                              at::cuda::getCurrentCUDAStream()>>>(
          reinterpret_cast<const in_t*>(pr.k.const_data_ptr()),
          reinterpret_cast<const in_t*>(pr.w.const_data_ptr()), mu.const_data_ptr<acc_t>(),
          queries ? state->stats.const_data_ptr<acc_t>() : nullptr,
          queries ? state->kappa.const_data_ptr<acc_t>() : nullptr,
          queries ? state->lse.const_data_ptr<acc_t>() : nullptr,
          queries ? beta.const_data_ptr<acc_t>() : nullptr, pr.positions_ptr(), pr.mask_ptr(),
          keys ? gc.data_ptr<acc_t>() : nullptr, queries ? hbar.data_ptr<acc_t>() : nullptr,
          queries ? beta_c.data_ptr<acc_t>() : nullptr, rows, rows_per_head, pr.T(),
          static_cast<int>(pr.H()), static_cast<int>(pr.d()), static_cast<acc_t>(pr.scale));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (fused || !backward) {
      run(/*keys=*/true, /*queries=*/backward, pr.T());
    } else {
      run(/*keys=*/true, /*queries=*/false, pr.T());
      run(/*keys=*/false, /*queries=*/true, pr.R());
    }
  });
}

}  // namespace cuda

KappaState kappa_forward_cuda(const KappaProblem& problem) {
  // q, k, w arrive contiguous, checked and on one device (csrc/kappa.cpp).
  const c10::cuda::CUDAGuard device_guard(problem.q.device());
  cuda::check_core_inputs(problem.q);
  const int64_t B = problem.B(), H = problem.H(), T = problem.T(), d = problem.d();
  const int64_t R = problem.R();  // query rows (T without a row set)
  const auto opts = problem.q.options().dtype(accumulation_dtype(problem.q.scalar_type()));
  // The kernel writes every element, valid or not: no fill needed.
  KappaState out{at::empty({B, H, R}, opts), at::empty({B, H, R}, opts),
                 at::empty({B, H, R, 2 * d}, opts)};
  if (B * H * R == 0) return out;
  const at::Tensor mu = cuda::key_value_means(problem);
  at::Tensor g = at::empty({B, H, T}, opts);
  at::Tensor unused;
  cuda::prepare_rows(problem, mu, nullptr, at::Tensor(), g, unused, unused);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, problem.q.scalar_type(),
                                  "kappa_forward_cuda", [&] {
    using in_t = typename cuda::NativeType<scalar_t>::type;
    if (d <= 64) {
      cuda::launch_forward<in_t, 64>(problem, g, mu, out);
    } else {
      cuda::launch_forward<in_t, 128>(problem, g, mu, out);
    }
  });
  return out;
}

}  // namespace barrier_ops
