// Shared declarations of barrier_ops' C++ side.
//
// Each public op (token_margins, margin_barrier_loss, token_margins_backward)
// has one device-generic implementation (*_with) that does the O(B*H*T*d)
// work with ATen ops (coupling GEMMs, GQA sums, the barrier psi) and calls a
// device "core" for the O(T^2) fused part. csrc/*.cpp registers it for CPU
// with the CPU cores; csrc/cuda/*.cu registers the same functions for CUDA
// with the CUDA cores, so a backend only adds its cores and argmin kernel.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

namespace barrier_ops {

// The fused forward core, per query head h of kv head h / (H / Hkv):
//   q [B, H, T, d], k [B, Hkv, T, d], w [B, H, T, d] (w = A_h v, already
//   coupled), all of one floating dtype; key_padding_mask: bool [B, T].
// Returns, in the accumulation dtype (float32, or float64 for float64 input),
// contiguous:
//   kappa [B, H, T]   (0 at invalid positions)
//   lse   [B, H, T]   row log-sum-exp of the scaled logits (-inf where invalid)
//   stats [B, H, T, 2d]  [kbar | wbar] (0 where invalid)
using KappaForwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor> (*)(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& w, double scale, bool causal,
    const std::optional<at::Tensor>& key_padding_mask);

// The fused backward core. grad_kappa (beta) [B, H, T] in the accumulation
// dtype; kappa, lse, stats as returned by the forward core. Returns, in the
// accumulation dtype: dq [B, H, T, d], dk per query head [B, H, T, d] (the
// caller sums the heads of a GQA group), dw [B, H, T, d].
using KappaBackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor> (*)(
    const at::Tensor& grad_kappa, const at::Tensor& q, const at::Tensor& k, const at::Tensor& w,
    const at::Tensor& kappa, const at::Tensor& lse, const at::Tensor& stats, double scale,
    bool causal, const std::optional<at::Tensor>& key_padding_mask);

// The CPU cores (csrc/token_margins.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor> kappa_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& w, double scale, bool causal,
    const std::optional<at::Tensor>& key_padding_mask);
std::tuple<at::Tensor, at::Tensor, at::Tensor> kappa_backward_cpu(
    const at::Tensor& grad_kappa, const at::Tensor& q, const at::Tensor& k, const at::Tensor& w,
    const at::Tensor& kappa, const at::Tensor& lse, const at::Tensor& stats, double scale,
    bool causal, const std::optional<at::Tensor>& key_padding_mask);

// Op: token_margins -> (margins, kappa, lse, stats)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_margins_with(
    KappaForwardFn core, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& coupling, double scale, bool causal,
    const std::optional<at::Tensor>& key_padding_mask, bool combine_heads);

// Op: margin_barrier_loss -> (loss, margins, kappa, lse, stats)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> margin_barrier_loss_with(
    KappaForwardFn core, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& coupling, double scale, bool causal,
    const std::optional<at::Tensor>& key_padding_mask, bool combine_heads, double eps,
    c10::string_view reduction);

// Op: token_margins_backward -> (dq, dk, dv, dcoupling); dcoupling is an
// empty tensor when coupling is None.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_margins_backward_with(
    KappaBackwardFn core, const at::Tensor& grad_kappa, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const std::optional<at::Tensor>& coupling, double scale, bool causal,
    const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& kappa,
    const at::Tensor& lse, const at::Tensor& stats);

// Argument checks shared by every backend (TORCH_CHECK_VALUE / _TYPE, so
// Python sees ValueError / TypeError naming the argument).
void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& coupling,
                            const std::optional<at::Tensor>& key_padding_mask, double scale);
void check_margins_and_mask(const at::Tensor& margins,
                            const std::optional<at::Tensor>& key_padding_mask);

// Checks the saved forward state handed to a backward core; shared so every
// backend validates the same contract.
void check_saved_state(const at::Tensor& grad_kappa, const at::Tensor& q, const at::Tensor& kappa,
                       const at::Tensor& lse, const at::Tensor& stats);

// support_token_argmin's device-independent part, shared by every backend:
// checked, contiguous inputs and the outputs, one row per [b] or [b, h].
struct ArgminRows {
  at::Tensor margins;  // contiguous [B, T] or [B, H, T]
  at::Tensor mask;     // contiguous bool [B, T], or undefined
  at::Tensor indices;  // int64, margins.shape[:-1]
  at::Tensor values;   // margins' dtype, margins.shape[:-1]
  int64_t rows, heads, T;
};
ArgminRows prepare_argmin_rows(const at::Tensor& margins,
                               const std::optional<at::Tensor>& key_padding_mask);

inline at::ScalarType accumulation_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace barrier_ops
