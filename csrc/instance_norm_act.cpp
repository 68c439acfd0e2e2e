// Fused InstanceNorm + activation: op schemas, shared input checks and the CPU kernels.
//
//   y = act((x - mean) * rstd * w + b),   mean/var over each (n, c) plane of x (N, C, H, W),
//   rstd = 1 / sqrt(var + eps), biased variance, act in {none, relu, leaky_relu}.
//
// Ops (namespace "melano"; melano/ops.py adds the fake and autograd registrations):
//   inorm_act_fwd(x, weight?, bias?, eps, act, slope) -> (y, mean, rstd)
//   inorm_act_bwd(grad_y, x, weight?, bias?, mean, rstd, act, slope) -> (grad_x, grad_weight, grad_bias)
// mean and rstd are (N, C) in the accumulation type (float, or double for double x). grad_weight and
// grad_bias are (C,) in that type and are always returned (they are per-plane sums the backward needs
// anyway); Python drops them when the op is not affine. Outputs are NCHW-contiguous whatever the
// input layout.
//
// The backward saves x (not y) and recomputes xhat and the pre-activation y_pre = xhat * w + b with
// exactly the forward's arithmetic, so act'(y_pre) sees the same sign the forward saw. Recomputing from
// y instead would need a division by w (undefined at w = 0) and loses the sign where relu output is 0.
//
// CPU: one task per plane (at::parallel_for). Planes of a CycleGAN are 16 KiB to 256 KiB, so the
// passes after the first read x from L2. Statistics: a two-pass mean/variance with the "corrected"
// second pass (Chan, Golub & LeVeque): sum(x - mean) is added back to absorb the rounding of the mean.
// Inner loops use kLanes independent accumulators so the compiler can keep them in SIMD registers,
// and blocks of kBlock elements are summed into double, which bounds the float rounding error.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

namespace melano {

// act codes, shared with the CUDA file (declared there).
enum Act : int { kNone = 0, kRelu = 1, kLeaky = 2 };

int parse_act(c10::string_view act) {
  if (act == "none") return kNone;
  if (act == "relu") return kRelu;
  if (act == "leaky_relu") return kLeaky;
  TORCH_CHECK(false, "instance_norm_act: unknown act '", std::string(act),
              "'; use one of 'none', 'relu', 'leaky_relu'");
}

// Checks shared by the CPU and CUDA forward (the Python wrapper checks first, with friendlier words;
// these guard direct calls of torch.ops.melano.*).
void check_inputs(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
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

void check_backward_inputs(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean,
                           const at::Tensor& rstd) {
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "instance_norm_act backward: grad_y shape ", grad_y.sizes(),
              " != x shape ", x.sizes());
  TORCH_CHECK(grad_y.device() == x.device() && mean.device() == x.device() &&
                  rstd.device() == x.device(),
              "instance_norm_act backward: all tensors must be on ", x.device());
  TORCH_CHECK(mean.numel() == x.size(0) * x.size(1) && rstd.numel() == mean.numel(),
              "instance_norm_act backward: mean/rstd must have N*C elements");
}

// weight/bias as contiguous accumulation-type tensors, or undefined when absent.
at::Tensor param_as(const c10::optional<at::Tensor>& p, at::ScalarType acc) {
  if (!p.has_value()) return at::Tensor();
  return p->to(acc).contiguous();
}

namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kBlock = 2048;

template <int ACT, typename A>
inline A act_fwd(A v, A slope) {
  if constexpr (ACT == kNone) return v;
  else if constexpr (ACT == kRelu) return v <= A(0) ? A(0) : v;  // NaN passes, like F.relu
  else return v > A(0) ? v : v * slope;
}

// dL/dy_pre from dL/dy. relu follows threshold_backward (grad is 0 where y_pre <= 0, including
// y_pre == 0) and leaky follows leaky_relu_backward (slope where y_pre <= 0).
template <int ACT, typename A>
inline A act_grad(A v, A dy, A slope) {
  if constexpr (ACT == kNone) return dy;
  else if constexpr (ACT == kRelu) return v <= A(0) ? A(0) : dy;
  else return v > A(0) ? dy : dy * slope;
}

// Sums f(i) over [0, n) for K quantities at once: kLanes accumulators per quantity inside blocks of
// kBlock elements, block totals added in double.
template <int K, typename A, typename F>
inline void plane_sums(int64_t n, double (&out)[K], const F& f) {
  for (int k = 0; k < K; ++k) out[k] = 0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(n, start + kBlock);
    A lane[K][kLanes] = {};
    int64_t i = start;
    for (; i + kLanes <= end; i += kLanes) {
      for (int64_t j = 0; j < kLanes; ++j) {
        A v[K];
        f(i + j, v);
        for (int k = 0; k < K; ++k) lane[k][j] += v[k];
      }
    }
    for (; i < end; ++i) {
      A v[K];
      f(i, v);
      for (int k = 0; k < K; ++k) lane[k][0] += v[k];
    }
    for (int k = 0; k < K; ++k) {
      A s = 0;
      for (int64_t j = 0; j < kLanes; ++j) s += lane[k][j];
      out[k] += double(s);
    }
  }
}

template <typename T, int ACT>
void forward_cpu_kernel(const T* x, T* y, const at::opmath_type<T>* w, const at::opmath_type<T>* b,
                        at::opmath_type<T>* mean_out, at::opmath_type<T>* rstd_out, int64_t planes,
                        int64_t C, int64_t hw, double eps, double slope_d) {
  using A = at::opmath_type<T>;
  const A slope = A(slope_d);
  const int64_t grain = std::max<int64_t>(1, 32768 / hw);
  at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const T* xp = x + p * hw;
      T* yp = y + p * hw;
      double s[1];
      plane_sums<1, A>(hw, s, [&](int64_t i, A (&v)[1]) { v[0] = A(xp[i]); });
      const A mean_a = A(s[0] / double(hw));
      double m[2];
      plane_sums<2, A>(hw, m, [&](int64_t i, A (&v)[2]) {
        const A d = A(xp[i]) - mean_a;
        v[0] = d;
        v[1] = d * d;
      });
      const double var = std::max(0.0, (m[1] - m[0] * m[0] / double(hw)) / double(hw));
      const A mean = A(double(mean_a) + m[0] / double(hw));
      const A rstd = A(1.0 / std::sqrt(var + eps));
      const int64_t c = p % C;
      const A scale = w ? rstd * w[c] : rstd;
      const A shift = b ? b[c] : A(0);
      for (int64_t i = 0; i < hw; ++i) {
        yp[i] = T(act_fwd<ACT>((A(xp[i]) - mean) * scale + shift, slope));
      }
      mean_out[p] = mean;
      rstd_out[p] = rstd;
    }
  });
}

template <typename T, int ACT>
void backward_cpu_kernel(const T* dy, const T* x, T* dx, const at::opmath_type<T>* w,
                         const at::opmath_type<T>* b, const at::opmath_type<T>* mean_in,
                         const at::opmath_type<T>* rstd_in, double* sum_g, double* sum_gx,
                         int64_t planes, int64_t C, int64_t hw, double slope_d) {
  using A = at::opmath_type<T>;
  const A slope = A(slope_d);
  const int64_t grain = std::max<int64_t>(1, 32768 / hw);
  at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const T* xp = x + p * hw;
      const T* dyp = dy + p * hw;
      T* dxp = dx + p * hw;
      const int64_t c = p % C;
      const A mean = mean_in[p], rstd = rstd_in[p];
      const A scale = w ? rstd * w[c] : rstd;  // the forward's scale, bit for bit
      const A shift = b ? b[c] : A(0);
      double s[2];
      plane_sums<2, A>(hw, s, [&](int64_t i, A (&v)[2]) {
        const A d = A(xp[i]) - mean;
        const A g = act_grad<ACT>(d * scale + shift, A(dyp[i]), slope);
        v[0] = g;
        v[1] = g * (d * rstd);
      });
      sum_g[p] = s[0];
      sum_gx[p] = s[1];
      const A mg = A(s[0] / double(hw)), mgx = A(s[1] / double(hw));
      for (int64_t i = 0; i < hw; ++i) {
        const A d = A(xp[i]) - mean;
        const A g = act_grad<ACT>(d * scale + shift, A(dyp[i]), slope);
        dxp[i] = T(scale * (g - mg - (d * rstd) * mgx));
      }
    }
  });
}

template <typename F>
void dispatch_act(int act, const F& f) {
  switch (act) {
    case kNone: f(std::integral_constant<int, kNone>{}); break;
    case kRelu: f(std::integral_constant<int, kRelu>{}); break;
    default: f(std::integral_constant<int, kLeaky>{}); break;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(const at::Tensor& x_in,
                                                           const c10::optional<at::Tensor>& weight,
                                                           const c10::optional<at::Tensor>& bias,
                                                           double eps, c10::string_view act_name,
                                                           double slope) {
  check_inputs(x_in, weight, bias, eps);
  const int act = parse_act(act_name);
  const at::Tensor x = x_in.contiguous();
  const auto acc = at::toOpMathType(x.scalar_type());
  const int64_t N = x.size(0), C = x.size(1), hw = x.size(2) * x.size(3);
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor mean = at::empty({N, C}, x.options().dtype(acc));
  at::Tensor rstd = at::empty({N, C}, x.options().dtype(acc));
  const at::Tensor w = param_as(weight, acc), b = param_as(bias, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "inorm_act_fwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    dispatch_act(act, [&](auto a) {
      forward_cpu_kernel<scalar_t, decltype(a)::value>(
          x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), w.defined() ? w.data_ptr<A>() : nullptr,
          b.defined() ? b.data_ptr<A>() : nullptr, mean.data_ptr<A>(), rstd.data_ptr<A>(), N * C, C,
          hw, eps, slope);
    });
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean_in, const at::Tensor& rstd_in,
    c10::string_view act_name, double slope) {
  check_inputs(x_in, weight, bias, 0.0);
  check_backward_inputs(grad_y_in, x_in, mean_in, rstd_in);
  const int act = parse_act(act_name);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor dy = grad_y_in.to(x.scalar_type()).contiguous();
  const auto acc = at::toOpMathType(x.scalar_type());
  const at::Tensor mean = mean_in.to(acc).contiguous(), rstd = rstd_in.to(acc).contiguous();
  const int64_t N = x.size(0), C = x.size(1), hw = x.size(2) * x.size(3);
  at::Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor sum_g = at::empty({N, C}, x.options().dtype(at::kDouble));
  at::Tensor sum_gx = at::empty({N, C}, x.options().dtype(at::kDouble));
  const at::Tensor w = param_as(weight, acc), b = param_as(bias, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "inorm_act_bwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    dispatch_act(act, [&](auto a) {
      backward_cpu_kernel<scalar_t, decltype(a)::value>(
          dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(),
          w.defined() ? w.data_ptr<A>() : nullptr, b.defined() ? b.data_ptr<A>() : nullptr,
          mean.data_ptr<A>(), rstd.data_ptr<A>(), sum_g.data_ptr<double>(),
          sum_gx.data_ptr<double>(), N * C, C, hw, slope);
    });
  });
  // dbias = sum of g over each channel's planes, dweight = sum of g * xhat.
  return {dx, sum_gx.sum(0).to(acc), sum_g.sum(0).to(acc)};
}

}  // namespace

TORCH_LIBRARY(melano, m) {
  m.def("inorm_act_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps, str act, "
        "float negative_slope) -> (Tensor, Tensor, Tensor)");
  m.def("inorm_act_bwd(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, "
        "Tensor rstd, str act, float negative_slope) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(melano, CPU, m) {
  m.impl("inorm_act_fwd", &forward_cpu);
  m.impl("inorm_act_bwd", &backward_cpu);
}

}  // namespace melano
