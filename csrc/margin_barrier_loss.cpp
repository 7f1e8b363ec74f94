// margin_barrier_loss: the fused margin forward followed by the smooth
// log-barrier psi and the reduction over valid positions. Its backward is the
// token_margins backward with beta = -psi'(m) * dL/dloss (barrier_ops/ops.py).
#include "barrier_ops.h"

#include <cmath>

namespace barrier_ops {

namespace {

// psi(m) = -log m for m >= eps, else the C2 quadratic continuation at eps, so
// margins past the degeneracy boundary give a large but finite value.
at::Tensor smooth_log_barrier(const at::Tensor& m, double eps) {
  const at::Tensor log_branch = at::log(at::clamp_min(m, eps)).neg_();
  const at::Tensor t = (m - eps) / eps;
  const at::Tensor quad_branch = (0.5 * t - 1.0) * t - std::log(eps);
  return at::where(m >= eps, log_branch, quad_branch);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> margin_barrier_loss_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& coupling, double scale, bool causal,
    const std::optional<at::Tensor>& key_padding_mask, bool combine_heads, double eps,
    c10::string_view reduction) {
  return margin_barrier_loss_with(&kappa_forward_cpu, q, k, v, coupling, scale, causal,
                                  key_padding_mask, combine_heads, eps, reduction);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> margin_barrier_loss_with(
    KappaForwardFn core, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& coupling, double scale, bool causal,
    const std::optional<at::Tensor>& key_padding_mask, bool combine_heads, double eps,
    c10::string_view reduction) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0.0, "eps must be a finite number > 0, got ", eps);
  TORCH_CHECK_VALUE(reduction == "mean" || reduction == "sum" || reduction == "none",
                    "reduction must be one of 'mean', 'sum', 'none', got '", reduction, "'");
  auto [margins, kappa, lse, stats] = token_margins_with(core, q, k, v, coupling, scale, causal,
                                                         key_padding_mask, combine_heads);
  // The forward core marks invalid positions with lse = -inf; with
  // combine_heads every head shares one validity, so head 0 speaks for all.
  const at::Tensor valid = combine_heads ? at::isfinite(lse.select(1, 0)) : at::isfinite(lse);
  at::Tensor barrier = at::where(valid, smooth_log_barrier(margins, eps), at::zeros_like(margins));
  at::Tensor loss;
  if (reduction == "none") {
    loss = barrier;
  } else if (reduction == "sum") {
    loss = barrier.sum();
  } else {
    // No valid position (all padding) gives 0, not 0/0.
    loss = barrier.sum() / at::clamp_min(valid.sum(), 1).to(barrier.scalar_type());
  }
  return {loss, margins, kappa, lse, stats};
}

TORCH_LIBRARY_FRAGMENT(barrier_ops, m) {
  m.def(
      "margin_barrier_loss(Tensor q, Tensor k, Tensor v, Tensor? coupling, float scale, "
      "bool causal, Tensor? key_padding_mask, bool combine_heads, float eps, str reduction) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(barrier_ops, CPU, m) { m.impl("margin_barrier_loss", &margin_barrier_loss_cpu); }

}  // namespace barrier_ops
