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
// Inner loops work on SIMD vectors (GCC vector extensions); blocks of kBlock elements are summed in
// the accumulation type and then added in double, which bounds the float rounding error. The plane
// loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at run time.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <string>

namespace melano {

// act codes, shared with the CUDA file (declared there).
enum Act : int { kNone = 0, kRelu = 1, kLeaky = 2 };

int parse_act(c10::string_view act) {
  if (act == "none") return kNone;
  if (act == "relu") return kRelu;
  if (act == "leaky_relu") return kLeaky;
  TORCH_CHECK(false, "instance_norm_act: unknown act '", std::string(act.data(), act.size()),
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

constexpr int64_t kBlock = 2048;  // elements summed in the accumulation type before going to double

#define MELANO_INLINE inline __attribute__((always_inline))

// W-byte vectors (GCC vector extensions) of the accumulation type: W = 64 for AVX-512, 32 for AVX2,
// 16 for SSE2 / NEON. Half and BFloat16 are converted element by element on load and store.
template <typename A, int W> struct Simd { typedef A V __attribute__((vector_size(W))); };
template <typename A, int W> using VecOf = typename Simd<A, W>::V;
template <typename A, int W> constexpr int64_t kLanes = int64_t(W / sizeof(A));

template <typename A, int W, typename T>
MELANO_INLINE VecOf<A, W> vload(const T* p) {
  VecOf<A, W> v;
  if constexpr (std::is_same_v<T, A>) std::memcpy(&v, p, sizeof(v));
  else for (int64_t j = 0; j < kLanes<A, W>; ++j) v[j] = A(p[j]);
  return v;
}

template <typename A, int W, typename T>
MELANO_INLINE void vstore(T* p, VecOf<A, W> v) {
  if constexpr (std::is_same_v<T, A>) std::memcpy(p, &v, sizeof(v));
  else for (int64_t j = 0; j < kLanes<A, W>; ++j) p[j] = T(v[j]);
}

template <typename A, int W>
MELANO_INLINE double hsum(VecOf<A, W> v) {
  A s = 0;
  for (int64_t j = 0; j < kLanes<A, W>; ++j) s += v[j];
  return double(s);
}

template <typename V, typename A>
MELANO_INLINE V splat(A a) {
  if constexpr (std::is_same_v<V, A>) return a;
  else return V{} + a;  // broadcast
}

// The activation and its gradient, for a scalar A or a vector VecOf<A>, written as selects between
// values so that they vectorise. relu passes NaN like F.relu; its gradient follows threshold_backward
// (0 where y_pre <= 0, including y_pre == 0) and leaky follows leaky_relu_backward (slope there).
template <int ACT, typename V, typename A>
MELANO_INLINE V act_fwd(V v, A slope) {
  if constexpr (ACT == kNone) return v;
  else if constexpr (ACT == kRelu) return v <= splat<V>(A(0)) ? splat<V>(A(0)) : v;
  else return v * (v > splat<V>(A(0)) ? splat<V>(A(1)) : splat<V>(slope));
}

template <int ACT, typename V, typename A>
MELANO_INLINE V act_grad(V v, V dy, A slope) {
  if constexpr (ACT == kNone) return dy;
  else if constexpr (ACT == kRelu) return v <= splat<V>(A(0)) ? splat<V>(A(0)) : dy;
  else return dy * (v > splat<V>(A(0)) ? splat<V>(A(1)) : splat<V>(slope));
}

template <typename T>
struct Args {
  using A = at::opmath_type<T>;
  const T* x;
  const T* dy;  // backward only
  T* out;       // y or dx
  const A* w;   // nullptr when not affine
  const A* b;
  A* mean;      // written by the forward, read by the backward
  A* rstd;
  double* sum_g;  // backward only: per-plane sums for dbias and dweight
  double* sum_gx;
  int64_t C, hw;
  double eps;
  A slope;
};

// One plane: three passes (mean; corrected variance; output). The plane is at most a few hundred KiB
// in a CycleGAN, so the second and third passes read it from L2.
template <typename T, int ACT, int W>
MELANO_INLINE void forward_plane(const Args<T>& a, int64_t p) {
  using A = at::opmath_type<T>;
  using V = VecOf<A, W>;
  constexpr int64_t L = kLanes<A, W>;
  const int64_t hw = a.hw;
  const T* __restrict__ xp = a.x + p * hw;
  T* __restrict__ yp = a.out + p * hw;

  double sum = 0;
  for (int64_t start = 0; start < hw; start += kBlock) {
    const int64_t end = std::min(hw, start + kBlock);
    V acc = V{};
    A tail = 0;
    int64_t i = start;
    for (; i + L <= end; i += L) acc += vload<A, W>(xp + i);
    for (; i < end; ++i) tail += A(xp[i]);
    sum += hsum<A, W>(acc) + double(tail);
  }
  const A mean0 = A(sum / double(hw));

  // Sum of (x - mean0) too: it is ~0 and corrects the rounding of mean0 (Chan, Golub & LeVeque).
  double m1 = 0, m2 = 0;
  const V mean0v = splat<V>(mean0);
  for (int64_t start = 0; start < hw; start += kBlock) {
    const int64_t end = std::min(hw, start + kBlock);
    V acc1 = V{}, acc2 = V{};
    A tail1 = 0, tail2 = 0;
    int64_t i = start;
    for (; i + L <= end; i += L) {
      const V d = vload<A, W>(xp + i) - mean0v;
      acc1 += d;
      acc2 += d * d;
    }
    for (; i < end; ++i) {
      const A d = A(xp[i]) - mean0;
      tail1 += d;
      tail2 += d * d;
    }
    m1 += hsum<A, W>(acc1) + double(tail1);
    m2 += hsum<A, W>(acc2) + double(tail2);
  }
  const double var = std::max(0.0, (m2 - m1 * m1 / double(hw)) / double(hw));
  const A mean = A(double(mean0) + m1 / double(hw));
  const A rstd = A(1.0 / std::sqrt(var + a.eps));
  const int64_t c = p % a.C;
  const A scale = a.w ? rstd * a.w[c] : rstd;
  const A shift = a.b ? a.b[c] : A(0);

  const V meanv = splat<V>(mean), scalev = splat<V>(scale), shiftv = splat<V>(shift);
  int64_t i = 0;
  for (; i + L <= hw; i += L) {
    vstore<A, W>(yp + i, act_fwd<ACT>((vload<A, W>(xp + i) - meanv) * scalev + shiftv, a.slope));
  }
  for (; i < hw; ++i) yp[i] = T(act_fwd<ACT>((A(xp[i]) - mean) * scale + shift, a.slope));
  a.mean[p] = mean;
  a.rstd[p] = rstd;
}

// One plane of the backward: two passes over x and dy (sums of g and g * xhat; then dx).
template <typename T, int ACT, int W>
MELANO_INLINE void backward_plane(const Args<T>& a, int64_t p) {
  using A = at::opmath_type<T>;
  using V = VecOf<A, W>;
  constexpr int64_t L = kLanes<A, W>;
  const int64_t hw = a.hw;
  const T* __restrict__ xp = a.x + p * hw;
  const T* __restrict__ dyp = a.dy + p * hw;
  T* __restrict__ dxp = a.out + p * hw;
  const int64_t c = p % a.C;
  const A mean = a.mean[p], rstd = a.rstd[p];
  const A scale = a.w ? rstd * a.w[c] : rstd;  // the forward's scale, bit for bit
  const A shift = a.b ? a.b[c] : A(0);
  const V meanv = splat<V>(mean), rstdv = splat<V>(rstd), scalev = splat<V>(scale),
          shiftv = splat<V>(shift);

  double sg = 0, sgx = 0;
  for (int64_t start = 0; start < hw; start += kBlock) {
    const int64_t end = std::min(hw, start + kBlock);
    V acc1 = V{}, acc2 = V{};
    A tail1 = 0, tail2 = 0;
    int64_t i = start;
    for (; i + L <= end; i += L) {
      const V d = vload<A, W>(xp + i) - meanv;
      const V g = act_grad<ACT>(d * scalev + shiftv, vload<A, W>(dyp + i), a.slope);
      acc1 += g;
      acc2 += g * (d * rstdv);
    }
    for (; i < end; ++i) {
      const A d = A(xp[i]) - mean;
      const A g = act_grad<ACT>(d * scale + shift, A(dyp[i]), a.slope);
      tail1 += g;
      tail2 += g * (d * rstd);
    }
    sg += hsum<A, W>(acc1) + double(tail1);
    sgx += hsum<A, W>(acc2) + double(tail2);
  }
  a.sum_g[p] = sg;
  a.sum_gx[p] = sgx;

  const A mg = A(sg / double(hw)), mgx = A(sgx / double(hw));
  const V mgv = splat<V>(mg), mgxv = splat<V>(mgx);
  int64_t i = 0;
  for (; i + L <= hw; i += L) {
    const V d = vload<A, W>(xp + i) - meanv;
    const V g = act_grad<ACT>(d * scalev + shiftv, vload<A, W>(dyp + i), a.slope);
    vstore<A, W>(dxp + i, scalev * (g - mgv - (d * rstdv) * mgxv));
  }
  for (; i < hw; ++i) {
    const A d = A(xp[i]) - mean;
    const A g = act_grad<ACT>(d * scale + shift, A(dyp[i]), a.slope);
    dxp[i] = T(scale * (g - mg - (d * rstd) * mgx));
  }
}

// The plane loops, compiled for three instruction sets and picked at run time: the cached build must
// run on any x86-64 CPU (no -march=native), yet AVX-512 and AVX2 are worth 2-4x on the passes that
// run from cache. Each variant uses its native vector width, so the sums' rounding differs between
// them in the last bits; the elementwise arithmetic is the same IEEE operations in all of them (no FMA:
// -ffp-contract=off). MELANO_CPU_ISA=default|avx2 caps the choice (the tests compare the variants).
template <typename T, int ACT, bool FWD, int W>
MELANO_INLINE void planes_generic(const Args<T>& a, int64_t begin, int64_t end) {
  for (int64_t p = begin; p < end; ++p) {
    if constexpr (FWD) forward_plane<T, ACT, W>(a, p);
    else backward_plane<T, ACT, W>(a, p);
  }
}

template <typename T, int ACT, bool FWD>
void planes_default(const Args<T>& a, int64_t begin, int64_t end) {
  planes_generic<T, ACT, FWD, 16>(a, begin, end);
}

#if defined(__x86_64__) && defined(__GNUC__)
#define MELANO_X86_ISA 1
template <typename T, int ACT, bool FWD>
__attribute__((target("avx2,fma,f16c"))) void planes_avx2(const Args<T>& a, int64_t begin, int64_t end) {
  planes_generic<T, ACT, FWD, 32>(a, begin, end);
}

template <typename T, int ACT, bool FWD>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")))
void planes_avx512(const Args<T>& a, int64_t begin, int64_t end) {
  planes_generic<T, ACT, FWD, 64>(a, begin, end);
}
#endif

enum Isa : int { kIsaDefault = 0, kIsaAvx2 = 1, kIsaAvx512 = 2 };

int cpu_isa() {
  int best = kIsaDefault;
#ifdef MELANO_X86_ISA
  static const int detected = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
      return int(kIsaAvx512);
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
      return int(kIsaAvx2);
    return int(kIsaDefault);
  }();
  best = detected;
#endif
  const char* cap = std::getenv("MELANO_CPU_ISA");
  if (cap != nullptr) {
    const std::string want(cap);
    if (want == "default") best = kIsaDefault;
    else if (want == "avx2") best = std::min(best, int(kIsaAvx2));
  }
  return best;
}

template <typename T, int ACT, bool FWD>
void run_planes(const Args<T>& a, int64_t planes) {
  auto fn = &planes_default<T, ACT, FWD>;
#ifdef MELANO_X86_ISA
  const int isa = cpu_isa();
  if (isa == kIsaAvx512) fn = &planes_avx512<T, ACT, FWD>;
  else if (isa == kIsaAvx2) fn = &planes_avx2<T, ACT, FWD>;
#endif
  // Tasks of at least ~32k elements, so small planes are not scheduled one by one.
  const int64_t grain = std::max<int64_t>(1, 32768 / a.hw);
  at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) { fn(a, begin, end); });
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
    Args<scalar_t> args{x.data_ptr<scalar_t>(), nullptr, y.data_ptr<scalar_t>(),
                        w.defined() ? w.data_ptr<A>() : nullptr, b.defined() ? b.data_ptr<A>() : nullptr,
                        mean.data_ptr<A>(), rstd.data_ptr<A>(), nullptr, nullptr, C, hw, eps, A(slope)};
    dispatch_act(act, [&](auto a) { run_planes<scalar_t, decltype(a)::value, true>(args, N * C); });
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
    Args<scalar_t> args{x.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(),
                        w.defined() ? w.data_ptr<A>() : nullptr, b.defined() ? b.data_ptr<A>() : nullptr,
                        mean.data_ptr<A>(), rstd.data_ptr<A>(), sum_g.data_ptr<double>(),
                        sum_gx.data_ptr<double>(), C, hw, 0.0, A(slope)};
    dispatch_act(act, [&](auto a) { run_planes<scalar_t, decltype(a)::value, false>(args, N * C); });
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
