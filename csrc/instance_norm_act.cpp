// Fused InstanceNorm + activation: the CPU kernels (the op schemas and the autograd are in
// instance_norm_act_autograd.cpp; the activation, dx formula and argument checks shared with the CUDA
// file in instance_norm_act.h). This file compiles twice: as the forward half, and, through
// instance_norm_act_backward.cpp, as the backward half (MELANO_CPU_BACKWARD), in parallel.
//
//   y = act((x - mean) * rstd * w + b),   mean/var over each (n, c) plane of x (N, C, H, W),
//   rstd = 1 / sqrt(var + eps), biased variance, act in {none, relu, leaky_relu}.
//
// The backward saves x (not y) and recomputes y_pre from it: see reference/instance_norm_act.py.
//
// CPU, NCHW: one task per plane (at::parallel_for). Planes of a CycleGAN are 100 B to 256 KiB, so the
// passes after the first read x from L1 or L2: each pass is bound by the vector adds' latency unless
// it keeps several sums apart (kUnroll), and for small planes the per-plane and per-call costs decide.
// Statistics: a two-pass mean/variance with the "corrected" second pass (Chan, Golub & LeVeque):
// sum(x - mean) is added back to absorb the rounding of the mean. Inner loops work on SIMD vectors (GCC
// vector extensions); blocks of kBlock elements are summed in the accumulation type and then added in
// double, which bounds the float rounding error. The plane loops are compiled for AVX-512, AVX2 and
// baseline x86-64 and picked at run time. NHWC: SIMD across channels, tasks over chunks of pixels (see
// the NHWC section).

#include "instance_norm_act.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace melano {

namespace {

constexpr int64_t kBlock = 2048;  // elements summed in the accumulation type before going to double
constexpr int kUnroll = 4;        // independent vector sums per sum (see sum_lanes; written out there)

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

// The sum of a vector's lanes, as a tree (log2 L dependent adds, not L - 1).
template <typename A, int L>
MELANO_INLINE A hsum(Vec<A, L> v) {
  if constexpr (L == 1) return v;
  else {
    Vec<A, L / 2> lo, hi;
    std::memcpy(&lo, &v, sizeof(lo));
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
    return hsum<A, L / 2>(lo + hi);
  }
}

// The NCHW loops below take a plane's last, partial vector whole when `spill` says that the L elements
// from it lie inside the current task range of planes (the planes after this one, which the same
// thread handles next): reading past the plane is then safe, and so is writing past it, since the
// next plane's pass overwrites what spilled. The sums drop the lanes past the plane. Without spill
// (the last planes of a range) the tail goes element by element: a chain of scalar adds and a few
// times more instructions, which for planes of 25 to 144 elements used to cost as much as the vectors.

// Calls f(Lanes<L>, i) for the vectors of [0, n) and the partial last one (spill), or f(Lanes<1>, i)
// for each element left.
template <int L, typename F>
MELANO_INLINE void for_lanes(int64_t n, bool spill, const F& f) {
  int64_t i = 0;
  for (; i + L <= n; i += L) f(Lanes<L>{}, i);
  if (spill && i < n) return f(Lanes<L>{}, i);
  for (; i < n; ++i) f(Lanes<1>{}, i);
}

// acc[k] += v[k], only in the first `lanes` lanes when given.
template <typename V, size_t K>
MELANO_INLINE void add(V (&acc)[K], const std::array<V, K>& v) {
  for (size_t k = 0; k < K; ++k) acc[k] += v[k];
}

template <typename A, int L, size_t K>
MELANO_INLINE void add(Vec<A, L> (&acc)[K], const std::array<Vec<A, L>, K>& v, int64_t lanes) {
  Vec<A, L> index;
  for (int j = 0; j < L; ++j) index[j] = A(j);
  for (size_t k = 0; k < K; ++k) acc[k] += index < splat<Vec<A, L>>(A(lanes)) ? v[k] : Vec<A, L>{};
}

// total[k] += the sum over [0, n) of the K values that f(lanes, i) returns. The vectors go into
// kUnroll sets of accumulators in turn: a vector add takes ~4 cycles and two can start each cycle,
// so one set would leave the adder idle most of the time on data in L1. Each block of kBlock
// elements is summed in A, then added in double: this bounds the float rounding error of long sums.
template <typename A, int L, size_t K, typename F>
MELANO_INLINE void sum_lanes(int64_t n, bool spill, double (&total)[K], const F& f) {
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(n, start + kBlock);
    Vec<A, L> acc[kUnroll][K] = {};
    A tail[K] = {};
    int64_t i = start;
    for (; i + kUnroll * L <= end; i += kUnroll * L)
      for (int u = 0; u < kUnroll; ++u) add(acc[u], f(Lanes<L>{}, i + u * L));
    for (int u = 0; u < kUnroll - 1; ++u) {  // the vectors left: fewer than kUnroll (a constant index
      if (i + L > end) break;                 // into acc, so that acc stays in registers)
      add(acc[u], f(Lanes<L>{}, i));
      i += L;
    }
    if (spill && i < end) add<A, L, K>(acc[kUnroll - 1], f(Lanes<L>{}, i), end - i);
    else for (; i < end; ++i) add(tail, f(Lanes<1>{}, i));
    for (size_t k = 0; k < K; ++k) {
      const Vec<A, L> v = (acc[0][k] + acc[1][k]) + (acc[2][k] + acc[3][k]);
      total[k] += double(hsum<A, L>(v)) + double(tail[k]);
    }
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
  // NHWC only: tasks are chunks of `rows` pixels of one image; part holds each chunk's per-channel
  // partial results (two arrays of C doubles per chunk), consts each image's per-channel constants
  // (six arrays of Cp values, see channel_constants).
  int64_t rows = 0, chunks = 0, Cp = 0;
  double* part = nullptr;
  A* consts = nullptr;
};

// Prefetches base[i] into L2 once per 64 bytes of a plane's elements i (see planes).
template <typename T>
MELANO_INLINE void prefetch_l2(const T* base, int64_t i) {
  if (((i * int64_t(sizeof(T))) & 63) == 0) __builtin_prefetch(base + i, 0, 2);
}

// One (n, c) plane p of an NCHW tensor, forward: its statistics (two passes: the mean; the corrected
// variance), then its output. A plane is at most a few hundred KiB in a CycleGAN, so the passes after
// the first read it from L1 or L2. spill: see for_lanes; ahead: see planes.
template <typename T, int L>
MELANO_INLINE void forward_stats(const Args<T>& a, int64_t p, bool spill, int64_t ahead) {
  using A = at::opmath_type<T>;
  const int64_t hw = a.hw;
  const T* __restrict__ xp = a.x + p * hw;
  double sum[1] = {0};
  sum_lanes<A, L>(hw, spill, sum, [&](auto lanes, int64_t i) MELANO_LAMBDA {
    return std::array{load<A>(lanes, xp + i)};
  });
  const double inv_hw = 1.0 / double(hw);  // one division per plane: they are on its critical path
  const A mean0 = A(sum[0] * inv_hw);
  // Sum of (x - mean0) too: it is ~0 and corrects the rounding of mean0 (Chan, Golub & LeVeque).
  double m[2] = {0, 0};
  const T* next_x = xp + ahead * hw;
  sum_lanes<A, L>(hw, spill, m, [&](auto lanes, int64_t i) MELANO_LAMBDA {
    prefetch_l2(next_x, i);
    const auto d = load<A>(lanes, xp + i) - mean0;
    return std::array{d, d * d};
  });
  const double var = std::max(0.0, (m[1] - m[0] * m[0] * inv_hw) * inv_hw);
  a.mean[p] = A(double(mean0) + m[0] * inv_hw);
  a.rstd[p] = A(1.0 / std::sqrt(var + a.eps));
}

template <typename T, int ACT, int L>
MELANO_INLINE void forward_output(const Args<T>& a, int64_t p, bool spill, int64_t ahead) {
  using A = at::opmath_type<T>;
  const T* __restrict__ xp = a.x + p * a.hw;
  T* __restrict__ yp = a.out + p * a.hw;
  const T* next_y = yp + ahead * a.hw;
  const A mean = a.mean[p];
  const auto [scale, shift] = affine_of(a.rstd[p], a.w, a.b, a.w || a.b ? p % a.C : 0);
  for_lanes<L>(a.hw, spill, [&](auto lanes, int64_t i) MELANO_LAMBDA {
    prefetch_l2(next_y, i);
    store(yp + i, act_fwd<ACT>(pre_act(load<A>(lanes, xp + i) - mean, scale, shift), a.slope));
  });
}

// The backward of plane p: the sums of g and g * xhat (one pass over x and dy), then dx (another),
// with g = dy * act'(y_pre) and xhat = (x - mean) * rstd computed by each pass as f(lanes, i, g, xhat).
template <typename T, int ACT, typename F>
MELANO_INLINE void backward_elements(const Args<T>& a, int64_t p, const F& f) {
  using A = at::opmath_type<T>;
  const T* __restrict__ xp = a.x + p * a.hw;
  const T* __restrict__ dyp = a.dy + p * a.hw;
  const A mean = a.mean[p], rstd = a.rstd[p];
  const auto [scale, shift] = affine_of(rstd, a.w, a.b, a.w || a.b ? p % a.C : 0);
  f([&](auto lanes, int64_t i) MELANO_LAMBDA {
    const auto d = load<A>(lanes, xp + i) - mean;
    return std::array{act_grad<ACT>(pre_act(d, scale, shift), load<A>(lanes, dyp + i), a.slope), d * rstd};
  }, scale);
}

template <typename T, int ACT, int L>
MELANO_INLINE void backward_sums(const Args<T>& a, int64_t p, bool spill, int64_t ahead) {
  using A = at::opmath_type<T>;
  const T* next_x = a.x + (p + ahead) * a.hw;
  backward_elements<T, ACT>(a, p, [&](const auto& g_and_xhat, A) MELANO_LAMBDA {
    double s[2] = {0, 0};
    sum_lanes<A, L>(a.hw, spill, s, [&](auto lanes, int64_t i) MELANO_LAMBDA {
      prefetch_l2(next_x, i);
      const auto [g, xhat] = g_and_xhat(lanes, i);
      return std::array{g, g * xhat};
    });
    a.sum_g[p] = s[0];
    a.sum_gx[p] = s[1];
  });
}

template <typename T, int ACT, int L>
MELANO_INLINE void backward_dx(const Args<T>& a, int64_t p, bool spill, int64_t ahead) {
  using A = at::opmath_type<T>;
  T* __restrict__ dxp = a.out + p * a.hw;
  const T* next_dy = a.dy + (p + ahead) * a.hw;
  const T* next_dx = dxp + ahead * a.hw;
  const double inv_hw = 1.0 / double(a.hw);
  const A mg = A(a.sum_g[p] * inv_hw), mgx = A(a.sum_gx[p] * inv_hw);
  backward_elements<T, ACT>(a, p, [&](const auto& g_and_xhat, A scale) MELANO_LAMBDA {
    for_lanes<L>(a.hw, spill, [&](auto lanes, int64_t i) MELANO_LAMBDA {
      prefetch_l2(next_dy, i);
      prefetch_l2(next_dx, i);
      const auto [g, xhat] = g_and_xhat(lanes, i);
      store(dxp + i, grad_input(g, xhat, scale, mg, mgx));
    });
  });
}

// NCHW planes [begin, end) of a task range, in groups of about kGroupBytes: first each plane's
// statistics (forward) or sums (backward), then each one's output. A small plane's statistics are
// a chain of dependent adds, a division and a square root; the next plane's, close behind in the
// instruction stream, run alongside it. A group stays in L1 between its two loops.
// Only a plane's first pass reads memory, the others read the caches, and the hardware prefetchers
// do not run ahead into the next plane while a pass re-reads this one. So the passes of plane t also
// prefetch into L2 the same plane of the next group, t + ahead, spread over the passes that read
// the caches: x in the forward's variance pass, the output lines (fetched for writing anyway) in its
// output pass; x in the backward's sums pass, dy and dx in its dx pass. Memory then streams while
// the group computes. With other variants' calls in between (as in a training step, where x and dy
// are out of the caches by the backward), the median forward + backward over bench_ops.py's 16 shapes
// went from 2.13x to 2.64x eager (AVX2, both in one process); tensors of 32-64 MiB, bound by memory
// bandwidth either way, lost 1-4%.
constexpr int64_t kGroupBytes = 16384;

template <typename T, int ACT, int L, bool FORWARD>
MELANO_INLINE void planes(const Args<T>& a, int64_t begin, int64_t end) {
  const int64_t group = std::max<int64_t>(1, kGroupBytes / int64_t(a.hw * sizeof(T)));
  for (int64_t g0 = begin; g0 < end; g0 += group) {
    const int64_t g1 = std::min(end, g0 + group);
    const int64_t ahead = g1 < end ? group : 0;  // the last group prefetches itself (from cache)
    for (int64_t t = g0; t < g1; ++t) {
      const bool spill = (end - t - 1) * a.hw >= L;  // see for_lanes
      if constexpr (FORWARD) forward_stats<T, L>(a, t, spill, std::min(ahead, end - 1 - t));
      else backward_sums<T, ACT, L>(a, t, spill, std::min(ahead, end - 1 - t));
    }
    for (int64_t t = g0; t < g1; ++t) {
      const bool spill = (end - t - 1) * a.hw >= L;
      if constexpr (FORWARD) forward_output<T, ACT, L>(a, t, spill, std::min(ahead, end - 1 - t));
      else backward_dx<T, ACT, L>(a, t, spill, std::min(ahead, end - 1 - t));
    }
  }
}

// ---- NHWC (channels_last): SIMD across channels -------------------------------------------------
// x is (N, H * W, C) in memory. A task is a chunk of `rows` consecutive pixels of one image, about
// kChunkElems elements (at most kBlock pixels, so that each channel's float sums stay short). Its
// statistics are a two-pass mean and M2 per channel (the second pass reads the chunk from L2); the
// chunks' are combined per image in double, and a second task loop writes the output.
// Within a chunk the loops take blocks of kRowBlock pixels and, in each, groups of G vectors of L
// channels: a group's sums and constants stay in registers across the block's pixels, and a block
// (a few KiB) stays in L1 across its groups. Per-channel arrays are padded to Cp channels; lanes past
// C compute on zeros and are never stored. Unlike an NCHW plane, an image too large for the caches is
// read from memory twice (statistics, then output; likewise x and dy in the backward).

constexpr int64_t kChunkElems = 16384;
constexpr int64_t kRowBlock = 8;
constexpr int64_t kPrefetchBlocks = 3;  // how far ahead for_groups prefetches
constexpr int kGroup = 4;  // vectors per group, at most (see nhwc_task)

// Pixels per NHWC chunk for C channels and H * W = hw.
int64_t nhwc_rows(int64_t C, int64_t hw) {
  return std::min(hw, std::clamp<int64_t>(kChunkElems / C, 1, kBlock));
}

// Channels [c, c + L) of a row of C channels; when PARTIAL, lanes past C read as 0 and are not stored.
template <typename A, int L, bool PARTIAL, typename T>
MELANO_INLINE Vec<A, L> load_channels(const T* row, int64_t c, int64_t C) {
  if (!PARTIAL || c + L <= C) return load<A>(Lanes<L>{}, row + c);
  Vec<A, L> v = {};
  for (int64_t j = 0; c + j < C; ++j) v[j] = A(row[c + j]);
  return v;
}

template <int L, bool PARTIAL, typename T, typename V>
MELANO_INLINE void store_channels(T* row, int64_t c, int64_t C, V v) {
  if (!PARTIAL || c + L <= C) store(row + c, v);
  else for (int64_t j = 0; c + j < C; ++j) row[c + j] = T(v[j]);
}

// Calls f(partial, c, r0, r1) for each block [r0, r1) of a chunk's pixels and each group of G vectors
// of channels from c in it; partial is std::true_type for a last group that reaches past C. The
// group-by-group order strides through memory, which the hardware prefetchers follow badly, so each
// block starts by prefetching a later block of the chunk's arrays (contiguous memory) into L2.
template <int L, int G, typename F, typename... T>
MELANO_INLINE void for_groups(int64_t rows, int64_t C, const F& f, const T*... arrays) {
  for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
    const int64_t r1 = std::min(rows, r0 + kRowBlock);
    const int64_t p0 = std::min(rows, r0 + kPrefetchBlocks * kRowBlock), p1 = std::min(rows, p0 + kRowBlock);
    auto prefetch = [&](const auto* p) MELANO_LAMBDA {
      const char* end = reinterpret_cast<const char*>(p + p1 * C);
      for (const char* q = reinterpret_cast<const char*>(p + p0 * C); q < end; q += 64) __builtin_prefetch(q, 0, 1);
    };
    (prefetch(arrays), ...);
    int64_t c = 0;
    for (; c + G * L <= C; c += G * L) f(std::false_type{}, c, r0, r1);
    if (c < C) f(std::true_type{}, c, r0, r1);
  }
}

// Chunk t: its image n, its pixel count, and where its data and its image's channel constants lie.
template <typename T>
struct Chunk {
  int64_t n, rows;
  const T* x;
  const T* dy;  // backward only
  T* out;
  const at::opmath_type<T>* consts;
};

template <typename T>
Chunk<T> chunk_of(const Args<T>& a, int64_t t) {
  const int64_t n = t / a.chunks, r0 = (t % a.chunks) * a.rows, offset = (n * a.hw + r0) * a.C;
  return {n, std::min(a.rows, a.hw - r0), a.x + offset, a.dy ? a.dy + offset : nullptr, a.out + offset,
          a.consts + n * 6 * a.Cp};
}

// Image n's per-channel constants in a.consts: mean, rstd, scale, shift (from a.mean and a.rstd) and,
// for dx, mean(g) and mean(g * xhat) (filled later, by nhwc_merge_sums). Arrays of Cp, zero padded.
template <typename T>
at::opmath_type<T>* channel_constants(const Args<T>& a, int64_t n) {
  using A = at::opmath_type<T>;
  A* k = a.consts + n * 6 * a.Cp;
  std::fill(k, k + 6 * a.Cp, A(0));
  for (int64_t c = 0; c < a.C; ++c) {
    const auto [scale, shift] = affine_of(a.rstd[n * a.C + c], a.w, a.b, c);
    k[c] = a.mean[n * a.C + c];
    k[a.Cp + c] = a.rstd[n * a.C + c];
    k[2 * a.Cp + c] = scale;
    k[3 * a.Cp + c] = shift;
  }
  return k;
}

// Forward, first task loop: chunk t's per-channel mean and M2 (two passes) into a.part.
template <typename T, int L, int G>
MELANO_INLINE void nhwc_stats_chunk(const Args<T>& a, int64_t t) {
  using A = at::opmath_type<T>;
  constexpr Lanes<L> lanes{};
  const Chunk<T> ch = chunk_of(a, t);
  const int64_t C = a.C, Cp = a.Cp;
  const T* __restrict__ x = ch.x;
  std::vector<A> sums(3 * Cp, A(0));  // per channel: the sum of x, then those of d = x - mean0 and d^2
  A *s = sums.data(), *m1 = s + Cp, *m2 = s + 2 * Cp;
  for_groups<L, G>(ch.rows, C, [&](auto partial, int64_t c, int64_t r0, int64_t r1) MELANO_LAMBDA {
    constexpr bool P = decltype(partial)::value;
    Vec<A, L> acc[G];
    for (int g = 0; g < G; ++g) acc[g] = load<A>(lanes, s + c + g * L);
    for (int64_t r = r0; r < r1; ++r)
      for (int g = 0; g < G; ++g) acc[g] += load_channels<A, L, P>(x + r * C, c + g * L, C);
    for (int g = 0; g < G; ++g) store(s + c + g * L, acc[g]);
  }, x);
  for (int64_t c = 0; c < Cp; c += L) store(s + c, load<A>(lanes, s + c) / A(ch.rows));  // mean0
  // Sums of d too, to correct the rounding of mean0 (as in forward_plane).
  for_groups<L, G>(ch.rows, C, [&](auto partial, int64_t c, int64_t r0, int64_t r1) MELANO_LAMBDA {
    constexpr bool P = decltype(partial)::value;
    Vec<A, L> mean0[G], acc1[G], acc2[G];
    for (int g = 0; g < G; ++g) {
      mean0[g] = load<A>(lanes, s + c + g * L);
      acc1[g] = load<A>(lanes, m1 + c + g * L);
      acc2[g] = load<A>(lanes, m2 + c + g * L);
    }
    for (int64_t r = r0; r < r1; ++r) {
      for (int g = 0; g < G; ++g) {
        const auto d = load_channels<A, L, P>(x + r * C, c + g * L, C) - mean0[g];
        acc1[g] += d;
        acc2[g] += d * d;
      }
    }
    for (int g = 0; g < G; ++g) {
      store(m1 + c + g * L, acc1[g]);
      store(m2 + c + g * L, acc2[g]);
    }
  });
  double* out = a.part + t * 2 * C;
  for (int64_t c = 0; c < C; ++c) {
    out[c] = double(s[c]) + double(m1[c]) / double(ch.rows);
    out[C + c] = double(m2[c]) - double(m1[c]) * double(m1[c]) / double(ch.rows);
  }
}

// Between the forward's task loops, image n: the chunks' (mean_k, M2_k) of n_k pixels combined into
// mean = sum(n_k mean_k) / hw and M2 = sum(M2_k + n_k (mean_k - mean)^2), in double; then rstd and
// the image's channel constants.
template <typename T>
void nhwc_merge_stats(const Args<T>& a, int64_t n) {
  using A = at::opmath_type<T>;
  const int64_t C = a.C;
  const double* part = a.part + n * a.chunks * 2 * C;
  std::vector<double> mean(C, 0.0), m2(C, 0.0);
  for (int64_t k = 0; k < a.chunks; ++k) {
    const double rows = double(std::min(a.rows, a.hw - k * a.rows));
    for (int64_t c = 0; c < C; ++c) mean[c] += rows * part[k * 2 * C + c];
  }
  for (int64_t c = 0; c < C; ++c) mean[c] /= double(a.hw);
  for (int64_t k = 0; k < a.chunks; ++k) {
    const double rows = double(std::min(a.rows, a.hw - k * a.rows));
    for (int64_t c = 0; c < C; ++c) {
      const double d = part[k * 2 * C + c] - mean[c];
      m2[c] += part[k * 2 * C + C + c] + rows * d * d;
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    a.mean[n * C + c] = A(mean[c]);
    a.rstd[n * C + c] = A(1.0 / std::sqrt(std::max(0.0, m2[c] / double(a.hw)) + a.eps));
  }
  channel_constants(a, n);
}

// Forward, second task loop: chunk t's output.
template <typename T, int ACT, int L, int G>
MELANO_INLINE void nhwc_forward_chunk(const Args<T>& a, int64_t t) {
  using A = at::opmath_type<T>;
  const Chunk<T> ch = chunk_of(a, t);
  const int64_t C = a.C, Cp = a.Cp;
  constexpr Lanes<L> lanes{};
  for_groups<L, G>(ch.rows, C, [&](auto partial, int64_t c, int64_t r0, int64_t r1) MELANO_LAMBDA {
    constexpr bool P = decltype(partial)::value;
    Vec<A, L> mean[G], scale[G], shift[G];
    for (int g = 0; g < G; ++g) {
      mean[g] = load<A>(lanes, ch.consts + c + g * L);
      scale[g] = load<A>(lanes, ch.consts + 2 * Cp + c + g * L);
      shift[g] = load<A>(lanes, ch.consts + 3 * Cp + c + g * L);
    }
    for (int64_t r = r0; r < r1; ++r) {
      for (int g = 0; g < G; ++g) {
        const auto d = load_channels<A, L, P>(ch.x + r * C, c + g * L, C) - mean[g];
        store_channels<L, P>(ch.out + r * C, c + g * L, C, act_fwd<ACT>(pre_act(d, scale[g], shift[g]), a.slope));
      }
    }
  }, ch.x, static_cast<const T*>(ch.out));
}

// The backward's two task loops, chunk t: sums of g and g * xhat into a.part (SUMS), or dx.
template <typename T, int ACT, int L, int G, bool SUMS>
MELANO_INLINE void nhwc_backward_chunk(const Args<T>& a, int64_t t) {
  using A = at::opmath_type<T>;
  const Chunk<T> ch = chunk_of(a, t);
  const T* __restrict__ x = ch.x;
  const T* __restrict__ dy = ch.dy;
  T* __restrict__ dx = ch.out;
  const A* k = ch.consts;
  const int64_t C = a.C, Cp = a.Cp;
  constexpr Lanes<L> lanes{};
  std::vector<A> sums(SUMS ? 2 * Cp : 0, A(0));  // per channel: the sums of g and of g * xhat
  for_groups<L, G>(ch.rows, C, [&](auto partial, int64_t c, int64_t r0, int64_t r1) MELANO_LAMBDA {
    constexpr bool P = decltype(partial)::value;
    // Per vector of the group: mean, rstd, scale, shift, then the sums (SUMS) or mean(g), mean(g * xhat).
    Vec<A, L> q[6][G];
    for (int j = 0; j < 4; ++j)
      for (int g = 0; g < G; ++g) q[j][g] = load<A>(lanes, k + j * Cp + c + g * L);
    for (int j = 4; j < 6; ++j)
      for (int g = 0; g < G; ++g) q[j][g] = load<A>(lanes, (SUMS ? sums.data() + (j - 4) * Cp : k + j * Cp) + c + g * L);
    for (int64_t r = r0; r < r1; ++r) {
      for (int g = 0; g < G; ++g) {
        const auto d = load_channels<A, L, P>(x + r * C, c + g * L, C) - q[0][g];
        const auto dyv = load_channels<A, L, P>(dy + r * C, c + g * L, C);
        const auto gv = act_grad<ACT>(pre_act(d, q[2][g], q[3][g]), dyv, a.slope);
        if constexpr (SUMS) {
          q[4][g] += gv;
          q[5][g] += gv * (d * q[1][g]);
        } else {
          store_channels<L, P>(dx + r * C, c + g * L, C, grad_input(gv, d * q[1][g], q[2][g], q[4][g], q[5][g]));
        }
      }
    }
    if constexpr (SUMS) {
      for (int g = 0; g < G; ++g) {
        store(sums.data() + c + g * L, q[4][g]);
        store(sums.data() + Cp + c + g * L, q[5][g]);
      }
    }
  }, x, dy, static_cast<const T*>(dx));
  if constexpr (SUMS) {
    double* out = a.part + t * 2 * C;
    for (int64_t c = 0; c < C; ++c) {
      out[c] = sums[c];
      out[C + c] = sums[Cp + c];
    }
  }
}

// Between the backward's task loops, image n: the chunks' sums added in double, into a.sum_g and
// a.sum_gx, and mean(g) and mean(g * xhat) into the image's channel constants.
template <typename T>
void nhwc_merge_sums(const Args<T>& a, int64_t n) {
  using A = at::opmath_type<T>;
  const int64_t C = a.C;
  const double* part = a.part + n * a.chunks * 2 * C;
  double *sg = a.sum_g + n * C, *sgx = a.sum_gx + n * C;
  std::fill(sg, sg + C, 0.0);
  std::fill(sgx, sgx + C, 0.0);
  for (int64_t k = 0; k < a.chunks; ++k) {
    for (int64_t c = 0; c < C; ++c) {
      sg[c] += part[k * 2 * C + c];
      sgx[c] += part[k * 2 * C + C + c];
    }
  }
  A* consts = a.consts + n * 6 * a.Cp;
  for (int64_t c = 0; c < C; ++c) {
    consts[4 * a.Cp + c] = A(sg[c] / double(a.hw));
    consts[5 * a.Cp + c] = A(sgx[c] / double(a.hw));
  }
}

enum Pass : int {
  kForwardPlanes, kBackwardPlanes,                          // NCHW
  kNhwcStats, kNhwcForward, kNhwcBackwardSums, kNhwcBackward  // NHWC
};

// An NHWC task with groups of G vectors: the fewest that hold C channels, up to kGroup, so that few
// channels (C = 16 in 8-lane AVX2 vectors) do not leave half of each group's vectors empty.
template <typename T, int ACT, int PASS, int L, int G>
MELANO_INLINE void nhwc_task(const Args<T>& a, int64_t t) {
  if constexpr (PASS == kNhwcStats) nhwc_stats_chunk<T, L, G>(a, t);
  else if constexpr (PASS == kNhwcForward) nhwc_forward_chunk<T, ACT, L, G>(a, t);
  else nhwc_backward_chunk<T, ACT, L, G, PASS == kNhwcBackwardSums>(a, t);
}

// The task loops, compiled for three instruction sets and picked at run time: the cached build must
// run on any x86-64 CPU (no -march=native), yet AVX-512 and AVX2 are worth 2-4x on the passes that
// run from cache. Each variant uses its native vector width of W bytes, so the sums' rounding differs
// between them in the last bits; the elementwise arithmetic is the same IEEE operations in all of them
// (no FMA: -ffp-contract=off). MELANO_CPU_ISA=default|avx2 caps the choice (the tests compare them).
template <typename T, int ACT, int PASS, int W>
MELANO_INLINE void tasks_generic(const Args<T>& a, int64_t begin, int64_t end) {
  constexpr int L = W / sizeof(at::opmath_type<T>);
  if constexpr (PASS == kForwardPlanes || PASS == kBackwardPlanes) {
    planes<T, ACT, L, PASS == kForwardPlanes>(a, begin, end);
  } else {
    for (int64_t t = begin; t < end; ++t) {
      if (a.C <= L) nhwc_task<T, ACT, PASS, L, 1>(a, t);  // see nhwc_task
      else if (a.C <= 2 * L) nhwc_task<T, ACT, PASS, L, 2>(a, t);
      else nhwc_task<T, ACT, PASS, L, kGroup>(a, t);
    }
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
  if (isa >= kIsaAvx2) fn = &tasks_avx2<T, ACT, PASS>;
  // The NHWC loops have no AVX-512 variant (AVX-512 CPUs run their AVX2 one): GCC 12 crashes compiling
  // it for BFloat16 (internal compiler error in do_store_flag).
  if constexpr (PASS == kForwardPlanes || PASS == kBackwardPlanes) {
    if (isa == kIsaAvx512) fn = &tasks_avx512<T, ACT, PASS>;
  }
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

// An output of 32 MiB or more gets a mapping of its own from glibc (whose mmap threshold stops at 32
// MiB) on every call, and its first writes fault it in 4 KiB at a time: at 4x64x256^2 those faults took
// longer than the kernels (bench/bench_ops_faults.py). Asking for 2 MiB pages on the buffer's aligned
// inside makes them 512 times fewer. Below 32 MiB the buffer may share the heap, whose mapping madvise
// would split, so it is left alone. Advisory: a kernel without transparent huge pages ignores it.
// MELANO_HUGE_PAGES=0, read at each such call, turns it off (bench/bench_ops_faults.py compares); 1 or
// unset leaves it on, and any other value is an error rather than a silent default.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t bytes = t.nbytes();
  if (bytes < (uintptr_t(32) << 20)) return;
  const char* env = std::getenv("MELANO_HUGE_PAGES");
  TORCH_CHECK(!env || !std::strcmp(env, "0") || !std::strcmp(env, "1"),
              "MELANO_HUGE_PAGES must be 0 (off) or 1 (on), got '", env, "'");
  if (env && std::strcmp(env, "0") == 0) return;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = (begin + bytes) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // a failure only loses the gain
#endif
}

// The NHWC chunking and its workspaces (returned: they must outlive the task loops).
template <typename T>
std::pair<at::Tensor, at::Tensor> nhwc_setup(Args<T>& args, const Inputs& in) {
  args.rows = nhwc_rows(std::max<int64_t>(1, in.C), in.hw);
  args.chunks = (in.hw + args.rows - 1) / args.rows;
  args.Cp = (in.C + 63) / 64 * 64;  // a multiple of every group width G * L
  at::Tensor part = at::empty({in.N * args.chunks * 2 * in.C}, in.x.options().dtype(at::kDouble));
  at::Tensor consts = at::empty({in.N * 6 * args.Cp}, in.x.options().dtype(in.acc));
  args.part = part.data_ptr<double>();
  args.consts = consts.data_ptr<at::opmath_type<T>>();
  return {part, consts};
}

// The forward's task loops: one task per NCHW plane; or the NHWC chunks' statistics, their merge per
// image, then the chunks' output. The merges (chunks x C values per image) run in this thread: a
// parallel region fewer matters more, on a busy machine above all, where a region's threads wait for
// whichever of them the OS descheduled.
template <typename T, int ACT>
void run_forward(Args<T>& args, const Inputs& in) {
  if (in.layout != at::MemoryFormat::ChannelsLast) {
    return run_tasks<T, ACT, kForwardPlanes>(args, in.N * in.C, in.hw);
  }
  const auto workspaces = nhwc_setup(args, in);
  run_tasks<T, kNone, kNhwcStats>(args, in.N * args.chunks, args.rows * in.C);
  for (int64_t n = 0; n < in.N; ++n) nhwc_merge_stats(args, n);
  run_tasks<T, ACT, kNhwcForward>(args, in.N * args.chunks, args.rows * in.C);
}

// The backward's: one task per NCHW plane; or, for NHWC, the channel constants of each image, the
// chunks' sums, their merge per image, then the chunks' dx.
template <typename T, int ACT>
void run_backward(Args<T>& args, const Inputs& in) {
  if (in.layout != at::MemoryFormat::ChannelsLast) {
    return run_tasks<T, ACT, kBackwardPlanes>(args, in.N * in.C, in.hw);
  }
  const auto workspaces = nhwc_setup(args, in);
  for (int64_t n = 0; n < in.N; ++n) channel_constants(args, n);
  run_tasks<T, ACT, kNhwcBackwardSums>(args, in.N * args.chunks, args.rows * in.C);
  for (int64_t n = 0; n < in.N; ++n) nhwc_merge_sums(args, n);
  run_tasks<T, ACT, kNhwcBackward>(args, in.N * args.chunks, args.rows * in.C);
}

#ifndef MELANO_CPU_BACKWARD
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(const at::Tensor& x,
                                                           const c10::optional<at::Tensor>& weight,
                                                           const c10::optional<at::Tensor>& bias,
                                                           double eps, c10::string_view act, double slope) {
  const Inputs in = forward_inputs(x, weight, bias, eps, act);
  at::Tensor y, mean, rstd;
  std::tie(y, mean, rstd) = forward_outputs(in);
  advise_huge_pages(y);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "inorm_act_fwd_cpu", [&] {
    Args<scalar_t> args = make_args<scalar_t>(in, y, mean, rstd, eps, slope);
    dispatch_act(in.act, [&](auto a) { run_forward<scalar_t, decltype(a)::value>(args, in); });
  });
  return {y, mean, rstd};
}

#else  // the backward half

// dweight and dbias: the planes' sums of g * xhat and of g, added over the batch for each channel.
template <typename A>
void channel_sums(const std::vector<double>& sum_gx, const std::vector<double>& sum_g, int64_t N, int64_t C,
                  A* dw, A* db) {
  for (int64_t c = 0; c < C; ++c) {
    double w = 0, b = 0;
    for (int64_t n = 0; n < N; ++n) {
      w += sum_gx[n * C + c];
      b += sum_g[n * C + c];
    }
    dw[c] = A(w);
    db[c] = A(b);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd,
    c10::string_view act, double slope) {
  Inputs in = backward_inputs(grad_y, x, weight, bias, mean, rstd, act);
  at::Tensor dx = at::empty_like(in.x, in.layout);
  advise_huge_pages(dx);
  const auto acc = in.x.options().dtype(in.acc);
  at::Tensor dw = at::empty({in.C}, acc), db = at::empty({in.C}, acc);
  std::vector<double> sum_g(in.N * in.C), sum_gx(in.N * in.C);  // per plane
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "inorm_act_bwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    Args<scalar_t> args = make_args<scalar_t>(in, dx, in.mean, in.rstd, 0.0, slope);
    args.sum_g = sum_g.data();
    args.sum_gx = sum_gx.data();
    dispatch_act(in.act, [&](auto a) { run_backward<scalar_t, decltype(a)::value>(args, in); });
    channel_sums(sum_gx, sum_g, in.N, in.C, dw.data_ptr<A>(), db.data_ptr<A>());
  });
  return {dx, dw, db};
}
#endif

}  // namespace

// Each half registers its own kernel (TORCH_LIBRARY_IMPL may appear once per source file).
TORCH_LIBRARY_IMPL(melano, CPU, m) {
#ifndef MELANO_CPU_BACKWARD
  m.impl("inorm_act_fwd", &forward_cpu);
#else
  m.impl("inorm_act_bwd", &backward_cpu);
#endif
}

}  // namespace melano
