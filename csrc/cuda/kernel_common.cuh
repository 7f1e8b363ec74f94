// Building blocks shared by the CUDA kernels of barrier_ops: element casts,
// per-dtype tile configurations, a warp-level 16x16 tile product with two
// implementations (WMMA tensor cores for fp16/bf16, scalar FMA for fp32/fp64),
// the global -> shared tile loader, the causal-mode predicate, and the host
// helpers shared by the forward and backward cores (defined in
// kappa_forward.cu).
//
// Every kernel gives each warp 16 rows of a tile and keeps the products in
// shared memory between stages; the warp-owned rows make the softmax-style
// elementwise stages warp-local (only __syncwarp between them).
//
// Centring. Every kernel works with per-(b, h) means mu_k, mu_w of k and w
// (over the real tokens) subtracted wherever a sum would otherwise cancel:
// kappa, the cross term, dq, dk and dw are all invariant to those shifts
// (softmax is shift invariant per row, kappa is a covariance, and
// sum_t Pb_ts mu = coef_s mu), so the means change no result in exact
// arithmetic and keep keys / values with a large mean from cancelling
// catastrophically in fp32 and in the bf16/fp16 tensor-core operands.
// The logits always use the original k (exact inputs), so the saved lse is
// that of the problem as given.
#pragma once

#include "cuda_cores.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace barrier_ops {
namespace cuda {

// ATen's element types -> the CUDA native types the kernels use.
template <typename scalar_t>
struct NativeType {
  using type = scalar_t;
};
template <>
struct NativeType<c10::Half> {
  using type = __half;
};
template <>
struct NativeType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

// ---------------------------------------------------------------------------
// Element casts. acc_t is float for 16/32-bit inputs and double for fp64.
// ---------------------------------------------------------------------------

__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }

template <typename To>
struct Cast;
template <>
struct Cast<__half> {
  __device__ __forceinline__ static __half from(__half x) { return x; }
  template <typename From>
  __device__ __forceinline__ static __half from(From x) {
    return __float2half_rn(static_cast<float>(to_acc(x)));
  }
};
template <>
struct Cast<__nv_bfloat16> {
  __device__ __forceinline__ static __nv_bfloat16 from(__nv_bfloat16 x) { return x; }
  template <typename From>
  __device__ __forceinline__ static __nv_bfloat16 from(From x) {
    return __float2bfloat16_rn(static_cast<float>(to_acc(x)));
  }
};
template <>
struct Cast<float> {
  template <typename From>
  __device__ __forceinline__ static float from(From x) {
    return static_cast<float>(to_acc(x));
  }
};
template <>
struct Cast<double> {
  template <typename From>
  __device__ __forceinline__ static double from(From x) {
    return static_cast<double>(to_acc(x));
  }
};
// to_acc for the accumulation types themselves is the identity, so Cast<T>::from
// accepts every input and accumulation type.

__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }

template <typename T>
__device__ __forceinline__ T shfl_xor(T x, int mask) {
  return __shfl_xor_sync(0xffffffffu, x, mask);
}

// ---------------------------------------------------------------------------
// Per-dtype configuration. 16-bit inputs run the tile products on tensor
// cores; fp32 / fp64 use scalar FMAs with smaller tiles so the shared
// memory (which holds operands in the input dtype) stays below ~100 KB.
// ---------------------------------------------------------------------------

template <typename in_t>
struct Traits;

template <>
struct Traits<__half> {
  using acc_t = float;
  static constexpr bool kTensorCores = true;
  static constexpr int kFwdWarps = 4, kFwdKeys = 64;  // forward: 64 queries x 64 keys
  static constexpr int kBwdWarps = 4, kBwdCols = 32;  // backward: 64 owned rows x 32 streamed
  static constexpr int kPad = 8;                      // 16-byte row padding (WMMA ldm rule)
  static constexpr int kAccPad = 4;
};
template <>
struct Traits<__nv_bfloat16> : Traits<__half> {};
template <>
struct Traits<float> {
  using acc_t = float;
  static constexpr bool kTensorCores = false;
  static constexpr int kFwdWarps = 4, kFwdKeys = 32;
  static constexpr int kBwdWarps = 2, kBwdCols = 32;
  static constexpr int kPad = 1;  // odd row stride: rows of a column land on distinct banks
  static constexpr int kAccPad = 1;
};
template <>
struct Traits<double> {
  using acc_t = double;
  static constexpr bool kTensorCores = false;
  static constexpr int kFwdWarps = 2, kFwdKeys = 16;
  static constexpr int kBwdWarps = 1, kBwdCols = 16;
  static constexpr int kPad = 1;
  static constexpr int kAccPad = 1;
};

constexpr size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

// Bump allocator over the dynamic shared memory, identical on host (to size
// the launch) and device (to carve it).
struct SmemCarver {
  size_t offset = 0;
  template <typename T>
  __host__ __device__ constexpr size_t take(size_t count) {
    const size_t at = align_up(offset, 128);
    offset = at + count * sizeof(T);
    return at;
  }
};

// ---------------------------------------------------------------------------
// Warp tile products. A warp computes a 16x16 fp32/fp64 tile C += A (16x16)
// * B (16x16) per call (one 16-deep step of the inner dimension).
//   rc: A row-major (A[r, k] = A[r * lda + k]), B[k, c] = B[c * ldb + k]
//       (B is stored as rows of the other operand: Q K^T, K Q^T, ...)
//   rr: A row-major, B row-major (B[k, c] = B[k * ldb + c])
// Accumulator layout is opaque (WMMA); results leave through store().
// ---------------------------------------------------------------------------

template <typename op_t, bool kTensorCores = Traits<op_t>::kTensorCores>
struct WarpMma;

template <typename op_t>
struct WarpMma<op_t, true> {
  using Acc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;

  __device__ __forceinline__ static void zero(Acc& c) { nvcuda::wmma::fill_fragment(c, 0.0f); }

  __device__ __forceinline__ static void rc(Acc& c, const op_t* A, int lda, const op_t* B,
                                            int ldb) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, op_t, nvcuda::wmma::row_major> a;
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, op_t, nvcuda::wmma::col_major> b;
    nvcuda::wmma::load_matrix_sync(a, A, lda);
    nvcuda::wmma::load_matrix_sync(b, B, ldb);
    nvcuda::wmma::mma_sync(c, a, b, c);
#else
    __trap();  // the host refuses 16-bit inputs below sm_80
#endif
  }

  __device__ __forceinline__ static void rr(Acc& c, const op_t* A, int lda, const op_t* B,
                                            int ldb) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, op_t, nvcuda::wmma::row_major> a;
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, op_t, nvcuda::wmma::row_major> b;
    nvcuda::wmma::load_matrix_sync(a, A, lda);
    nvcuda::wmma::load_matrix_sync(b, B, ldb);
    nvcuda::wmma::mma_sync(c, a, b, c);
#else
    __trap();
#endif
  }

  // Row-major store; out and ld must satisfy WMMA's alignment (32-byte
  // pointer, ld a multiple of 4 floats), which the layouts below guarantee.
  __device__ __forceinline__ static void store(float* out, int ld, const Acc& c) {
    nvcuda::wmma::store_matrix_sync(out, c, ld, nvcuda::wmma::mem_row_major);
  }
};

// Scalar fallback with a known layout: lane l owns row l / 2 and the eight
// columns 8 * (l % 2) .. + 7 of the 16x16 tile.
template <typename op_t>
struct WarpMma<op_t, false> {
  using acc_t = typename Traits<op_t>::acc_t;
  struct Acc {
    acc_t v[8];
  };

  __device__ __forceinline__ static void zero(Acc& c) {
#pragma unroll
    for (int i = 0; i < 8; ++i) c.v[i] = acc_t(0);
  }

  __device__ __forceinline__ static void rc(Acc& c, const op_t* A, int lda, const op_t* B,
                                            int ldb) {
    const int lane = threadIdx.x & 31, r = lane >> 1, c0 = (lane & 1) * 8;
#pragma unroll 4
    for (int k = 0; k < 16; ++k) {
      const acc_t a = to_acc(A[r * lda + k]);
#pragma unroll
      for (int i = 0; i < 8; ++i) c.v[i] += a * to_acc(B[(c0 + i) * ldb + k]);
    }
  }

  __device__ __forceinline__ static void rr(Acc& c, const op_t* A, int lda, const op_t* B,
                                            int ldb) {
    const int lane = threadIdx.x & 31, r = lane >> 1, c0 = (lane & 1) * 8;
#pragma unroll 4
    for (int k = 0; k < 16; ++k) {
      const acc_t a = to_acc(A[r * lda + k]);
#pragma unroll
      for (int i = 0; i < 8; ++i) c.v[i] += a * to_acc(B[k * ldb + c0 + i]);
    }
  }

  __device__ __forceinline__ static void store(acc_t* out, int ld, const Acc& c) {
    const int lane = threadIdx.x & 31, r = lane >> 1, c0 = (lane & 1) * 8;
#pragma unroll
    for (int i = 0; i < 8; ++i) out[r * ld + c0 + i] = c.v[i];
  }
};

// Reads a warp's 16x16 accumulator tile back per lane in the row-ownership
// layout (lane l: row l / 2, columns 8 * (l % 2) + i) through a 256-element
// per-warp staging area. Every lane of the warp must call it.
template <typename op_t, typename Acc, typename acc_t>
__device__ __forceinline__ void unstage(const Acc& c, acc_t* stage, acc_t (&out)[8]) {
  const int lane = threadIdx.x & 31, r = lane >> 1, c0 = (lane & 1) * 8;
  __syncwarp();
  WarpMma<op_t>::store(stage, 16, c);
  __syncwarp();
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = stage[r * 16 + c0 + i];
  __syncwarp();
}

// Copies rows [row0, row0 + rows) of a [*, d] row-major global matrix into a
// [rows, D] shared tile with row stride ld, casting to dst_t. Rows at or past
// n_rows, rows whose key is padding (mask_row given and false) and columns
// d..D-1 are zero, so tile products over the padded tile are exact and a
// padded key with NaN/inf contents cannot leak into a product (0 * NaN).
template <int D, int kThreads, typename dst_t, typename src_t>
__device__ __forceinline__ void load_tile(dst_t* dst, int ld, const src_t* src, int64_t row0,
                                          int rows, int64_t n_rows, int d,
                                          const bool* mask_row) {
  for (int idx = threadIdx.x; idx < rows * D; idx += kThreads) {
    const int r = idx / D, c = idx % D;
    const int64_t row = row0 + r;
    dst_t value = Cast<dst_t>::from(0.0f);
    if (row < n_rows && c < d && (mask_row == nullptr || mask_row[row])) {
      value = Cast<dst_t>::from(src[row * d + c]);
    }
    dst[r * ld + c] = value;
  }
}

// ---------------------------------------------------------------------------
// Causality. `causal` is CausalMode as an int: 0 none, 1 inclusive (s <= t),
// 2 strict (s < t). Key s is allowed for query t iff
//   causal == 0  or  s + diag <= t,   diag = (causal == 2).
// ---------------------------------------------------------------------------
__host__ __device__ __forceinline__ int64_t causal_diag(int causal) { return causal == 2 ? 1 : 0; }
__device__ __forceinline__ bool causally_allowed(int causal, int64_t s, int64_t t) {
  return causal == 0 || s + causal_diag(causal) <= t;
}
// Keys s < causal_end(causal, t, T) may be allowed for a query at position t.
__device__ __forceinline__ int64_t causal_end(int causal, int64_t t, int64_t T) {
  return causal == 0 ? T : min(T, t + 1 - causal_diag(causal));
}

// ---------------------------------------------------------------------------
// Row sets (KappaProblem::query_positions). positions_b is one sequence's row
// set ([n_rows] int64) or nullptr, when row r is position r. A position
// outside [0, T) is an empty slot: the host does not check the values (that
// would cost a device sync), so every read through a position is guarded here.
// ---------------------------------------------------------------------------
__device__ __forceinline__ int64_t query_position(const int64_t* positions_b, int64_t r) {
  return positions_b == nullptr ? r : positions_b[r];
}
// Row r holds a query: r < n_rows, its position is in [0, T) and a real token.
__device__ __forceinline__ bool row_is_query(const int64_t* positions_b, const bool* mask_row,
                                             int64_t r, int64_t n_rows, int64_t T) {
  if (r >= n_rows) return false;
  const int64_t pos = query_position(positions_b, r);
  return pos >= 0 && pos < T && (mask_row == nullptr || mask_row[pos]);
}

// load_tile for query rows: row r of src ([n_rows, d]) is copied when it holds
// a query (row_is_query), else zero, so a padded position or an empty slot
// with NaN/inf contents cannot reach a product. Without a row set this is
// load_tile's predicate (r < T and a real token).
template <int D, int kThreads, typename dst_t, typename src_t>
__device__ __forceinline__ void load_query_tile(dst_t* dst, int ld, const src_t* src, int64_t row0,
                                                int rows, int64_t n_rows, int64_t T, int d,
                                                const int64_t* positions_b,
                                                const bool* mask_row) {
  for (int idx = threadIdx.x; idx < rows * D; idx += kThreads) {
    const int r = idx / D, c = idx % D;
    const int64_t row = row0 + r;
    dst_t value = Cast<dst_t>::from(0.0f);
    if (c < d && row_is_query(positions_b, mask_row, row, n_rows, T)) {
      value = Cast<dst_t>::from(src[row * d + c]);
    }
    dst[r * ld + c] = value;
  }
}

// A power of two p with m * p in [0.5, 1) (m > 0, finite), else 1; exact, so
// scaling by p and by 1 / p (pow2_inverse) changes no rounding but fp16's
// range. Used to bring beta * c (as small as ~1e-8 with a mean-reduced, weighted
// barrier over many tokens) into fp16's normal range before the tensor cores.
__device__ __forceinline__ int pow2_exponent(float m) {
  if (!(m > 0.0f) || !isfinite(m)) return 0;
  int e = 0;
  frexpf(m, &e);
  return max(-125, min(125, e));
}
__device__ __forceinline__ int pow2_exponent(double m) {
  if (!(m > 0.0) || !isfinite(m)) return 0;
  int e = 0;
  frexp(m, &e);
  return max(-1021, min(1021, e));
}
__device__ __forceinline__ float pow2(float, int e) { return ldexpf(1.0f, e); }
__device__ __forceinline__ double pow2(double, int e) { return ldexp(1.0, e); }

// ---------------------------------------------------------------------------
// Host helpers shared by the two cores (defined in kappa_forward.cu).
// ---------------------------------------------------------------------------

// Per-(b, h) means of k and w over the real tokens (key_padding_mask; padded
// rows, NaN or not, are left out), [B, H, 2d] in the accumulation dtype:
// [mu_k | mu_w], the layout of a stats row. 0 for a sequence with no real
// token.
at::Tensor key_value_means(const KappaProblem& problem);

// One warp per row:
//   gc[b,h,s] = <k_s - mu_k, w_s - mu_w>        (every key row of [B, H, T])
// and, when state is given (backward), for every query row of [B, H, R],
// with kbarc = kbar - mu_k, wbarc =
// wbar - mu_w and r() the rounding to the input dtype that the kernels apply
// to their bar tiles:
//   hbar[b,h,t]   = kappa_t / c + <kbarc, wbarc> - <kbar, r(wbarc)> - <r(kbarc), wbar>
//                 = sum_s alpha_ts (gc_s - <k_s, r(wbarc_t)> - <r(kbarc_t), w_s>),
//     i.e. the alpha-mean of exactly the h the kernels form from the rounded
//     tiles, so h - hbar has no rounding mismatch;
//   beta_c[b,h,t] = beta_t * c at active rows (lse != -inf, beta != 0 and,
//     with a row set, a query: position in [0, T), real token), else 0
//     (NaN beta and NaN lse stay active and propagate).
void prepare_rows(const KappaProblem& problem, const at::Tensor& mu, const KappaState* state,
                  const at::Tensor& beta, at::Tensor& gc, at::Tensor& hbar,
                  at::Tensor& beta_c);

}  // namespace cuda
}  // namespace barrier_ops
