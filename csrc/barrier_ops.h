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
//   k, w: [B, H, T, d], one floating dtype, one device (one slice per query
//         head; w = A_h v is already coupled)
//   q:    [B, H, R, d]: query row r of sequence b is the query at position
//         row_position(b, r); without a row set R = T and row r is position r
//   key_padding_mask: bool [B, T] (True = real token) or undefined
//   query_positions:  int64 [B, R] or undefined (no row set). Entry [b, r] is
//         a position in [0, T), or anything else (-1 by convention) for an
//         empty slot: no query, kappa 0, lse -inf, stats 0, no gradient. Any
//         order and repeats are allowed; the cores are fastest when each row
//         is ascending (a query block's keys end at its largest position).
//         Causality compares a key index with the row's position, and a row
//         at a padded position is no query.
struct KappaProblem {
  at::Tensor q, k, w;
  double scale;
  CausalMode causal;
  at::Tensor key_padding_mask;  // undefined when there is none
  at::Tensor query_positions;   // undefined when there is no row set

  int64_t B() const { return q.size(0); }
  int64_t H() const { return q.size(1); }
  int64_t T() const { return k.size(2); }  // keys (and positions)
  int64_t R() const { return q.size(2); }  // query rows (T without a row set)
  int64_t d() const { return q.size(3); }
  bool has_row_set() const { return query_positions.defined(); }
  const bool* mask_ptr() const {
    return key_padding_mask.defined() ? key_padding_mask.const_data_ptr<bool>() : nullptr;
  }
  // [B, R] positions, or nullptr without a row set (see row_position).
  const int64_t* positions_ptr() const {
    return query_positions.defined() ? query_positions.const_data_ptr<int64_t>() : nullptr;
  }
  // Position of query row r of sequence b (host tensors only): r without a row set.
  int64_t row_position(int64_t b, int64_t r) const {
    const int64_t* positions = positions_ptr();
    return positions == nullptr ? r : positions[b * R() + r];
  }
};

// The hot-loop form of KappaProblem::row_position: positions_row is the row
// set of one sequence ([R]) or nullptr.
inline int64_t row_position(const int64_t* positions_row, int64_t r) {
  return positions_row == nullptr ? r : positions_row[r];
}

// The forward's results, all in the accumulation dtype (float32, or float64
// for float64 inputs), contiguous:
//   kappa [B, H, R]      0 at rows with no allowed key, a padded position or
//                        an empty slot
//   lse   [B, H, R]      row log-sum-exp of the scaled logits, -inf there
//   stats [B, H, R, 2d]  [kbar | wbar], 0 there
// Validity is structural (a real query with a real allowed key), never read
// from the results: at a valid position NaN/inf inputs give NaN (kappa, lse
// or stats), so they reach the loss; the backward treats lse == -inf, and only
// that, as "no gradient".
struct KappaState {
  at::Tensor kappa, lse, stats;
};

// The fused cores. The backward takes beta = dL/dkappa [B, H, R] in the
// accumulation dtype and returns dq [B, H, R, d], dk, dw [B, H, T, d] in the
// accumulation dtype.
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
    double scale, c10::string_view causal, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& query_positions);
std::tuple<at::Tensor, at::Tensor, at::Tensor> kappa_backward_with(
    KappaBackwardFn core, const at::Tensor& grad_kappa, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& w, double scale, c10::string_view causal,
    const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& kappa,
    const at::Tensor& lse, const at::Tensor& stats,
    const std::optional<at::Tensor>& query_positions);

// Argument checks (TORCH_CHECK_VALUE / _TYPE, so Python sees ValueError /
// TypeError naming the argument), csrc/checks.cpp.
void check_kappa_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w,
                        double scale, const std::optional<at::Tensor>& key_padding_mask,
                        const std::optional<at::Tensor>& query_positions);
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
