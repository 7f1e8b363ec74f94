// support_token_argmin on CUDA: one CTA per row, a strided scan per thread
// then a warp-shuffle and a shared-memory reduction. Same semantics as the CPU
// kernel: valid positions only, NaN skipped, ties to the smallest index, -1 /
// +inf for a row with no valid position.
#include "cuda_cores.h"
#include "kernel_common.cuh"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>

namespace barrier_ops {
namespace cuda {

namespace {

constexpr int kArgminThreads = 256;

// (value, index) with index -1 meaning "no candidate yet". Values compare in
// double, which holds every input dtype exactly.
struct Candidate {
  double value;
  int64_t index;
};

__device__ __forceinline__ Candidate better(const Candidate& a, const Candidate& b) {
  if (b.index < 0) return a;
  if (a.index < 0) return b;
  if (b.value < a.value) return b;
  if (a.value < b.value) return a;
  return b.index < a.index ? b : a;
}

template <typename in_t>
__global__ void __launch_bounds__(kArgminThreads)
    support_token_argmin_kernel(const in_t* __restrict__ margins, const bool* __restrict__ mask,
                                int64_t* __restrict__ indices, in_t* __restrict__ values,
                                int64_t T, int64_t heads) {
  const int64_t r = blockIdx.x;
  const in_t* row = margins + r * T;
  const bool* mask_row = mask ? mask + (r / heads) * T : nullptr;
  Candidate best{std::numeric_limits<double>::infinity(), -1};
  for (int64_t t = threadIdx.x; t < T; t += kArgminThreads) {
    if (mask_row && !mask_row[t]) continue;
    const double x = static_cast<double>(to_acc(row[t]));
    if (isnan(x)) continue;
    // Indices rise along a thread's scan, so the first hit wins ties here.
    if (best.index < 0 || x < best.value) best = Candidate{x, t};
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    Candidate other{__shfl_xor_sync(0xffffffffu, best.value, offset),
                    __shfl_xor_sync(0xffffffffu, best.index, offset)};
    best = better(best, other);
  }
  __shared__ Candidate per_warp[kArgminThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) per_warp[warp] = best;
  __syncthreads();
  if (threadIdx.x == 0) {
    Candidate result = per_warp[0];
    for (int i = 1; i < kArgminThreads / 32; ++i) result = better(result, per_warp[i]);
    indices[r] = result.index;
    values[r] = Cast<in_t>::from(result.index < 0 ? std::numeric_limits<double>::infinity()
                                                  : result.value);
  }
}

}  // namespace
}  // namespace cuda

std::tuple<at::Tensor, at::Tensor> support_token_argmin_cuda(
    const at::Tensor& margins, const std::optional<at::Tensor>& key_padding_mask) {
  const c10::cuda::CUDAGuard device_guard(margins.device());
  const ArgminRows p = prepare_argmin_rows(margins, key_padding_mask);
  const at::Tensor &m = p.margins, &mask = p.mask, &indices = p.indices, &values = p.values;
  const int64_t rows = p.rows, heads = p.heads, T = p.T;
  if (rows == 0) return {indices, values};
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), "support_token_argmin: too many rows ",
              rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, m.scalar_type(),
                                  "support_token_argmin_cuda", [&] {
    using in_t = typename cuda::NativeType<scalar_t>::type;
    cuda::support_token_argmin_kernel<in_t>
        <<<static_cast<unsigned>(rows), cuda::kArgminThreads, 0,
           at::cuda::getCurrentCUDAStream()>>>(
            reinterpret_cast<const in_t*>(m.data_ptr()),
            mask.defined() ? mask.data_ptr<bool>() : nullptr, indices.data_ptr<int64_t>(),
            reinterpret_cast<in_t*>(values.data_ptr()), T, heads);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {indices, values};
}

}  // namespace barrier_ops
