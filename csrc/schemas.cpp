// Every op schema of barrier_ops, in one place.
//
//   kappa, kappa_backward   the O(T^2) core: fused CPU/CUDA kernels (csrc/kappa.cpp,
//                           csrc/cpu/, csrc/cuda/); fake kernel and autograd in
//                           barrier_ops/_kappa.py
//   token_margins,          CompositeImplicitAutograd over kappa (or over PyTorch's
//   margin_barrier_loss     scaled_dot_product_attention, backend="sdpa"): ATen ops
//                           in barrier_ops/ops.py, gradients derived by autograd
//   support_token_argmin    fused CPU/CUDA kernels, not differentiable
//
// causal is "none" | "inclusive" | "strict"; backend is "auto" | "fused" | "sdpa".
#include "barrier_ops.h"

namespace barrier_ops {

CausalMode parse_causal(c10::string_view causal) {
  if (causal == "none") return CausalMode::kNone;
  if (causal == "inclusive") return CausalMode::kInclusive;
  if (causal == "strict") return CausalMode::kStrict;
  TORCH_CHECK_VALUE(false, "causal must be 'none', 'inclusive' or 'strict', got '", causal, "'");
}

TORCH_LIBRARY(barrier_ops, m) {
  m.def(
      "kappa(Tensor q, Tensor k, Tensor w, float scale, str causal, Tensor? key_padding_mask) "
      "-> (Tensor kappa, Tensor lse, Tensor stats)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "kappa_backward(Tensor grad_kappa, Tensor q, Tensor k, Tensor w, float scale, str causal, "
      "Tensor? key_padding_mask, Tensor kappa, Tensor lse, Tensor stats) "
      "-> (Tensor dq, Tensor dk, Tensor dw)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "token_margins(Tensor q, Tensor k, Tensor v, Tensor? coupling, float scale, str causal, "
      "Tensor? key_padding_mask, bool combine_heads, str backend) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "margin_barrier_loss(Tensor q, Tensor k, Tensor v, Tensor? coupling, float scale, "
      "str causal, Tensor? key_padding_mask, bool combine_heads, float eps, "
      "float? target_margin, str reduction, str backend) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def("support_token_argmin(Tensor margins, Tensor? key_padding_mask) -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
}

}  // namespace barrier_ops
