// Fused InstanceNorm + activation: what the CPU (instance_norm_act.cpp) and CUDA
// (instance_norm_act_cuda.cu) kernels share.
//
//   y = act(y_pre),  y_pre = (x - mean) * rstd * w + b,  per (n, c) plane of x (N, C, H, W)
//
// The formulas, the backward's derivation and why the backward recomputes y_pre from x (not from y)
// are written out once, in reference/instance_norm_act.py; the kernels follow them line for line.
//
//   Act, parse_act, dispatch_act    activation codes, from the op's string, to a compile-time constant
//   splat, act_fwd, act_grad        the activation and its gradient, for scalars or SIMD vectors
//   affine_of, pre_act, grad_input  y_pre from x - mean, and dx from g = dy * act'(y_pre)
//   check_inputs, check_backward_inputs              argument checks (also for direct op calls)
//   kernel_layout                                    NHWC kernels for channels_last x, else NCHW
//   Inputs, forward_inputs, backward_inputs          checked inputs in the layout and dtypes the kernels read
//   forward_outputs, backward_result                 the ops' outputs, allocated or assembled

#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <string>
#include <type_traits>

// Host and device functions: __host__ __device__ under nvcc, nothing for the C++ compiler.
#ifdef __CUDACC__
#define MELANO_HD __host__ __device__
#define MELANO_INLINE __forceinline__
#else
#define MELANO_HD
#define MELANO_INLINE inline __attribute__((always_inline))
#endif

namespace melano {

enum Act : int { kNone = 0, kRelu = 1, kLeaky = 2 };

inline int parse_act(c10::string_view act) {
  if (act == "none") return kNone;
  if (act == "relu") return kRelu;
  if (act == "leaky_relu") return kLeaky;
  TORCH_CHECK(false, "instance_norm_act: unknown act '", std::string(act.data(), act.size()),
              "'; use one of 'none', 'relu', 'leaky_relu'");
}

// Calls f(std::integral_constant<int, ACT>) so that the kernels are compiled once per activation.
template <typename F>
void dispatch_act(int act, const F& f) {
  switch (act) {
    case kNone: f(std::integral_constant<int, kNone>{}); break;
    case kRelu: f(std::integral_constant<int, kRelu>{}); break;
    default: f(std::integral_constant<int, kLeaky>{}); break;
  }
}

// A scalar as a value of type V: itself when V is the scalar type, else broadcast to a GCC vector.
template <typename V, typename A>
MELANO_HD MELANO_INLINE V splat(A a) {
  if constexpr (std::is_same_v<V, A>) return a;
  else return V{} + a;
}

// The activation and its gradient, written as selects between values so that they vectorise (V is a
// scalar or a GCC vector of the accumulation type A). relu passes NaN like F.relu; its gradient follows
// threshold_backward (0 where y_pre <= 0, including y_pre == 0), leaky follows leaky_relu_backward.
template <int ACT, typename V, typename A>
MELANO_HD MELANO_INLINE V act_fwd(V v, A slope) {
  const V zero = splat<V>(A(0));
  if constexpr (ACT == kNone) return v;
  else if constexpr (ACT == kRelu) return v <= zero ? zero : v;
  else return v > zero ? v : v * splat<V>(slope);
}

template <int ACT, typename V, typename A>
MELANO_HD MELANO_INLINE V act_grad(V v, V dy, A slope) {
  const V zero = splat<V>(A(0));
  if constexpr (ACT == kNone) return dy;
  else if constexpr (ACT == kRelu) return v <= zero ? zero : dy;
  else return v > zero ? dy : dy * splat<V>(slope);
}

// V is a scalar or a vector and S is V or its scalar (broadcast).
//
// y_pre = d * scale + shift with d = x - mean and scale = rstd * w, rounded the same way wherever it is
// computed, so that the backward sees the sign the forward saw: one fused multiply-add on the GPU, a
// multiply and an add on the CPU (built with -ffp-contract=off).
template <typename V, typename S>
MELANO_HD MELANO_INLINE V pre_act(V d, S scale, S shift) {
#ifdef __CUDA_ARCH__
  if constexpr (std::is_same_v<V, float>) return __fmaf_rn(d, scale, shift);
  else return __fma_rn(d, scale, shift);
#else
  return d * scale + shift;
#endif
}

// The per-plane constants of y_pre = d * scale + shift for channel c: scale = rstd * w[c] and shift = b[c]
// (1 and 0 when not affine). The forward and the backward both take them from here, bit for bit alike.
template <typename A>
struct Affine {
  A scale, shift;
};

template <typename A>
MELANO_HD MELANO_INLINE Affine<A> affine_of(A rstd, const A* w, const A* b, int64_t c) {
  return {w ? rstd * w[c] : rstd, b ? b[c] : A(0)};
}

// dx = rstd * w * (g - mean(g) - xhat * mean(g * xhat)); derived in reference/instance_norm_act.py.
template <typename V, typename S>
MELANO_HD MELANO_INLINE V grad_input(V g, V xhat, S scale, S mean_g, S mean_gx) {
  return scale * (g - mean_g - xhat * mean_gx);
}

// Checks of the CPU and CUDA ops. The Python wrapper checks first, with friendlier words; these guard
// direct calls of torch.ops.melano.*.
inline void check_inputs(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                         const c10::optional<at::Tensor>& bias, double eps) {
  TORCH_CHECK(x.dim() == 4, "instance_norm_act: x must be (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              "instance_norm_act: x must be a floating tensor, got ", x.scalar_type());
  TORCH_CHECK(x.size(2) * x.size(3) > 1,
              "instance_norm_act: each (n, c) plane needs more than one element, got H*W = ",
              x.size(2) * x.size(3));
  TORCH_CHECK(eps >= 0, "instance_norm_act: eps must be >= 0, got ", eps);
  for (const auto* t : {&weight, &bias}) {
    if (!t->has_value()) continue;
    const at::Tensor& p = t->value();
    TORCH_CHECK(p.dim() == 1 && p.size(0) == x.size(1),
                "instance_norm_act: weight and bias must have shape (C,) = (", x.size(1), ",), got ",
                p.sizes());
    TORCH_CHECK(p.device() == x.device(), "instance_norm_act: weight/bias on ", p.device(),
                " but x on ", x.device());
    TORCH_CHECK(at::isFloatingType(p.scalar_type()), "instance_norm_act: weight/bias must be floating");
  }
}

inline void check_backward_inputs(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean,
                                  const at::Tensor& rstd) {
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "instance_norm_act backward: grad_y shape ", grad_y.sizes(),
              " != x shape ", x.sizes());
  TORCH_CHECK(grad_y.device() == x.device() && mean.device() == x.device() &&
                  rstd.device() == x.device(),
              "instance_norm_act backward: all tensors must be on ", x.device());
  TORCH_CHECK(mean.numel() == x.size(0) * x.size(1) && rstd.numel() == mean.numel(),
              "instance_norm_act backward: mean/rstd must have N*C elements");
}

// The layout the kernels read and write: NHWC for a channels_last-contiguous x, else NCHW (any other
// layout is copied to NCHW). melano/ops/__init__.py's fake implementations follow the same rule.
inline at::MemoryFormat kernel_layout(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous() ? at::MemoryFormat::ChannelsLast
                                                                                : at::MemoryFormat::Contiguous;
}

// One call's inputs, checked and converted: x (and dy) in x's dtype and kernel layout; the parameters
// and the saved statistics contiguous in the accumulation type acc (float for half types, else x's).
struct Inputs {
  at::Tensor x, dy, w, b, mean, rstd;  // w, b undefined when absent; dy, mean, rstd: backward only
  at::MemoryFormat layout;             // Contiguous (NCHW) or ChannelsLast (NHWC)
  at::ScalarType acc;
  int act;
  int64_t N, C, hw;
};

// t in dtype and contiguous; t itself, without a dispatcher call, when it already is (the common case).
inline at::Tensor as_contiguous(const at::Tensor& t, at::ScalarType dtype,
                                at::MemoryFormat layout = at::MemoryFormat::Contiguous) {
  return t.scalar_type() == dtype ? t.contiguous(layout) : t.to(dtype).contiguous(layout);
}

inline at::Tensor param_as(const c10::optional<at::Tensor>& p, at::ScalarType acc) {
  return p.has_value() ? as_contiguous(*p, acc) : at::Tensor();
}

inline Inputs forward_inputs(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                             const c10::optional<at::Tensor>& bias, double eps, c10::string_view act) {
  check_inputs(x, weight, bias, eps);
  Inputs in;
  in.act = parse_act(act);
  in.layout = kernel_layout(x);
  in.x = x.contiguous(in.layout);
  in.acc = at::toOpMathType(x.scalar_type());
  in.w = param_as(weight, in.acc);
  in.b = param_as(bias, in.acc);
  in.N = x.size(0);
  in.C = x.size(1);
  in.hw = x.size(2) * x.size(3);
  return in;
}

inline Inputs backward_inputs(const at::Tensor& grad_y, const at::Tensor& x,
                              const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                              const at::Tensor& mean, const at::Tensor& rstd, c10::string_view act) {
  Inputs in = forward_inputs(x, weight, bias, 0.0, act);
  check_backward_inputs(grad_y, x, mean, rstd);
  in.dy = as_contiguous(grad_y, x.scalar_type(), in.layout);
  in.mean = as_contiguous(mean, in.acc);
  in.rstd = as_contiguous(rstd, in.acc);
  return in;
}

// The forward's outputs, to be filled: y like x (in its kernel layout), and mean and rstd of shape (N, C)
// in acc.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_outputs(const Inputs& in) {
  const auto stats = in.x.options().dtype(in.acc);
  return {at::empty_like(in.x, in.layout), at::empty({in.N, in.C}, stats), at::empty({in.N, in.C}, stats)};
}

// (dx, dweight, dbias) from the per-plane sums of g and g * xhat, of shape (N, C): dbias sums g over each
// channel's planes and dweight sums g * xhat. Both are returned even when not affine (the autograd drops
// them). The CUDA op's; the CPU op adds its per-plane sums itself, without tensor ops.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_result(const at::Tensor& dx,
                                                                      const at::Tensor& sum_g,
                                                                      const at::Tensor& sum_gx,
                                                                      at::ScalarType acc) {
  return {dx, sum_gx.sum(0).to(acc), sum_g.sum(0).to(acc)};
}

template <typename A>
A* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<A>() : nullptr;
}

}  // namespace melano
