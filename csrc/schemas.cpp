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
//
// query_positions (kappa, kappa_backward, margin_barrier_loss; default None):
// an optional row set, int64 [B, R]. Entry [b, r] is a query position in
// [0, T) of sequence b, or -1 for an empty slot; any order and repeats are
// correct. With a row set q is [B, H, R, d] (row r of batch b is the query at
// position query_positions[b, r], already gathered by the caller; k, w stay
// [B, H, T, d]), kappa/lse/stats/grad_kappa/dq have R rows and dk, dw keep T.
// Causality compares a key index with the row's position; a row at a padded
// position or an empty slot is no query (kappa 0, lse -inf, stats 0, dq 0, no
// contribution to dk, dw). The CPU kernels refuse values outside [-1, T); the
// CUDA kernels treat them as empty slots (checking them would cost a device
// sync), so no value can read out of bounds. None: R = T, row r is position r.
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
      "kappa(Tensor q, Tensor k, Tensor w, float scale, str causal, Tensor? key_padding_mask, "
      "Tensor? query_positions=None) -> (Tensor kappa, Tensor lse, Tensor stats)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "kappa_backward(Tensor grad_kappa, Tensor q, Tensor k, Tensor w, float scale, str causal, "
      "Tensor? key_padding_mask, Tensor kappa, Tensor lse, Tensor stats, "
      "Tensor? query_positions=None) -> (Tensor dq, Tensor dk, Tensor dw)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "token_margins(Tensor q, Tensor k, Tensor v, Tensor? coupling, float scale, str causal, "
      "Tensor? key_padding_mask, bool combine_heads, str backend) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "margin_barrier_loss(Tensor q, Tensor k, Tensor v, Tensor? coupling, float scale, "
      "str causal, Tensor? key_padding_mask, bool combine_heads, float eps, "
      "float? target_margin, str reduction, str backend, Tensor? query_positions=None) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def("support_token_argmin(Tensor margins, Tensor? key_padding_mask) -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
}

}  // namespace barrier_ops
