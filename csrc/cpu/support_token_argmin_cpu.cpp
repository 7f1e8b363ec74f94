// The fused CPU kernel of support_token_argmin: one pass per row over the
// token dimension (prologue shared with CUDA: prepare_argmin_rows).
#include "barrier_ops.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

namespace barrier_ops {

namespace {

std::tuple<at::Tensor, at::Tensor> support_token_argmin_cpu(
    const at::Tensor& margins, const std::optional<at::Tensor>& key_padding_mask) {
  const ArgminRows p = prepare_argmin_rows(margins, key_padding_mask);
  const at::Tensor &m = p.margins, &mask = p.mask, &indices = p.indices, &values = p.values;
  const int64_t rows = p.rows, heads = p.heads, T = p.T;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, m.scalar_type(),
                                  "support_token_argmin_cpu", [&] {
    const scalar_t* mp = m.data_ptr<scalar_t>();
    const bool* mask_ptr = mask.defined() ? mask.data_ptr<bool>() : nullptr;
    int64_t* ip = indices.data_ptr<int64_t>();
    scalar_t* vp = values.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = mp + r * T;
        const bool* mask_row = mask_ptr ? mask_ptr + (r / heads) * T : nullptr;
        int64_t best = -1;
        double best_value = std::numeric_limits<double>::infinity();
        for (int64_t t = 0; t < T; ++t) {
          if (mask_row && !mask_row[t]) continue;
          const double x = static_cast<double>(row[t]);
          // Strict < keeps the first index on ties; NaN never compares less.
          if (x < best_value || (best < 0 && x == best_value)) {
            best = t;
            best_value = x;
          }
        }
        ip[r] = best;
        vp[r] = static_cast<scalar_t>(best_value);
      }
    });
  });
  return {indices, values};
}

}  // namespace

TORCH_LIBRARY_IMPL(barrier_ops, CPU, m) {
  m.impl("support_token_argmin", &support_token_argmin_cpu);
}

}  // namespace barrier_ops
