// Fused CUDA forward core of token_margins (KappaForwardFn): flash-attention
// style, one CTA per (b, h, block of queries), key blocks streamed through
// shared memory, no T x T buffer.
//
// Two passes over the keys: the first finds each row's log-sum-exp (online
// max / sum), the second forms the normalised softmax weights alpha exactly
// and accumulates sum(alpha g), sum(alpha k) and sum(alpha w) on tensor cores.
// The extra Q K^T costs a third more FLOPs than an online-rescaled single
// pass, but keeps the big accumulators in WMMA fragments (whose layout is
// opaque, so they cannot be rescaled per row), and the normalised weights
// (in [0, 1]) round to bf16/fp16 safely for the tensor-core product.
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
  const in_t* q;      // [B, H, T, d]
  const in_t* k;      // [B, Hkv, T, d]
  const in_t* w;      // [B, H, T, d]
  const acc_t* g;     // [B, H, T]  <k_s, w_s> per query head
  const bool* mask;   // [B, T] or nullptr
  acc_t* kappa;       // [B, H, T]
  acc_t* lse;         // [B, H, T]
  acc_t* stats;       // [B, H, T, 2d]
  int64_t T;
  int H, group, d, n_qblocks;
  acc_t scale;
  bool causal;
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
  const int64_t T = p.T;
  const int d = p.d;
  // Heavy (late, causal) query blocks first: they take the most key blocks.
  const int qb = p.n_qblocks - 1 - static_cast<int>(blockIdx.x % p.n_qblocks);
  const int64_t bh = blockIdx.x / p.n_qblocks;
  const int64_t b = bh / p.H, h = bh % p.H;
  const int64_t bh_kv = b * (p.H / p.group) + h / p.group;
  const int64_t t0 = static_cast<int64_t>(qb) * BQ;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  const in_t* q_bh = p.q + bh * T * d;
  const in_t* k_bh = p.k + bh_kv * T * d;
  const in_t* w_bh = p.w + bh * T * d;
  const acc_t* g_bh = p.g + bh * T;
  const bool* mask_row = p.mask ? p.mask + b * T : nullptr;

  // Softmax-stage ownership: lane pair (2r, 2r+1) of a warp owns row r of the
  // warp's 16 rows, each lane half of the key columns.
  const int row = 16 * warp + (lane >> 1);
  const int half = lane & 1;
  const int64_t t = t0 + row;
  const bool query_real = t < T && (mask_row == nullptr || mask_row[t]);

  load_tile<D, kThreads>(Qs, LDD, q_bh, t0, BQ, T, d, nullptr);
  // A CTA whose queries are all padding skips both passes; its rows are then
  // written as invalid below (kappa 0, lse -inf, stats 0).
  const bool any_real = __syncthreads_or(query_real);
  const int64_t key_end = !any_real ? 0 : (p.causal ? min(T, t0 + BQ) : T);
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
    return t < T && key_ok[j] != 0 && (!p.causal || s <= t);
  };

  // ---- pass 1: row max and sum of exp (online), hence lse ----
  acc_t row_max = neg_inf, row_sum = 0;
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
      if (allowed(j, s0 + j)) local_max = max(local_max, p.scale * S_warp[(lane >> 1) * LDS + j]);
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
  const bool valid = query_real && row_sum > acc_t(0);
  const acc_t row_lse = valid ? row_max + acc_log(row_sum) : neg_inf;

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
  const acc_t inv = (valid && weight_sum > acc_t(0)) ? acc_t(1) / weight_sum : acc_t(0);

  // ---- epilogue: stats = [kbar | wbar], kappa, lse ----
  // The warp's own score rows are free now and serve as its staging area.
  acc_t kw = 0;
  acc_t* stats_row = p.stats + (bh * T + t) * 2 * d;
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
        kw += kb_v * wb_v;
        if (t < T) {
          stats_row[col] = kb_v;
          stats_row[d + col] = wb_v;
        }
      }
    }
  }
  kw += shfl_xor(kw, 1);
  if (half == 0 && t < T) {
    p.kappa[bh * T + t] = valid ? p.scale * (g_sum * inv - kw) : acc_t(0);
    p.lse[bh * T + t] = row_lse;
  }
}

// One warp per row: g = <k, w>, and for the backward hbar and beta * scale.
template <typename in_t>
__global__ void row_prep_kernel(const in_t* __restrict__ k, const in_t* __restrict__ w,
                                const typename Traits<in_t>::acc_t* __restrict__ stats,
                                const typename Traits<in_t>::acc_t* __restrict__ kappa,
                                const typename Traits<in_t>::acc_t* __restrict__ lse,
                                const typename Traits<in_t>::acc_t* __restrict__ beta,
                                typename Traits<in_t>::acc_t* __restrict__ g,
                                typename Traits<in_t>::acc_t* __restrict__ hbar,
                                typename Traits<in_t>::acc_t* __restrict__ beta_c, int64_t rows,
                                int64_t T, int H, int group, int d,
                                typename Traits<in_t>::acc_t scale) {
  using acc_t = typename Traits<in_t>::acc_t;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // uniform per warp
  const int64_t bh = row / T, t = row % T;
  const int64_t b = bh / H, h = bh % H;
  const int64_t kv_row = (b * (H / group) + h / group) * T + t;
  acc_t kdotw = 0, bars = 0;
  for (int c = lane; c < d; c += 32) {
    kdotw += to_acc(k[kv_row * d + c]) * to_acc(w[row * d + c]);
    if (stats != nullptr) bars += stats[row * 2 * d + c] * stats[row * 2 * d + d + c];
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    kdotw += shfl_xor(kdotw, offset);
    bars += shfl_xor(bars, offset);
  }
  if (lane != 0) return;
  g[row] = kdotw;
  if (stats != nullptr) {
    hbar[row] = kappa[row] / scale - bars;
    // NaN beta stays "active" so it propagates as on CPU.
    const bool active = isfinite(lse[row]) && beta[row] != acc_t(0);
    beta_c[row] = active ? beta[row] * scale : acc_t(0);
  }
}

template <typename in_t, int D>
void launch_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w,
                    const at::Tensor& g, const at::Tensor& mask, double scale, bool causal,
                    at::Tensor& kappa, at::Tensor& lse, at::Tensor& stats) {
  using Cfg = ForwardConfig<in_t, D>;
  using acc_t = typename Cfg::acc_t;
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2);
  ForwardParams<in_t> p;
  p.q = reinterpret_cast<const in_t*>(q.data_ptr());
  p.k = reinterpret_cast<const in_t*>(k.data_ptr());
  p.w = reinterpret_cast<const in_t*>(w.data_ptr());
  p.g = g.data_ptr<acc_t>();
  p.mask = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  p.kappa = kappa.data_ptr<acc_t>();
  p.lse = lse.data_ptr<acc_t>();
  p.stats = stats.data_ptr<acc_t>();
  p.T = T;
  p.H = static_cast<int>(H);
  p.group = static_cast<int>(H / k.size(1));
  p.d = static_cast<int>(q.size(3));
  p.n_qblocks = static_cast<int>((T + Cfg::BQ - 1) / Cfg::BQ);
  p.scale = static_cast<acc_t>(scale);
  p.causal = causal;
  const int64_t blocks = B * H * p.n_qblocks;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
              "token_margins: too many (batch, head, query block) tiles for one launch: ", blocks);
  constexpr size_t smem = Cfg::layout().bytes;
  auto kernel = &kappa_forward_kernel<in_t, D>;
  set_smem_limit(reinterpret_cast<const void*>(kernel), smem, "token_margins forward");
  kernel<<<static_cast<unsigned>(blocks), Cfg::kThreads, smem,
           at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void check_core_inputs(const at::Tensor& q) {
  TORCH_CHECK_VALUE(q.size(3) <= kMaxHeadDim,
                    "the CUDA kernels support head dims d <= ", kMaxHeadDim, ", got d=",
                    q.size(3), " (q dim 3)");
  const auto st = q.scalar_type();
  if (st == at::kHalf || st == at::kBFloat16) {
    const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
    TORCH_CHECK_VALUE(prop->major >= 8, "float16/bfloat16 inputs need a GPU of compute "
                      "capability 8.0 or newer (tensor-core kernels), got ", prop->major, ".",
                      prop->minor, "; cast q, k, v to float32");
  }
}

void set_smem_limit(const void* kernel, size_t smem, const char* what) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(smem <= prop->sharedMemPerBlockOptin, what, ": this head dim / dtype needs ", smem,
              " bytes of shared memory per block, but ", prop->name, " allows ",
              prop->sharedMemPerBlockOptin, " (the kernels target sm_80 / sm_90 data-center GPUs)");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
}

void launch_row_prep(const at::Tensor& k, const at::Tensor& w, const at::Tensor& stats,
                     const at::Tensor& kappa, const at::Tensor& lse, const at::Tensor& beta,
                     double scale, at::Tensor& g, at::Tensor& hbar, at::Tensor& beta_c) {
  const int64_t B = w.size(0), H = w.size(1), T = w.size(2), d = w.size(3);
  const int64_t rows = B * H * T;
  if (rows == 0) return;
  constexpr int kWarpsPerBlock = 8;
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "too many rows: ", rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "row_prep", [&] {
    using in_t = typename NativeType<scalar_t>::type;
    using acc_t = typename Traits<in_t>::acc_t;
    const bool backward = stats.defined();
    row_prep_kernel<in_t><<<static_cast<unsigned>(blocks), 32 * kWarpsPerBlock, 0,
                            at::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const in_t*>(k.data_ptr()), reinterpret_cast<const in_t*>(w.data_ptr()),
        backward ? stats.data_ptr<acc_t>() : nullptr,
        backward ? kappa.data_ptr<acc_t>() : nullptr, backward ? lse.data_ptr<acc_t>() : nullptr,
        backward ? beta.data_ptr<acc_t>() : nullptr, g.data_ptr<acc_t>(),
        backward ? hbar.data_ptr<acc_t>() : nullptr, backward ? beta_c.data_ptr<acc_t>() : nullptr,
        rows, T, static_cast<int>(H), static_cast<int>(H / k.size(1)), static_cast<int>(d),
        static_cast<acc_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda

std::tuple<at::Tensor, at::Tensor, at::Tensor> kappa_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& w, double scale, bool causal,
    const std::optional<at::Tensor>& key_padding_mask) {
  const c10::cuda::CUDAGuard device_guard(q.device());
  cuda::check_core_inputs(q);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), d = q.size(3);
  const auto opts = q.options().dtype(accumulation_dtype(q.scalar_type()));
  // The kernel writes every element, valid or not: no fill needed.
  at::Tensor kappa = at::empty({B, H, T}, opts);
  at::Tensor lse = at::empty({B, H, T}, opts);
  at::Tensor stats = at::empty({B, H, T, 2 * d}, opts);
  if (B * H * T == 0) return {kappa, lse, stats};
  const at::Tensor q_c = q.contiguous(), k_c = k.contiguous(), w_c = w.contiguous();
  const at::Tensor mask =
      key_padding_mask.has_value() ? key_padding_mask->contiguous() : at::Tensor();
  at::Tensor g = at::empty({B, H, T}, opts);
  at::Tensor unused;
  cuda::launch_row_prep(k_c, w_c, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), scale,
                        g, unused, unused);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "kappa_forward_cuda",
                                  [&] {
    using in_t = typename cuda::NativeType<scalar_t>::type;
    if (d <= 64) {
      cuda::launch_forward<in_t, 64>(q_c, k_c, w_c, g, mask, scale, causal, kappa, lse, stats);
    } else {
      cuda::launch_forward<in_t, 128>(q_c, k_c, w_c, g, mask, scale, causal, kappa, lse, stats);
    }
  });
  return {kappa, lse, stats};
}

}  // namespace barrier_ops
