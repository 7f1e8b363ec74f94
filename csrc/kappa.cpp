// The kappa op's glue, shared by every device: argument checks, one
// KappaProblem with contiguous inputs, the core of the device. Registers the
// CPU cores; csrc/cuda/register_cuda.cpp registers the CUDA ones.
#include "barrier_ops.h"

namespace barrier_ops {

namespace {

KappaProblem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w,
                          double scale, c10::string_view causal,
                          const std::optional<at::Tensor>& key_padding_mask,
                          const std::optional<at::Tensor>& query_positions) {
  check_kappa_inputs(q, k, w, scale, key_padding_mask, query_positions);
  return KappaProblem{q.contiguous(),
                      k.contiguous(),
                      w.contiguous(),
                      scale,
                      parse_causal(causal),
                      key_padding_mask.has_value() ? key_padding_mask->contiguous()
                                                   : at::Tensor(),
                      query_positions.has_value() ? query_positions->contiguous()
                                                  : at::Tensor()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kappa_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& w, double scale,
    c10::string_view causal, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& query_positions) {
  return kappa_with(&kappa_forward_cpu, q, k, w, scale, causal, key_padding_mask,
                    query_positions);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kappa_backward_cpu_op(
    const at::Tensor& grad_kappa, const at::Tensor& q, const at::Tensor& k, const at::Tensor& w,
    double scale, c10::string_view causal, const std::optional<at::Tensor>& key_padding_mask,
    const at::Tensor& kappa, const at::Tensor& lse, const at::Tensor& stats,
    const std::optional<at::Tensor>& query_positions) {
  return kappa_backward_with(&kappa_backward_cpu, grad_kappa, q, k, w, scale, causal,
                             key_padding_mask, kappa, lse, stats, query_positions);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> kappa_with(
    KappaForwardFn core, const at::Tensor& q, const at::Tensor& k, const at::Tensor& w,
    double scale, c10::string_view causal, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& query_positions) {
  const KappaProblem problem =
      make_problem(q, k, w, scale, causal, key_padding_mask, query_positions);
  KappaState state = core(problem);
  return {state.kappa, state.lse, state.stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kappa_backward_with(
    KappaBackwardFn core, const at::Tensor& grad_kappa, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& w, double scale, c10::string_view causal,
    const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& kappa,
    const at::Tensor& lse, const at::Tensor& stats,
    const std::optional<at::Tensor>& query_positions) {
  const KappaProblem problem =
      make_problem(q, k, w, scale, causal, key_padding_mask, query_positions);
  check_saved_state(grad_kappa, q, kappa, lse, stats);
  const auto acc = accumulation_dtype(q.scalar_type());
  const KappaState state{kappa.contiguous(), lse.contiguous(), stats.contiguous()};
  auto [dq, dk, dw] = core(problem, grad_kappa.to(acc).contiguous(), state);
  // Gradients in the inputs' dtypes, as autograd expects.
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dw.to(w.scalar_type())};
}

TORCH_LIBRARY_IMPL(barrier_ops, CPU, m) {
  m.impl("kappa", &kappa_cpu);
  m.impl("kappa_backward", &kappa_backward_cpu_op);
}

}  // namespace barrier_ops
