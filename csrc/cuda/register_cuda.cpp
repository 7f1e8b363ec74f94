// CUDA registration of every barrier_ops op: the device-generic *_with
// implementations (csrc/*.cpp) with the CUDA cores, plus the CUDA argmin.
// The guard makes the ATen work around the cores (coupling GEMMs, GQA sums,
// the barrier) run on the inputs' device too.
#include "cuda_cores.h"

#include <c10/cuda/CUDAGuard.h>

namespace barrier_ops {

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_margins_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& coupling, double scale, bool causal,
    const std::optional<at::Tensor>& key_padding_mask, bool combine_heads) {
  const c10::cuda::OptionalCUDAGuard device_guard(q.device());
  return token_margins_with(&kappa_forward_cuda, q, k, v, coupling, scale, causal,
                            key_padding_mask, combine_heads);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> margin_barrier_loss_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& coupling, double scale, bool causal,
    const std::optional<at::Tensor>& key_padding_mask, bool combine_heads, double eps,
    c10::string_view reduction) {
  const c10::cuda::OptionalCUDAGuard device_guard(q.device());
  return margin_barrier_loss_with(&kappa_forward_cuda, q, k, v, coupling, scale, causal,
                                  key_padding_mask, combine_heads, eps, reduction);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_margins_backward_cuda(
    const at::Tensor& grad_kappa, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& coupling, double scale, bool causal,
    const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& kappa,
    const at::Tensor& lse, const at::Tensor& stats) {
  const c10::cuda::OptionalCUDAGuard device_guard(q.device());
  return token_margins_backward_with(&kappa_backward_cuda, grad_kappa, q, k, v, coupling, scale,
                                     causal, key_padding_mask, kappa, lse, stats);
}

}  // namespace

TORCH_LIBRARY_IMPL(barrier_ops, CUDA, m) {
  m.impl("token_margins", &token_margins_cuda);
  m.impl("margin_barrier_loss", &margin_barrier_loss_cuda);
  m.impl("token_margins_backward", &token_margins_backward_cuda);
  m.impl("support_token_argmin", &support_token_argmin_cuda);
}

}  // namespace barrier_ops
