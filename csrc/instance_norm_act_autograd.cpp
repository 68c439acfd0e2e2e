// Fused InstanceNorm + activation: the op schemas and their autograd, for every device.
//
//   inorm_act_fwd(x, weight?, bias?, eps, act, slope) -> (y, mean, rstd)
//   inorm_act_bwd(grad_y, x, weight?, bias?, mean, rstd, act, slope) -> (grad_x, grad_weight, grad_bias)
//
// mean and rstd are (N, C) in the accumulation type (float, or double for double x). grad_weight and
// grad_bias are (C,) in that type and are always returned (per-plane sums the backward needs anyway);
// the autograd below drops them when the op is not affine. A channels_last-contiguous x runs the NHWC
// kernels and gets channels_last y and dx; any other layout runs the NCHW kernels on an NCHW copy.
//
// The kernels are registered per device (CPU: instance_norm_act.cpp, CUDA: instance_norm_act_cuda.cu);
// the autograd is registered here, once, at the Autograd key, which covers every device. It is C++ so
// that a training step pays one dispatcher call per norm: a Python autograd formula
// (torch.library.register_autograd) cost about 40 us a call on the CPU. The op saves x (not y) and the
// backward recomputes y_pre from it: see reference/instance_norm_act.py. melano/ops/__init__.py adds
// the fake (meta) implementations that torch.compile and opcheck trace with.

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>

namespace melano {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensors3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

Tensors3 call_forward(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                      const c10::optional<at::Tensor>& bias, double eps, c10::string_view act, double slope) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("melano::inorm_act_fwd", "")
                             .typed<Tensors3(const at::Tensor&, const c10::optional<at::Tensor>&,
                                             const c10::optional<at::Tensor>&, double, c10::string_view, double)>();
  return op.call(x, weight, bias, eps, act, slope);
}

Tensors3 call_backward(const at::Tensor& grad_y, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                       const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd,
                       c10::string_view act, double slope) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("melano::inorm_act_bwd", "")
                             .typed<Tensors3(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                             const c10::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                                             c10::string_view, double)>();
  return op.call(grad_y, x, weight, bias, mean, rstd, act, slope);
}

c10::optional<at::Tensor> present(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

// y = inorm_act_fwd(...)[0] is differentiable in x, weight and bias; mean and rstd are not.
struct ForwardFunction : public torch::autograd::Function<ForwardFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                               const c10::optional<at::Tensor>& bias, double eps, c10::string_view act,
                               double slope) {
    at::AutoDispatchBelowADInplaceOrView below;  // the device kernel (or the fake one under torch.compile)
    auto [y, mean, rstd] = call_forward(x, weight, bias, eps, act, slope);
    ctx->save_for_backward({x, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()), mean, rstd});
    ctx->saved_data["act"] = std::string(act);
    ctx->saved_data["slope"] = slope;
    ctx->mark_non_differentiable({mean, rstd});
    return {y, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1], &b = saved[2];
    auto [dx, dw, db] = call_backward(grads[0], x, present(w), present(b), saved[3], saved[4],
                                      ctx->saved_data["act"].toStringRef(), ctx->saved_data["slope"].toDouble());
    return {dx, w.defined() ? dw.to(w.scalar_type()) : at::Tensor(), b.defined() ? db.to(b.scalar_type()) : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The backward op is not differentiable itself: a clear error if a double backward reaches it.
struct BackwardFunction : public torch::autograd::Function<BackwardFunction> {
  static variable_list forward(AutogradContext*, const at::Tensor& grad_y, const at::Tensor& x,
                               const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                               const at::Tensor& mean, const at::Tensor& rstd, c10::string_view act, double slope) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [dx, dw, db] = call_backward(grad_y, x, weight, bias, mean, rstd, act, slope);
    return {dx, dw, db};
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK_NOT_IMPLEMENTED(false, "melano.ops.instance_norm_act has no double backward (create_graph=True "
                                "through it); use MELANO_OPS=eager for that");
  }
};

Tensors3 forward_autograd(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                          const c10::optional<at::Tensor>& bias, double eps, c10::string_view act, double slope) {
  const auto out = ForwardFunction::apply(x, weight, bias, eps, act, slope);
  return {out[0], out[1], out[2]};
}

Tensors3 backward_autograd(const at::Tensor& grad_y, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                           const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd,
                           c10::string_view act, double slope) {
  const auto out = BackwardFunction::apply(grad_y, x, weight, bias, mean, rstd, act, slope);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY(melano, m) {
  m.def("inorm_act_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps, str act, "
        "float negative_slope) -> (Tensor, Tensor, Tensor)");
  m.def("inorm_act_bwd(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, "
        "Tensor rstd, str act, float negative_slope) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(melano, Autograd, m) {
  m.impl("inorm_act_fwd", &forward_autograd);
  m.impl("inorm_act_bwd", &backward_autograd);
}

}  // namespace melano
