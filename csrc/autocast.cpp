// Autocast for the margin ops: under torch.autocast every floating input (q,
// k, v and the coupling) is cast to the autocast dtype, as for SDPA, so mixed
// inputs such as bf16 activations with an fp32 coupling just work. The kernels
// accumulate in float32 whatever the input precision.
#include "barrier_ops.h"

#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>

namespace barrier_ops {

namespace {

template <c10::DeviceType device_type>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_margins_autocast(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& coupling, double scale, bool causal,
    const std::optional<at::Tensor>& key_padding_mask, bool combine_heads) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(device_type));
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("barrier_ops::token_margins", "")
                       .typed<decltype(token_margins_autocast<device_type>)>();
  const auto dtype = at::autocast::get_autocast_dtype(device_type);
  return op.call(at::autocast::cached_cast(dtype, q, device_type),
                 at::autocast::cached_cast(dtype, k, device_type),
                 at::autocast::cached_cast(dtype, v, device_type),
                 at::autocast::cached_cast(dtype, coupling, device_type), scale, causal,
                 key_padding_mask, combine_heads);
}

template <c10::DeviceType device_type>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> margin_barrier_loss_autocast(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& coupling, double scale, bool causal,
    const std::optional<at::Tensor>& key_padding_mask, bool combine_heads, double eps,
    c10::string_view reduction) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(device_type));
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("barrier_ops::margin_barrier_loss", "")
                       .typed<decltype(margin_barrier_loss_autocast<device_type>)>();
  const auto dtype = at::autocast::get_autocast_dtype(device_type);
  return op.call(at::autocast::cached_cast(dtype, q, device_type),
                 at::autocast::cached_cast(dtype, k, device_type),
                 at::autocast::cached_cast(dtype, v, device_type),
                 at::autocast::cached_cast(dtype, coupling, device_type), scale, causal,
                 key_padding_mask, combine_heads, eps, reduction);
}

}  // namespace

TORCH_LIBRARY_IMPL(barrier_ops, AutocastCPU, m) {
  m.impl("token_margins", &token_margins_autocast<c10::DeviceType::CPU>);
  m.impl("margin_barrier_loss", &margin_barrier_loss_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(barrier_ops, AutocastCUDA, m) {
  m.impl("token_margins", &token_margins_autocast<c10::DeviceType::CUDA>);
  m.impl("margin_barrier_loss", &margin_barrier_loss_autocast<c10::DeviceType::CUDA>);
}

}  // namespace barrier_ops
