// Fused CUDA backward core of barrier_ops::kappa (KappaBackwardFn). The
// softmax weights are recomputed from the saved row log-sum-exp; no T x T
// buffer.
//
// Deterministic by construction: no atomics. Two kernels, each owning the
// rows it writes:
//   key kernel   (CTA = block of keys of one (b, h), streams query blocks):
//     dk_s = c sum_t dz_ts q_t + coef_s (w_s - mu_w) - sum_t Pb_ts (wbar_t - mu_w)
//     dw_s = coef_s (k_s - mu_k) - sum_t Pb_ts (kbar_t - mu_k),  coef_s = sum_t Pb_ts
//   query kernel (CTA = block of query rows, streams key blocks):
//     dq_t = c^2 beta_t sum_s a_ts (k_s - mu_k),   a_ts = alpha_ts (h_ts - hbar_t)
// With a row set (KappaProblem::query_positions) the query side has R rows,
// each at its own position: causality reads the position, the key kernel
// streams all R rows and skips the blocks none of whose active rows sees its
// keys, and a row that is no query has beta_c = 0 (prepare_rows), so neither
// kernel reads through its position.
// with Pb_ts = beta_t c alpha_ts, dz_ts = Pb_ts (h_ts - hbar_t) and
// h_ts = gc_s - <kbarc_t, w_s> - <wbarc_t, k_s> (shared/spec/barrier-math.md,
// "Gradients", with the centring of kernel_common.cuh: sum_t Pb_ts mu = coef_s mu
// and sum_s a_ts = 0 make the means exact no-ops). Both kernels recompute the
// logits and the cross terms; that duplicate work is the price of determinism
// (flash-attention's atomic dq accumulation avoids it).
//
// bf16/fp16 numerics (what is rounded to the input dtype before a tensor-core
// product, all accumulation fp32):
//   * the bar tiles r(kbar - mu_k), r(wbar - mu_w): centred, so their rounding
//     error is relative to the spread of k / w, not to their mean; hbar is the
//     alpha-mean of h formed from exactly these rounded tiles (prepare_rows),
//     so h - hbar has no rounding mismatch;
//   * query kernel: c a_ts, with c^2 beta_t applied in the fp32 epilogue. With
//     the mean-reduced barrier beta_t c is ~1e-8 and c beta c alpha (h - hbar)
//     would underflow fp16 to zero; a does not depend on beta;
//   * key kernel: 2^e Pb and 2^e c dz with one power of two 2^e per (b, h)
//     that brings max_t |beta_t c| into [0.5, 1), undone (exactly) in the epilogue;
//   * the row sums used by the centring (sum_s r(c a_ts), coef_s) are sums of
//     the rounded values the products used, so the mean corrections are exact.
#include "cuda_cores.h"
#include "kernel_common.cuh"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>

namespace barrier_ops {
namespace cuda {

namespace {

template <typename in_t>
struct BackwardParams {
  using acc_t = typename Traits<in_t>::acc_t;
  const in_t* q;             // [B, H, R, d]  (R = T without a row set)
  const in_t* k;             // [B, H, T, d]  (one slice per query head)
  const in_t* w;             // [B, H, T, d]
  const acc_t* stats;        // [B, H, R, 2d]  [kbar | wbar]
  const acc_t* lse;          // [B, H, R]
  const acc_t* g;            // [B, H, T]  gc = <k - mu_k, w - mu_w>
  const acc_t* hbar;         // [B, H, R]  (prepare_rows)
  const acc_t* beta_c;       // [B, H, R]  beta * c at active rows, else 0
  const acc_t* beta_amax;    // [B, H]     max_t |beta_c| (NaN if any is NaN)
  const acc_t* mu;           // [B, H, 2d] [mu_k | mu_w]
  const bool* mask;          // [B, T] or nullptr
  const int64_t* positions;  // [B, R] or nullptr (row r is position r)
  acc_t* dq;                 // [B, H, R, d]
  acc_t* dk;                 // [B, H, T, d]
  acc_t* dw;                 // [B, H, T, d]
  int64_t T, n_rows;         // keys, query rows (R)
  int H, d;
  int n_blocks;              // key blocks (key kernel)
  int n_row_blocks;          // query row blocks (query kernel)
  acc_t scale;
  int causal;  // CausalMode: 0 none, 1 inclusive, 2 strict
};

// The bar tiles of rows [t0, t0 + rows): r(kbar - mu_k) and r(wbar - mu_w)
// (rounded to the input dtype exactly as prepare_rows rounds them for hbar),
// zero past the last row (T: the row count) and in the padding columns.
template <int D, int kThreads, typename in_t, typename acc_t>
__device__ __forceinline__ void load_bar_tiles(in_t* KBs, in_t* WBs, int ld,
                                               const acc_t* stats_bh, const acc_t* mu_bh,
                                               int64_t t0, int rows, int64_t T, int d) {
  for (int idx = threadIdx.x; idx < rows * D; idx += kThreads) {
    const int r = idx / D, c = idx % D;
    const int64_t t = t0 + r;
    const bool ok = t < T && c < d;
    const acc_t* stats_row = stats_bh + t * 2 * d;
    KBs[r * ld + c] = Cast<in_t>::from(ok ? stats_row[c] - mu_bh[c] : acc_t(0));
    WBs[r * ld + c] = Cast<in_t>::from(ok ? stats_row[d + c] - mu_bh[d + c] : acc_t(0));
  }
}

// R rows owned by the CTA (16 per warp), N streamed rows per step.
template <typename in_t, int D>
struct BackwardConfig {
  using acc_t = typename Traits<in_t>::acc_t;
  static constexpr int kWarps = Traits<in_t>::kBwdWarps;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int R = 16 * kWarps;
  static constexpr int N = Traits<in_t>::kBwdCols;
  static constexpr int LDD = D + Traits<in_t>::kPad;
  static constexpr int LDS = N + Traits<in_t>::kAccPad;
  static constexpr int LDP = N + Traits<in_t>::kPad;
  static_assert(D % 16 == 0 && N % 16 == 0, "tiles are made of 16x16 blocks");
  static_assert(16 * LDS >= 256, "a warp's score rows double as its 16x16 staging area");

  // Owned operands (R rows: key kernel K, W; query kernel Q, kbar, wbar),
  // streamed operands (N rows: key kernel Q, kbar, wbar; query kernel K, W),
  // score / cross tiles and the A operands of the accumulating products (key
  // kernel c dz and -Pb; query kernel c dz).
  struct Layout {
    size_t own0, own1, own2, str0, str1, str2, s, c, a0, a1, v0, v1, v2, v3, bytes;
  };
  __host__ __device__ static constexpr Layout layout(bool key_kernel) {
    SmemCarver c;
    Layout l{};
    l.own0 = c.take<in_t>(R * LDD);
    l.own1 = c.take<in_t>(R * LDD);
    l.own2 = c.take<in_t>(key_kernel ? 0 : R * LDD);
    l.str0 = c.take<in_t>(N * LDD);
    l.str1 = c.take<in_t>(N * LDD);
    l.str2 = c.take<in_t>(key_kernel ? N * LDD : 0);
    l.s = c.take<acc_t>(R * LDS);
    l.c = c.take<acc_t>(R * LDS);
    l.a0 = c.take<in_t>(R * LDP);
    l.a1 = c.take<in_t>(key_kernel ? R * LDP : 0);
    l.v0 = c.take<acc_t>(N);
    l.v1 = c.take<acc_t>(N);
    l.v2 = c.take<acc_t>(N);
    l.v3 = c.take<int64_t>(key_kernel ? N : 0);
    l.bytes = align_up(c.offset, 128);
    return l;
  }
};

// ---------------------------------------------------------------------------
// Key kernel: dk, dw for a block of R keys.
// ---------------------------------------------------------------------------
template <typename in_t, int D>
__global__ void __launch_bounds__(BackwardConfig<in_t, D>::kThreads)
    kappa_backward_key_kernel(const BackwardParams<in_t> p) {
  using Cfg = BackwardConfig<in_t, D>;
  using acc_t = typename Cfg::acc_t;
  using Mma = WarpMma<in_t>;
  constexpr int R = Cfg::R, N = Cfg::N, LDD = Cfg::LDD, LDS = Cfg::LDS, LDP = Cfg::LDP;
  constexpr int kThreads = Cfg::kThreads;
  constexpr auto L = Cfg::layout(/*key_kernel=*/true);
  extern __shared__ __align__(128) unsigned char smem[];
  in_t* Ks = reinterpret_cast<in_t*>(smem + L.own0);
  in_t* Ws = reinterpret_cast<in_t*>(smem + L.own1);
  in_t* Qs = reinterpret_cast<in_t*>(smem + L.str0);
  in_t* KBs = reinterpret_cast<in_t*>(smem + L.str1);
  in_t* WBs = reinterpret_cast<in_t*>(smem + L.str2);
  acc_t* Ss = reinterpret_cast<acc_t*>(smem + L.s);
  acc_t* Cs = reinterpret_cast<acc_t*>(smem + L.c);
  in_t* DZs = reinterpret_cast<in_t*>(smem + L.a0);
  in_t* NPs = reinterpret_cast<in_t*>(smem + L.a1);  // -2^e Pb, so one GEMM subtracts
  acc_t* lse_s = reinterpret_cast<acc_t*>(smem + L.v0);
  acc_t* hbar_s = reinterpret_cast<acc_t*>(smem + L.v1);
  acc_t* betac_s = reinterpret_cast<acc_t*>(smem + L.v2);
  int64_t* pos_s = reinterpret_cast<int64_t*>(smem + L.v3);  // streamed rows' positions

  const int64_t T = p.T, n_rows = p.n_rows;
  const int d = p.d;
  const int kb = static_cast<int>(blockIdx.x % p.n_blocks);
  const int64_t bh = blockIdx.x / p.n_blocks;
  const int64_t b = bh / p.H;
  const int64_t s0 = static_cast<int64_t>(kb) * R;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = 16 * warp + (lane >> 1), half = lane & 1;
  const int64_t s = s0 + row;  // this lane pair's key
  const bool* mask_row = p.mask ? p.mask + b * T : nullptr;
  const int64_t* positions_b = p.positions ? p.positions + b * n_rows : nullptr;
  const bool key_ok = s < T && (mask_row == nullptr || mask_row[s]);
  const acc_t g_s = key_ok ? p.g[bh * T + s] : acc_t(0);

  const acc_t* mu_bh = p.mu + bh * 2 * d;
  // Per-(b, h) power of two for the 16-bit operands (see the file comment).
  const int pow2_e = -pow2_exponent(p.beta_amax[bh]);
  const acc_t pscale = pow2(acc_t(0), pow2_e), inv_pscale = pow2(acc_t(0), -pow2_e);

  load_tile<D, kThreads>(Ks, LDD, p.k + bh * T * d, s0, R, T, d, mask_row);
  load_tile<D, kThreads>(Ws, LDD, p.w + bh * T * d, s0, R, T, d, mask_row);
  // Keys that are all padding (or past T) get zero gradients without a loop.
  const bool any_key = __syncthreads_or(key_ok);
  // Causal: only queries t >= s0 + diag see these keys. With a row set the
  // rows are in any order: every block of rows is visited, and those whose
  // active rows all end before s0 are skipped below.
  const int64_t u_begin =
      !any_key                 ? n_rows
      : positions_b != nullptr ? 0
                               : (p.causal != 0 ? ((s0 + causal_diag(p.causal)) / N) * N : 0);

  const in_t* K_warp = Ks + 16 * warp * LDD;
  const in_t* W_warp = Ws + 16 * warp * LDD;
  acc_t* S_warp = Ss + 16 * warp * LDS;
  acc_t* C_warp = Cs + 16 * warp * LDS;
  in_t* DZ_warp = DZs + 16 * warp * LDP;
  in_t* NP_warp = NPs + 16 * warp * LDP;

  typename Mma::Acc acc_dk[D / 16], acc_dw[D / 16];
#pragma unroll
  for (int j = 0; j < D / 16; ++j) {
    Mma::zero(acc_dk[j]);
    Mma::zero(acc_dw[j]);
  }
  acc_t coef = 0;

  for (int64_t u0 = u_begin; u0 < n_rows; u0 += N) {
    __syncthreads();  // the previous step's streamed tiles are no longer read
    // Padded queries and empty slots load as zeros: their dz is 0, and
    // 0 * NaN would poison the whole key block's dk.
    load_query_tile<D, kThreads>(Qs, LDD, p.q + bh * n_rows * d, u0, N, n_rows, T, d,
                                 positions_b, mask_row);
    bool active = false;
    for (int j = threadIdx.x; j < N; j += kThreads) {
      const int64_t t = u0 + j;
      const bool in_range = t < n_rows;
      lse_s[j] = in_range ? p.lse[bh * n_rows + t] : -std::numeric_limits<acc_t>::infinity();
      hbar_s[j] = in_range ? p.hbar[bh * n_rows + t] : acc_t(0);
      const acc_t bc = in_range ? p.beta_c[bh * n_rows + t] : acc_t(0);
      // An active row's position is in [0, T) (prepare_rows); others are not read.
      const int64_t pos = in_range ? query_position(positions_b, t) : -1;
      pos_s[j] = pos;
      betac_s[j] = bc * pscale;
      active = active || (bc != acc_t(0) &&
                          (positions_b == nullptr || causal_end(p.causal, pos, T) > s0));
    }
    load_bar_tiles<D, kThreads>(KBs, WBs, LDD, p.stats + bh * n_rows * 2 * d, mu_bh, u0, N,
                                n_rows, d);
    // Query blocks in which no query has a gradient contribute nothing.
    if (!__syncthreads_or(active)) continue;

    // S^T = K Q^T and C^T = W kbar^T + K wbar^T for the warp's 16 keys.
#pragma unroll 1
    for (int n = 0; n < N / 16; ++n) {
      typename Mma::Acc acc_s, acc_c;
      Mma::zero(acc_s);
      Mma::zero(acc_c);
#pragma unroll 2
      for (int kk = 0; kk < D / 16; ++kk) {
        Mma::rc(acc_s, K_warp + kk * 16, LDD, Qs + n * 16 * LDD + kk * 16, LDD);
        Mma::rc(acc_c, W_warp + kk * 16, LDD, KBs + n * 16 * LDD + kk * 16, LDD);
        Mma::rc(acc_c, K_warp + kk * 16, LDD, WBs + n * 16 * LDD + kk * 16, LDD);
      }
      Mma::store(S_warp + n * 16, LDS, acc_s);
      Mma::store(C_warp + n * 16, LDS, acc_c);
    }
    __syncwarp();
    for (int j = half * (N / 2); j < (half + 1) * (N / 2); ++j) {
      acc_t pb = 0, dz = 0;  // both scaled by 2^e
      if (key_ok && betac_s[j] != acc_t(0) && causally_allowed(p.causal, s, pos_s[j])) {
        const int r = lane >> 1;
        const acc_t alpha = acc_exp(p.scale * S_warp[r * LDS + j] - lse_s[j]);
        pb = betac_s[j] * alpha;
        dz = pb * (g_s - C_warp[r * LDS + j] - hbar_s[j]);
      }
      const in_t neg_pb = Cast<in_t>::from(-pb);
      coef -= to_acc(neg_pb);  // the Pb the products use, so the centring is exact
      DZ_warp[(lane >> 1) * LDP + j] = Cast<in_t>::from(p.scale * dz);
      NP_warp[(lane >> 1) * LDP + j] = neg_pb;
    }
    __syncwarp();
#pragma unroll 1
    for (int kk = 0; kk < N / 16; ++kk) {
#pragma unroll
      for (int j = 0; j < D / 16; ++j) {
        Mma::rr(acc_dk[j], DZ_warp + kk * 16, LDP, Qs + kk * 16 * LDD + j * 16, LDD);
        Mma::rr(acc_dk[j], NP_warp + kk * 16, LDP, WBs + kk * 16 * LDD + j * 16, LDD);
        Mma::rr(acc_dw[j], NP_warp + kk * 16, LDP, KBs + kk * 16 * LDD + j * 16, LDD);
      }
    }
  }
  coef += shfl_xor(coef, 1);

  // dk_s = (acc_dk + coef_s (w_s - mu_w)) / 2^e ; dw_s = (acc_dw + coef_s (k_s - mu_k)) / 2^e
  // (zero for padded keys).
  acc_t* dk_row = p.dk + (bh * T + s) * d;
  acc_t* dw_row = p.dw + (bh * T + s) * d;
#pragma unroll
  for (int j = 0; j < D / 16; ++j) {
    acc_t vk[8], vw[8];
    unstage<in_t>(acc_dk[j], S_warp, vk);
    unstage<in_t>(acc_dw[j], S_warp, vw);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int col = j * 16 + half * 8 + i;
      if (s < T && col < d) {
        const acc_t wc = to_acc(W_warp[(lane >> 1) * LDD + col]) - mu_bh[d + col];
        const acc_t kc = to_acc(K_warp[(lane >> 1) * LDD + col]) - mu_bh[col];
        dk_row[col] = key_ok ? (vk[i] + coef * wc) * inv_pscale : acc_t(0);
        dw_row[col] = key_ok ? (vw[i] + coef * kc) * inv_pscale : acc_t(0);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Query kernel: dq for a block of R queries.
// ---------------------------------------------------------------------------
template <typename in_t, int D>
__global__ void __launch_bounds__(BackwardConfig<in_t, D>::kThreads)
    kappa_backward_query_kernel(const BackwardParams<in_t> p) {
  using Cfg = BackwardConfig<in_t, D>;
  using acc_t = typename Cfg::acc_t;
  using Mma = WarpMma<in_t>;
  constexpr int R = Cfg::R, N = Cfg::N, LDD = Cfg::LDD, LDS = Cfg::LDS, LDP = Cfg::LDP;
  constexpr int kThreads = Cfg::kThreads;
  constexpr auto L = Cfg::layout(/*key_kernel=*/false);
  extern __shared__ __align__(128) unsigned char smem[];
  in_t* Qs = reinterpret_cast<in_t*>(smem + L.own0);
  in_t* KBs = reinterpret_cast<in_t*>(smem + L.own1);
  in_t* WBs = reinterpret_cast<in_t*>(smem + L.own2);
  in_t* Ks = reinterpret_cast<in_t*>(smem + L.str0);
  in_t* Ws = reinterpret_cast<in_t*>(smem + L.str1);
  acc_t* Ss = reinterpret_cast<acc_t*>(smem + L.s);
  acc_t* Cs = reinterpret_cast<acc_t*>(smem + L.c);
  in_t* DZs = reinterpret_cast<in_t*>(smem + L.a0);
  acc_t* gs = reinterpret_cast<acc_t*>(smem + L.v0);
  int* key_ok = reinterpret_cast<int*>(smem + L.v1);  // N ints fit in N acc_t

  const int64_t T = p.T, n_rows = p.n_rows;
  const int d = p.d;
  // Heavy (late, causal) query blocks first.
  const int qb = p.n_row_blocks - 1 - static_cast<int>(blockIdx.x % p.n_row_blocks);
  const int64_t bh = blockIdx.x / p.n_row_blocks;
  const int64_t b = bh / p.H;
  const int64_t t0 = static_cast<int64_t>(qb) * R;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = 16 * warp + (lane >> 1), half = lane & 1;
  const int64_t t = t0 + row;  // the row; its query sits at position pos
  const bool* mask_row = p.mask ? p.mask + b * T : nullptr;
  const int64_t* positions_b = p.positions ? p.positions + b * n_rows : nullptr;
  const bool in_range = t < n_rows;
  const acc_t row_lse = in_range ? p.lse[bh * n_rows + t] : acc_t(0);
  const acc_t row_hbar = in_range ? p.hbar[bh * n_rows + t] : acc_t(0);
  const acc_t row_betac = in_range ? p.beta_c[bh * n_rows + t] : acc_t(0);
  // An active row's position is in [0, T) (prepare_rows).
  const bool active = row_betac != acc_t(0);
  const int64_t pos = in_range ? query_position(positions_b, t) : -1;

  // With a row set, the block's keys end at the largest position of its
  // active rows (rows in any order).
  __shared__ unsigned long long rows_key_end;
  if (positions_b != nullptr) {
    if (threadIdx.x == 0) rows_key_end = 0;
    __syncthreads();
    if (half == 0 && active) {
      atomicMax(&rows_key_end, static_cast<unsigned long long>(causal_end(p.causal, pos, T)));
    }
  }
  const acc_t* mu_bh = p.mu + bh * 2 * d;
  // Padded query rows and empty slots load as zeros (their dq is 0 either way).
  load_query_tile<D, kThreads>(Qs, LDD, p.q + bh * n_rows * d, t0, R, n_rows, T, d, positions_b,
                               mask_row);
  load_bar_tiles<D, kThreads>(KBs, WBs, LDD, p.stats + bh * n_rows * 2 * d, mu_bh, t0, R, n_rows,
                              d);
  const bool any_active = __syncthreads_or(active);
  const int64_t key_end =
      !any_active              ? 0
      : positions_b != nullptr ? static_cast<int64_t>(rows_key_end)
                               : (p.causal != 0 ? min(T, t0 + R - causal_diag(p.causal)) : T);

  const in_t* Q_warp = Qs + 16 * warp * LDD;
  const in_t* KB_warp = KBs + 16 * warp * LDD;
  const in_t* WB_warp = WBs + 16 * warp * LDD;
  acc_t* S_warp = Ss + 16 * warp * LDS;
  acc_t* C_warp = Cs + 16 * warp * LDS;
  in_t* DZ_warp = DZs + 16 * warp * LDP;

  typename Mma::Acc acc_dq[D / 16];
#pragma unroll
  for (int j = 0; j < D / 16; ++j) Mma::zero(acc_dq[j]);
  acc_t a_sum = 0;  // sum_s r(c a_ts), for the mu_k correction

  for (int64_t s0 = 0; s0 < key_end; s0 += N) {
    __syncthreads();
    load_tile<D, kThreads>(Ks, LDD, p.k + bh * T * d, s0, N, T, d, mask_row);
    load_tile<D, kThreads>(Ws, LDD, p.w + bh * T * d, s0, N, T, d, mask_row);
    for (int j = threadIdx.x; j < N; j += kThreads) {
      const int64_t s = s0 + j;
      const bool ok = s < T && (mask_row == nullptr || mask_row[s]);
      key_ok[j] = ok;
      gs[j] = ok ? p.g[bh * T + s] : acc_t(0);
    }
    __syncthreads();
    // S = Q K^T and C = kbar W^T + wbar K^T for the warp's 16 queries.
#pragma unroll 1
    for (int n = 0; n < N / 16; ++n) {
      typename Mma::Acc acc_s, acc_c;
      Mma::zero(acc_s);
      Mma::zero(acc_c);
#pragma unroll 2
      for (int kk = 0; kk < D / 16; ++kk) {
        Mma::rc(acc_s, Q_warp + kk * 16, LDD, Ks + n * 16 * LDD + kk * 16, LDD);
        Mma::rc(acc_c, KB_warp + kk * 16, LDD, Ws + n * 16 * LDD + kk * 16, LDD);
        Mma::rc(acc_c, WB_warp + kk * 16, LDD, Ks + n * 16 * LDD + kk * 16, LDD);
      }
      Mma::store(S_warp + n * 16, LDS, acc_s);
      Mma::store(C_warp + n * 16, LDS, acc_c);
    }
    __syncwarp();
    for (int j = half * (N / 2); j < (half + 1) * (N / 2); ++j) {
      const int64_t s = s0 + j;
      acc_t a = 0;  // alpha (h - hbar): beta is applied in the epilogue
      if (active && key_ok[j] != 0 && causally_allowed(p.causal, s, pos)) {
        const int r = lane >> 1;
        const acc_t alpha = acc_exp(p.scale * S_warp[r * LDS + j] - row_lse);
        a = alpha * (gs[j] - C_warp[r * LDS + j] - row_hbar);
      }
      const in_t ca = Cast<in_t>::from(p.scale * a);
      a_sum += to_acc(ca);
      DZ_warp[(lane >> 1) * LDP + j] = ca;
    }
    __syncwarp();
#pragma unroll 1
    for (int kk = 0; kk < N / 16; ++kk) {
#pragma unroll
      for (int j = 0; j < D / 16; ++j) {
        Mma::rr(acc_dq[j], DZ_warp + kk * 16, LDP, Ks + kk * 16 * LDD + j * 16, LDD);
      }
    }
  }

  // dq_t = beta_t c (sum_s r(c a_ts) k_s - mu_k sum_s r(c a_ts)).
  a_sum += shfl_xor(a_sum, 1);
  acc_t* dq_row = p.dq + (bh * n_rows + t) * d;
#pragma unroll
  for (int j = 0; j < D / 16; ++j) {
    acc_t v[8];
    unstage<in_t>(acc_dq[j], S_warp, v);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int col = j * 16 + half * 8 + i;
      if (t < n_rows && col < d) {
        dq_row[col] = active ? row_betac * (v[i] - mu_bh[col] * a_sum) : acc_t(0);
      }
    }
  }
}

template <typename in_t, typename Kernel>
void launch(Kernel kernel, size_t smem, int threads, int64_t blocks, const BackwardParams<in_t>& p) {
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
              "barrier_ops.kappa backward: too many tiles for one launch: ", blocks);
  set_smem_limit(reinterpret_cast<const void*>(kernel), smem, "barrier_ops.kappa backward");
  kernel<<<static_cast<unsigned>(blocks), threads, smem, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename in_t, int D>
void launch_backward(BackwardParams<in_t> p, int64_t BH) {
  using Cfg = BackwardConfig<in_t, D>;
  constexpr size_t query_smem = Cfg::layout(false).bytes, key_smem = Cfg::layout(true).bytes;
  p.n_blocks = static_cast<int>((p.T + Cfg::R - 1) / Cfg::R);
  p.n_row_blocks = static_cast<int>((p.n_rows + Cfg::R - 1) / Cfg::R);
  if (p.n_row_blocks > 0) {
    launch<in_t>(&kappa_backward_query_kernel<in_t, D>, query_smem, Cfg::kThreads,
                 BH * p.n_row_blocks, p);
  }
  if (p.n_blocks > 0) {
    launch<in_t>(&kappa_backward_key_kernel<in_t, D>, key_smem, Cfg::kThreads, BH * p.n_blocks,
                 p);
  }
}

}  // namespace
}  // namespace cuda

std::tuple<at::Tensor, at::Tensor, at::Tensor> kappa_backward_cuda(const KappaProblem& problem,
                                                                   const at::Tensor& grad_kappa,
                                                                   const KappaState& state) {
  // q, k, w and the saved state arrive contiguous and checked (csrc/kappa.cpp).
  const c10::cuda::CUDAGuard device_guard(problem.q.device());
  cuda::check_core_inputs(problem.q);
  const int64_t B = problem.B(), H = problem.H(), T = problem.T(), d = problem.d();
  const int64_t R = problem.R();  // query rows (T without a row set)
  const auto acc = accumulation_dtype(problem.q.scalar_type());
  const auto opts = problem.q.options().dtype(acc);
  // Every element is written by the kernels (zeros where nothing flows).
  // No keys (no gradient reaches a row) or no rows (an empty row set): zeros.
  if (B * H * T == 0 || R == 0) {
    return {at::zeros({B, H, R, d}, opts), at::zeros({B, H, T, d}, opts),
            at::zeros({B, H, T, d}, opts)};
  }
  at::Tensor dq = at::empty({B, H, R, d}, opts);
  at::Tensor dk = at::empty({B, H, T, d}, opts);
  at::Tensor dw = at::empty({B, H, T, d}, opts);
  const at::Tensor beta = grad_kappa.to(acc).contiguous();
  const KappaState st{state.kappa.contiguous(), state.lse.contiguous(),
                      state.stats.contiguous()};
  const at::Tensor mu = cuda::key_value_means(problem);
  at::Tensor g = at::empty({B, H, T}, opts);
  at::Tensor hbar = at::empty({B, H, R}, opts);
  at::Tensor beta_c = at::empty({B, H, R}, opts);
  cuda::prepare_rows(problem, mu, &st, beta, g, hbar, beta_c);
  // max over t of |beta_t c| per (b, h); NaN propagates (the kernel then uses 1).
  const at::Tensor beta_amax = beta_c.abs().amax({2});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, problem.q.scalar_type(),
                                  "kappa_backward_cuda", [&] {
    using in_t = typename cuda::NativeType<scalar_t>::type;
    using acc_t = typename cuda::Traits<in_t>::acc_t;
    cuda::BackwardParams<in_t> p;
    p.q = reinterpret_cast<const in_t*>(problem.q.const_data_ptr());
    p.k = reinterpret_cast<const in_t*>(problem.k.const_data_ptr());
    p.w = reinterpret_cast<const in_t*>(problem.w.const_data_ptr());
    p.stats = st.stats.const_data_ptr<acc_t>();
    p.lse = st.lse.const_data_ptr<acc_t>();
    p.g = g.const_data_ptr<acc_t>();
    p.hbar = hbar.const_data_ptr<acc_t>();
    p.beta_c = beta_c.const_data_ptr<acc_t>();
    p.beta_amax = beta_amax.const_data_ptr<acc_t>();
    p.mu = mu.const_data_ptr<acc_t>();
    p.mask = problem.mask_ptr();
    p.positions = problem.positions_ptr();
    p.dq = dq.data_ptr<acc_t>();
    p.dk = dk.data_ptr<acc_t>();
    p.dw = dw.data_ptr<acc_t>();
    p.T = T;
    p.n_rows = R;
    p.H = static_cast<int>(H);
    p.d = static_cast<int>(d);
    p.n_blocks = 0;
    p.n_row_blocks = 0;
    p.scale = static_cast<acc_t>(problem.scale);
    p.causal = static_cast<int>(problem.causal);
    if (d <= 64) {
      cuda::launch_backward<in_t, 64>(p, B * H);
    } else {
      cuda::launch_backward<in_t, 128>(p, B * H);
    }
  });
  return {dq, dk, dw};
}

}  // namespace barrier_ops
