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

// Per-row helper shared by forward and backward (kappa_forward.cu):
// g[b,h,t] = <k[b,h,t], w[b,h,t]>, and when stats is defined also
// hbar = kappa / scale - <kbar, wbar> and beta_c = beta * scale at active
// rows (finite lse, beta != 0), else 0. All outputs [B, H, T] in acc dtype.
void launch_row_prep(const at::Tensor& k, const at::Tensor& w, const at::Tensor& stats,
                     const at::Tensor& kappa, const at::Tensor& lse, const at::Tensor& beta,
                     double scale, at::Tensor& g, at::Tensor& hbar, at::Tensor& beta_c);

// Refuses inputs the device cannot run, and d > kMaxHeadDim, with an error
// naming the argument.
void check_core_inputs(const at::Tensor& q);

// Raises the kernel's dynamic shared-memory limit to smem bytes, refusing with
// a clear error on devices that cannot give that much to one block.
void set_smem_limit(const void* kernel, size_t smem, const char* what);

}  // namespace cuda
}  // namespace barrier_ops
