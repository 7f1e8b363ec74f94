// support_token_argmin: the smallest margin over the token dimension, valid
// positions only. One pass per row, ties to the smallest index, -1 / +inf for
// a row with no valid position. NaN margins are skipped like padding, so one
// bad value cannot hide the real support token.
#include "barrier_ops.h"

#include <cmath>
#include <limits>

namespace barrier_ops {

ArgminRows prepare_argmin_rows(const at::Tensor& margins,
                               const std::optional<at::Tensor>& key_padding_mask) {
  check_margins_and_mask(margins, key_padding_mask);
  const auto row_shape = margins.sizes().slice(0, margins.dim() - 1);
  const int64_t heads = margins.dim() == 3 ? margins.size(1) : 1;
  return ArgminRows{
      margins.contiguous(),
      key_padding_mask.has_value() ? key_padding_mask->contiguous() : at::Tensor(),
      at::empty(row_shape, margins.options().dtype(at::kLong)),
      at::empty(row_shape, margins.options()),
      margins.size(0) * heads,
      heads,
      margins.size(-1)};
}

}  // namespace barrier_ops
