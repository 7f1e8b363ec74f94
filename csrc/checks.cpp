// Argument checks shared by every op and backend. They mirror
// barrier_ops/_checks.py so that direct torch.ops calls fail as clearly as
// the Python API: ValueError for shapes and values, TypeError for dtypes.
#include "barrier_ops.h"

#include <cmath>

namespace barrier_ops {

namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

void check_mask(const std::optional<at::Tensor>& key_padding_mask, int64_t B, int64_t T,
                const at::Device& device, const char* reference_name) {
  if (!key_padding_mask.has_value()) return;
  const at::Tensor& mask = *key_padding_mask;
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool,
                   "key_padding_mask must be a bool tensor (True = real token), got ",
                   mask.scalar_type());
  TORCH_CHECK_VALUE(mask.dim() == 2 && mask.size(0) == B && mask.size(1) == T,
                    "key_padding_mask must have shape [B, T]=[", B, ", ", T, "], got ",
                    mask.sizes());
  TORCH_CHECK_VALUE(mask.device() == device, "key_padding_mask must be on ", reference_name,
                    "'s device ", device, ", got ", mask.device());
}

// The row set: int64 [B, R] on q's device. Its values are checked by the CPU
// core (check_positions_in_range in csrc/cpu/kappa_cpu.cpp: every value in
// [-1, T)); on CUDA that check would cost a device sync, and the kernels
// treat any value outside [0, T) as an empty slot instead, so a bad value
// cannot read out of bounds there either.
void check_query_positions(const std::optional<at::Tensor>& query_positions,
                           const at::Tensor& q) {
  if (!query_positions.has_value()) return;
  const at::Tensor& positions = *query_positions;
  TORCH_CHECK_TYPE(positions.scalar_type() == at::kLong,
                   "query_positions must be an int64 tensor of query positions, got ",
                   positions.scalar_type());
  TORCH_CHECK_VALUE(positions.dim() == 2 && positions.size(0) == q.size(0) &&
                        positions.size(1) == q.size(2),
                    "query_positions must have shape [B, R]=[", q.size(0), ", ", q.size(2),
                    "] (R = q.size(2), the number of query rows), got ", positions.sizes());
  TORCH_CHECK_VALUE(positions.device() == q.device(), "query_positions must be on q's device ",
                    q.device(), ", got ", positions.device());
}

}  // namespace

void check_kappa_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w,
                        double scale, const std::optional<at::Tensor>& key_padding_mask,
                        const std::optional<at::Tensor>& query_positions) {
  const std::pair<const char*, const at::Tensor*> named[] = {{"q", &q}, {"k", &k}, {"w", &w}};
  for (const auto& [name, t] : named) {
    TORCH_CHECK_VALUE(t->dim() == 4, name,
                      " must have 4 dimensions (SDPA layout [B, H, T, d]), got shape ",
                      t->sizes());
    TORCH_CHECK_TYPE(is_supported_float(t->scalar_type()), name,
                     " must be float32, float64, bfloat16 or float16, got ", t->scalar_type());
  }
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && w.scalar_type() == q.scalar_type(),
                   "q, k and w must share one dtype, got q ", q.scalar_type(), ", k ",
                   k.scalar_type(), ", w ", w.scalar_type());
  TORCH_CHECK_VALUE(k.device() == q.device() && w.device() == q.device(),
                    "q, k and w must be on one device, got q on ", q.device(), ", k on ",
                    k.device(), ", w on ", w.device());
  // kappa takes k and w per query head: grouped-query callers expand k first.
  // With a row set q has R rows (the gathered queries) and k, w keep T.
  if (!query_positions.has_value()) {
    TORCH_CHECK_VALUE(k.sizes() == q.sizes() && w.sizes() == q.sizes(),
                      "q, k and w must have one shape [B, H, T, d] (k and w one slice per query "
                      "head), got q ", q.sizes(), ", k ", k.sizes(), ", w ", w.sizes());
  } else {
    TORCH_CHECK_VALUE(w.sizes() == k.sizes() && k.size(0) == q.size(0) &&
                          k.size(1) == q.size(1) && k.size(3) == q.size(3),
                      "with query_positions, q must be [B, H, R, d] and k, w one shape "
                      "[B, H, T, d] (k and w one slice per query head), got q ",
                      q.sizes(), ", k ", k.sizes(), ", w ", w.sizes());
  }
  TORCH_CHECK_VALUE(q.size(3) >= 1, "the head dim d must be at least 1");
  check_mask(key_padding_mask, k.size(0), k.size(2), q.device(), "q");
  check_query_positions(query_positions, q);
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0.0, "scale must be a finite number > 0, got ",
                    scale);
}

void check_margins_and_mask(const at::Tensor& margins,
                            const std::optional<at::Tensor>& key_padding_mask) {
  TORCH_CHECK_TYPE(at::isFloatingType(margins.scalar_type()),
                   "margins must be a floating-point tensor, got ", margins.scalar_type());
  TORCH_CHECK_VALUE(margins.dim() == 2 || margins.dim() == 3,
                    "margins must be [B, T] or [B, H, T], got shape ", margins.sizes());
  check_mask(key_padding_mask, margins.size(0), margins.size(-1), margins.device(), "margins");
}

void check_saved_state(const at::Tensor& grad_kappa, const at::Tensor& q, const at::Tensor& kappa,
                       const at::Tensor& lse, const at::Tensor& stats) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), d = q.size(3);
  const auto acc = accumulation_dtype(q.scalar_type());
  const std::pair<const char*, const at::Tensor*> per_token[] = {
      {"grad_kappa", &grad_kappa}, {"kappa", &kappa}, {"lse", &lse}};
  for (const auto& [name, t] : per_token) {
    TORCH_CHECK_VALUE(t->dim() == 3 && t->size(0) == B && t->size(1) == H && t->size(2) == T,
                      name, " must have shape [B, H, R]=[", B, ", ", H, ", ", T,
                      "] (R = q.size(2)), got ",
                      t->sizes());
    TORCH_CHECK_VALUE(t->device() == q.device(), name, " must be on q's device ", q.device(),
                      ", got ", t->device());
  }
  TORCH_CHECK_VALUE(stats.dim() == 4 && stats.size(0) == B && stats.size(1) == H &&
                        stats.size(2) == T && stats.size(3) == 2 * d,
                    "stats must have shape [B, H, R, 2d]=[", B, ", ", H, ", ", T, ", ", 2 * d,
                    "], got ", stats.sizes());
  TORCH_CHECK_VALUE(stats.device() == q.device(), "stats must be on q's device ", q.device(),
                    ", got ", stats.device());
  const std::pair<const char*, const at::Tensor*> saved[] = {
      {"kappa", &kappa}, {"lse", &lse}, {"stats", &stats}};
  for (const auto& [name, t] : saved) {
    TORCH_CHECK_TYPE(t->scalar_type() == acc, name, " must have the accumulation dtype ", acc,
                     " of the forward, got ", t->scalar_type());
  }
  TORCH_CHECK_TYPE(at::isFloatingType(grad_kappa.scalar_type()),
                   "grad_kappa must be floating point, got ", grad_kappa.scalar_type());
}

}  // namespace barrier_ops
