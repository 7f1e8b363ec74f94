// The CUDA cores of barrier_ops (contracts: KappaForwardFn / KappaBackwardFn
// in csrc/barrier_ops.h) and the CUDA support-token kernel. Host-only header:
// included by the registration (.cpp) and the kernel translation units.
#pragma once

#include "barrier_ops.h"

namespace barrier_ops {

KappaState kappa_forward_cuda(const KappaProblem& problem);

std::tuple<at::Tensor, at::Tensor, at::Tensor> kappa_backward_cuda(const KappaProblem& problem,
                                                                   const at::Tensor& grad_kappa,
                                                                   const KappaState& state);

std::tuple<at::Tensor, at::Tensor> support_token_argmin_cuda(
    const at::Tensor& margins, const std::optional<at::Tensor>& key_padding_mask);

namespace cuda {

// The largest head dim the fused kernels take (q/k are padded to 64 or 128).
constexpr int64_t kMaxHeadDim = 128;

// Refuses inputs the device cannot run, and d > kMaxHeadDim, with an error
// naming the argument.
void check_core_inputs(const at::Tensor& q);

// Raises the kernel's dynamic shared-memory limit to smem bytes, refusing with
// a clear error on devices that cannot give that much to one block.
void set_smem_limit(const void* kernel, size_t smem, const char* what);

}  // namespace cuda
}  // namespace barrier_ops
