// CUDA registration of the fused ops: the device-generic kappa glue
// (csrc/kappa.cpp) with the CUDA cores, plus the CUDA argmin. token_margins
// and margin_barrier_loss are CompositeImplicitAutograd (barrier_ops/ops.py)
// and need no registration per device.
#include "cuda_cores.h"

#include <c10/cuda/CUDAGuard.h>

namespace barrier_ops {

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> kappa_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& w, double scale,
    c10::string_view causal, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& query_positions) {
  const c10::cuda::OptionalCUDAGuard device_guard(q.device());
  return kappa_with(&kappa_forward_cuda, q, k, w, scale, causal, key_padding_mask,
                    query_positions);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kappa_backward_cuda_op(
    const at::Tensor& grad_kappa, const at::Tensor& q, const at::Tensor& k, const at::Tensor& w,
    double scale, c10::string_view causal, const std::optional<at::Tensor>& key_padding_mask,
    const at::Tensor& kappa, const at::Tensor& lse, const at::Tensor& stats,
    const std::optional<at::Tensor>& query_positions) {
  const c10::cuda::OptionalCUDAGuard device_guard(q.device());
  return kappa_backward_with(&kappa_backward_cuda, grad_kappa, q, k, w, scale, causal,
                             key_padding_mask, kappa, lse, stats, query_positions);
}

}  // namespace

TORCH_LIBRARY_IMPL(barrier_ops, CUDA, m) {
  m.impl("kappa", &kappa_cuda);
  m.impl("kappa_backward", &kappa_backward_cuda_op);
  m.impl("support_token_argmin", &support_token_argmin_cuda);
}

}  // namespace barrier_ops
