// Shared declarations of barrier_ops' C++ side.
//
// The only O(T^2) work of the library is kappa (shared/spec/barrier-math.md):
// one op, `barrier_ops::kappa`, and its backward. Each device provides a
// forward and a backward "core" with the signatures below; csrc/kappa.cpp
// checks the arguments once, builds a KappaProblem and hands it to the core
// of the inputs' device. Everything around kappa (w = A v, GQA, margins, the
// barrier psi, reductions, valid positions) is ATen in barrier_ops/ops.py,
// and autograd derives its gradients.
//
// Where things live:
//   csrc/schemas.cpp             every op schema, in one place
//   csrc/kappa.cpp               kappa op glue + CPU registration
//   csrc/cpu/kappa_cpu.cpp       the fused CPU cores
//   csrc/cuda/kappa_*.cu         the fused CUDA cores (launch code + kernels)
//   csrc/support_token_argmin.cpp, csrc/cpu/, csrc/cuda/support_token_argmin.cu
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

namespace barrier_ops {

// Which keys a query may attend to. Spelled "none" / "inclusive" / "strict"
// in the op schemas (see parse_causal).
//   kNone:      every key
//   kInclusive: s <= t (GPT-style causal attention)
//   kStrict:    s < t  (the paper's strictly-past attention; t = 0 has no key)
enum class CausalMode : int64_t { kNone = 0, kInclusive = 1, kStrict = 2 };

CausalMode parse_causal(c10::string_view causal);

// Number of keys s with s < this bound that query t may see under `mode`,
// before the key padding mask: T for kNone, t + 1 for kInclusive, t for kStrict.
inline int64_t causal_key_end(CausalMode mode, int64_t t, int64_t T) {
  switch (mode) {
    case CausalMode::kNone:
      return T;
    case CausalMode::kInclusive:
      return t + 1;
    case CausalMode::kStrict:
      return t;
  }
  return T;
}

// One kappa problem, the params struct shared by every core.
//   q, k, w: [B, H, T, d], one floating dtype, one device (k and w already one
//            slice per query head; w = A_h v is already coupled)
//   key_padding_mask: bool [B, T] (True = real token) or undefined
struct KappaProblem {
  at::Tensor q, k, w;
  double scale;
  CausalMode causal;
  at::Tensor key_padding_mask;  // undefined when there is none

  int64_t B() const { return q.size(0); }
  int64_t H() const { return q.size(1); }
  int64_t T() const { return q.size(2); }
  int64_t d() const { return q.size(3); }
  const bool* mask_ptr() const {
    return key_padding_mask.defined() ? key_padding_mask.const_data_ptr<bool>() : nullptr;
  }
};

// The forward's results, all in the accumulation dtype (float32, or float64
// for float64 inputs), contiguous:
//   kappa [B, H, T]      0 at positions with no allowed key or a padded query
//   lse   [B, H, T]      row log-sum-exp of the scaled logits, -inf there
//   stats [B, H, T, 2d]  [kbar | wbar], 0 there
// Validity is structural (a real query with a real allowed key), never read
// from the results: at a valid position NaN/inf inputs give NaN (kappa, lse
// or stats), so they reach the loss; the backward treats lse == -inf, and only
// that, as "no gradient".
struct KappaState {
  at::Tensor kappa, lse, stats;
};

// The fused cores. The backward takes beta = dL/dkappa [B, H, T] in the
// accumulation dtype and returns dq, dk, dw [B, H, T, d] in the accumulation
// dtype.
using KappaForwardFn = KappaState (*)(const KappaProblem& problem);
using KappaBackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor> (*)(
    const KappaProblem& problem, const at::Tensor& grad_kappa, const KappaState& state);

// The CPU cores (csrc/cpu/kappa_cpu.cpp).
KappaState kappa_forward_cpu(const KappaProblem& problem);
std::tuple<at::Tensor, at::Tensor, at::Tensor> kappa_backward_cpu(const KappaProblem& problem,
                                                                  const at::Tensor& grad_kappa,
                                                                  const KappaState& state);

// The op glue shared by every device (csrc/kappa.cpp): checks the arguments,
// builds the problem (contiguous inputs) and calls the core.
std::tuple<at::Tensor, at::Tensor, at::Tensor> kappa_with(
    KappaForwardFn core, const at::Tensor& q, const at::Tensor& k, const at::Tensor& w,
    double scale, c10::string_view causal, const std::optional<at::Tensor>& key_padding_mask);
std::tuple<at::Tensor, at::Tensor, at::Tensor> kappa_backward_with(
    KappaBackwardFn core, const at::Tensor& grad_kappa, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& w, double scale, c10::string_view causal,
    const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& kappa,
    const at::Tensor& lse, const at::Tensor& stats);

// Argument checks (TORCH_CHECK_VALUE / _TYPE, so Python sees ValueError /
// TypeError naming the argument), csrc/checks.cpp.
void check_kappa_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w,
                        double scale, const std::optional<at::Tensor>& key_padding_mask);
void check_margins_and_mask(const at::Tensor& margins,
                            const std::optional<at::Tensor>& key_padding_mask);
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
