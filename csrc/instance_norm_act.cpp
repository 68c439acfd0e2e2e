// Fused InstanceNorm + activation: op schemas and the CPU kernels.
//
//   y = act((x - mean) * rstd * w + b),   mean/var over each (n, c) plane of x (N, C, H, W),
//   rstd = 1 / sqrt(var + eps), biased variance, act in {none, relu, leaky_relu}.
//
// Ops (namespace "melano"; melano/ops.py adds the fake and autograd registrations; the activation,
// dx formula and argument checks shared with the CUDA file are in instance_norm_act.h):
//   inorm_act_fwd(x, weight?, bias?, eps, act, slope) -> (y, mean, rstd)
//   inorm_act_bwd(grad_y, x, weight?, bias?, mean, rstd, act, slope) -> (grad_x, grad_weight, grad_bias)
// mean and rstd are (N, C) in the accumulation type (float, or double for double x). grad_weight and
// grad_bias are (C,) in that type and are always returned (they are per-plane sums the backward needs
// anyway); Python drops them when the op is not affine. Outputs are NCHW-contiguous whatever the
// input layout.
//
// The backward saves x (not y) and recomputes y_pre from it: see reference/instance_norm_act.py.
//
// CPU: one task per plane (at::parallel_for). Planes of a CycleGAN are 16 KiB to 256 KiB, so the
// passes after the first read x from L2. Statistics: a two-pass mean/variance with the "corrected"
// second pass (Chan, Golub & LeVeque): sum(x - mean) is added back to absorb the rounding of the mean.
// Inner loops work on SIMD vectors (GCC vector extensions); blocks of kBlock elements are summed in
// the accumulation type and then added in double, which bounds the float rounding error. The plane
// loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at run time.

#include "instance_norm_act.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

namespace melano {

namespace {

constexpr int64_t kBlock = 2048;  // elements summed in the accumulation type before going to double

// L values of the accumulation type A: a GCC vector of L lanes, or the scalar A itself when L = 1.
// Half and BFloat16 are converted element by element on load and store.
template <typename A, int L> struct VecT { typedef A type __attribute__((vector_size(L * sizeof(A)))); };
template <typename A> struct VecT<A, 1> { using type = A; };
template <typename A, int L> using Vec = typename VecT<A, L>::type;
template <int L> using Lanes = std::integral_constant<int, L>;

// Lambdas are not compiled for the enclosing function's target ISA unless inlined into it.
#define MELANO_LAMBDA __attribute__((always_inline))

template <typename A, int L, typename T>
MELANO_INLINE Vec<A, L> load(Lanes<L>, const T* p) {
  if constexpr (L == 1) return A(*p);
  else {
    Vec<A, L> v;
    if constexpr (std::is_same_v<T, A>) std::memcpy(&v, p, sizeof(v));
    else for (int j = 0; j < L; ++j) v[j] = A(p[j]);
    return v;
  }
}

template <typename T, typename V>
MELANO_INLINE void store(T* p, V v) {
  if constexpr (std::is_arithmetic_v<V>) *p = T(v);
  else if constexpr (std::is_same_v<T, std::remove_reference_t<decltype(v[0])>>) std::memcpy(p, &v, sizeof(v));
  else for (int j = 0; j < int(sizeof(V) / sizeof(v[0])); ++j) p[j] = T(v[j]);
}

template <typename V>
MELANO_INLINE double hsum(V v) {
  if constexpr (std::is_arithmetic_v<V>) return double(v);
  else {
    auto s = v[0];
    for (int j = 1; j < int(sizeof(V) / sizeof(v[0])); ++j) s += v[j];
    return double(s);
  }
}

// Calls f(Lanes<L>, i) for the full vectors of [begin, end), then f(Lanes<1>, i) for each element left.
template <int L, typename F>
MELANO_INLINE void for_lanes(int64_t begin, int64_t end, const F& f) {
  int64_t i = begin;
  for (; i + L <= end; i += L) f(Lanes<L>{}, i);
  for (; i < end; ++i) f(Lanes<1>{}, i);
}

// total[k] += the sum over [0, n) of the K values that f(lanes, i, acc) adds into acc[k]. Each block of
// kBlock elements is summed in A (vector lanes and the scalar tail apart), then added in double: this
// bounds the float rounding error of long sums.
template <typename A, int L, int K, typename F>
MELANO_INLINE void sum_lanes(int64_t n, double (&total)[K], const F& f) {
  for (int64_t start = 0; start < n; start += kBlock) {
    Vec<A, L> acc[K] = {};
    A tail[K] = {};
    for_lanes<L>(start, std::min(n, start + kBlock), [&](auto lanes, int64_t i) MELANO_LAMBDA {
      if constexpr (decltype(lanes)::value == 1) f(lanes, i, tail);
      else f(lanes, i, acc);
    });
    for (int k = 0; k < K; ++k) total[k] += hsum(acc[k]) + double(tail[k]);
  }
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

// One (n, c) plane p of an NCHW tensor: three passes (mean; corrected variance; output). A plane is at
// most a few hundred KiB in a CycleGAN, so the second and third passes read it from L2.
template <typename T, int ACT, int L>
MELANO_INLINE void forward_plane(const Args<T>& a, int64_t p) {
  using A = at::opmath_type<T>;
  const int64_t hw = a.hw;
  const T* __restrict__ xp = a.x + p * hw;
  T* __restrict__ yp = a.out + p * hw;

  double sum[1] = {0};
  sum_lanes<A, L>(hw, sum, [&](auto lanes, int64_t i, auto& s) MELANO_LAMBDA { s[0] += load<A>(lanes, xp + i); });
  const A mean0 = A(sum[0] / double(hw));
  // Sum of (x - mean0) too: it is ~0 and corrects the rounding of mean0 (Chan, Golub & LeVeque).
  double m[2] = {0, 0};
  sum_lanes<A, L>(hw, m, [&](auto lanes, int64_t i, auto& s) MELANO_LAMBDA {
    const auto d = load<A>(lanes, xp + i) - mean0;
    s[0] += d;
    s[1] += d * d;
  });
  const double var = std::max(0.0, (m[1] - m[0] * m[0] / double(hw)) / double(hw));
  const A mean = A(double(mean0) + m[0] / double(hw));
  const A rstd = A(1.0 / std::sqrt(var + a.eps));
  const int64_t c = p % a.C;
  const auto [scale, shift] = affine_of(rstd, a.w, a.b, c);
  for_lanes<L>(0, hw, [&](auto lanes, int64_t i) MELANO_LAMBDA {
    store(yp + i, act_fwd<ACT>(pre_act(load<A>(lanes, xp + i) - mean, scale, shift), a.slope));
  });
  a.mean[p] = mean;
  a.rstd[p] = rstd;
}

// One plane of the backward: two passes over x and dy (sums of g and g * xhat; then dx).
template <typename T, int ACT, int L>
MELANO_INLINE void backward_plane(const Args<T>& a, int64_t p) {
  using A = at::opmath_type<T>;
  const int64_t hw = a.hw;
  const T* __restrict__ xp = a.x + p * hw;
  const T* __restrict__ dyp = a.dy + p * hw;
  T* __restrict__ dxp = a.out + p * hw;
  const int64_t c = p % a.C;
  const A mean = a.mean[p], rstd = a.rstd[p];
  const auto [scale, shift] = affine_of(rstd, a.w, a.b, c);
  // g and d = x - mean at element i (vector or scalar, as lanes says).
  auto g_and_d = [&](auto lanes, int64_t i) MELANO_LAMBDA {
    const auto d = load<A>(lanes, xp + i) - mean;
    return std::make_pair(act_grad<ACT>(pre_act(d, scale, shift), load<A>(lanes, dyp + i), a.slope), d);
  };

  double s[2] = {0, 0};
  sum_lanes<A, L>(hw, s, [&](auto lanes, int64_t i, auto& acc) MELANO_LAMBDA {
    const auto [g, d] = g_and_d(lanes, i);
    acc[0] += g;
    acc[1] += g * (d * rstd);
  });
  a.sum_g[p] = s[0];
  a.sum_gx[p] = s[1];
  const A mg = A(s[0] / double(hw)), mgx = A(s[1] / double(hw));
  for_lanes<L>(0, hw, [&](auto lanes, int64_t i) MELANO_LAMBDA {
    const auto [g, d] = g_and_d(lanes, i);
    store(dxp + i, grad_input(g, d * rstd, scale, mg, mgx));
  });
}

enum Pass : int { kForwardPlanes = 0, kBackwardPlanes = 1 };

// The task loops, compiled for three instruction sets and picked at run time: the cached build must
// run on any x86-64 CPU (no -march=native), yet AVX-512 and AVX2 are worth 2-4x on the passes that
// run from cache. Each variant uses its native vector width of W bytes, so the sums' rounding differs
// between them in the last bits; the elementwise arithmetic is the same IEEE operations in all of them
// (no FMA: -ffp-contract=off). MELANO_CPU_ISA=default|avx2 caps the choice (the tests compare them).
template <typename T, int ACT, int PASS, int W>
MELANO_INLINE void tasks_generic(const Args<T>& a, int64_t begin, int64_t end) {
  constexpr int L = W / sizeof(at::opmath_type<T>);
  for (int64_t t = begin; t < end; ++t) {
    if constexpr (PASS == kForwardPlanes) forward_plane<T, ACT, L>(a, t);
    else backward_plane<T, ACT, L>(a, t);
  }
}

template <typename T, int ACT, int PASS>
void tasks_default(const Args<T>& a, int64_t begin, int64_t end) {
  tasks_generic<T, ACT, PASS, 16>(a, begin, end);
}

#if defined(__x86_64__) && defined(__GNUC__)
#define MELANO_X86_ISA 1
template <typename T, int ACT, int PASS>
__attribute__((target("avx2,fma,f16c"))) void tasks_avx2(const Args<T>& a, int64_t begin, int64_t end) {
  tasks_generic<T, ACT, PASS, 32>(a, begin, end);
}

template <typename T, int ACT, int PASS>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")))
void tasks_avx512(const Args<T>& a, int64_t begin, int64_t end) {
  tasks_generic<T, ACT, PASS, 64>(a, begin, end);
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

// Runs tasks [0, tasks) of a pass in parallel, each task of about `task_elems` elements.
template <typename T, int ACT, int PASS>
void run_tasks(const Args<T>& a, int64_t tasks, int64_t task_elems) {
  auto fn = &tasks_default<T, ACT, PASS>;
#ifdef MELANO_X86_ISA
  const int isa = cpu_isa();
  if (isa == kIsaAvx512) fn = &tasks_avx512<T, ACT, PASS>;
  else if (isa == kIsaAvx2) fn = &tasks_avx2<T, ACT, PASS>;
#endif
  // Work of at least ~32k elements per scheduled range, so small tasks are not scheduled one by one.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, task_elems));
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) { fn(a, begin, end); });
}

template <typename T>
Args<T> make_args(const Inputs& in, at::Tensor& out, at::Tensor& mean, at::Tensor& rstd, double eps,
                  double slope) {
  using A = at::opmath_type<T>;
  return Args<T>{in.x.data_ptr<T>(), in.dy.defined() ? in.dy.data_ptr<T>() : nullptr, out.data_ptr<T>(),
                 ptr_or_null<A>(in.w), ptr_or_null<A>(in.b), mean.data_ptr<A>(), rstd.data_ptr<A>(),
                 nullptr, nullptr, in.C, in.hw, eps, A(slope)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(const at::Tensor& x,
                                                           const c10::optional<at::Tensor>& weight,
                                                           const c10::optional<at::Tensor>& bias,
                                                           double eps, c10::string_view act, double slope) {
  const Inputs in = forward_inputs(x, weight, bias, eps, act);
  at::Tensor y, mean, rstd;
  std::tie(y, mean, rstd) = forward_outputs(in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "inorm_act_fwd_cpu", [&] {
    const Args<scalar_t> args = make_args<scalar_t>(in, y, mean, rstd, eps, slope);
    dispatch_act(in.act, [&](auto a) {
      run_tasks<scalar_t, decltype(a)::value, kForwardPlanes>(args, in.N * in.C, in.hw);
    });
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd,
    c10::string_view act, double slope) {
  Inputs in = backward_inputs(grad_y, x, weight, bias, mean, rstd, act);
  at::Tensor dx = at::empty_like(in.x, at::MemoryFormat::Contiguous);
  at::Tensor sum_g = at::empty({in.N, in.C}, in.x.options().dtype(at::kDouble));
  at::Tensor sum_gx = at::empty({in.N, in.C}, in.x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "inorm_act_bwd_cpu", [&] {
    Args<scalar_t> args = make_args<scalar_t>(in, dx, in.mean, in.rstd, 0.0, slope);
    args.sum_g = sum_g.data_ptr<double>();
    args.sum_gx = sum_gx.data_ptr<double>();
    dispatch_act(in.act, [&](auto a) {
      run_tasks<scalar_t, decltype(a)::value, kBackwardPlanes>(args, in.N * in.C, in.hw);
    });
  });
  return backward_result(dx, sum_g, sum_gx, in.acc);
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
