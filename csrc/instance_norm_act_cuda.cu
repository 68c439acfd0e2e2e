// Fused InstanceNorm + activation: CUDA kernels for the ops defined in instance_norm_act_autograd.cpp
// (the schemas and the autograd, registered once at the Autograd key for every device; this file only
// registers the CUDA kernels).
// fp32, fp16 and bf16 (fp32 accumulation) and fp64; forward and backward; affine or not. The formulas
// are those of reference/instance_norm_act.py; the activation, dx and checks are in instance_norm_act.h.
//
// Two paths, picked by the plane size hw = H * W:
//  * hw <= kMaxRegPlane: one block per (n, c) plane. Each thread keeps its ITEMS elements in registers,
//    so x (and dy in the backward) is read from memory once and y (dx) written once. The statistics
//    are a two-pass mean / corrected variance over those registers: exact and safe for planes whose
//    mean is far larger than their std.
//  * larger planes: a plane is split into chunks of kChunkItems * kChunkThreads elements so that a
//    few planes still fill the GPU. Kernel 1 writes per-chunk statistics (count, mean, M2 from the
//    same two-pass in registers; or the backward's two sums); kernel 2 merges them (Chan et al.'s
//    parallel variance formula) and writes the output. x is read twice; the second read is usually
//    served from L2.
// A channels_last x runs the NHWC kernels instead (see their section), and gets channels_last y and dx.
// Only c10/cuda headers are included: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers that
// a bare toolkit may lack.

#include "instance_norm_act.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>
#include <torch/library.h>

#include <cuda.h>
#include <cuda_runtime.h>

namespace melano {

namespace {

constexpr int kWarp = 32;
constexpr int64_t kMaxRegPlane = 16 * 1024;  // 16 items x 1024 threads
constexpr int kChunkItems = 8;
constexpr int kChunkThreads = 512;
constexpr int64_t kChunk = int64_t(kChunkItems) * kChunkThreads;

// Sums K values across the block; every thread gets the totals. blockDim.x must be a multiple of 32.
// smem holds K * 32 values.
template <int K, typename A>
__device__ __forceinline__ void block_sum(A (&v)[K], A* smem) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) v[k] += __shfl_xor_sync(0xffffffffu, v[k], off);
    if (lane == 0) smem[k * kWarp + warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    v[k] = lane < nwarps ? smem[k * kWarp + lane] : A(0);
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) v[k] += __shfl_xor_sync(0xffffffffu, v[k], off);
  }
  __syncthreads();  // smem may be reused by the next call
}

// block_sum, and column_sum below, as functors for load_and_moments.
template <typename A>
struct BlockSum {
  A* smem;
  template <int K>
  __device__ __forceinline__ void operator()(A (&v)[K]) const { block_sum<K>(v, smem); }
};

// Loads this thread's ITEMS elements of a slice of n_valid elements, item k being element
// i = lane + k * step at xp[i * stride]; then (reduced with `sum` over the threads that share the
// slice) the slice's mean and corrected sum of squared deviations m2: two passes, as forward_plane.
template <int ITEMS, typename T, typename A, typename Sum>
__device__ __forceinline__ void load_and_moments(const T* __restrict__ xp, int64_t stride, int lane, int step,
                                                 int64_t n_valid, A (&v)[ITEMS], const Sum& sum, A& mean,
                                                 A& m2) {
  A s[1] = {A(0)};
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    const int64_t i = lane + int64_t(k) * step;
    v[k] = i < n_valid ? static_cast<A>(xp[i * stride]) : A(0);
    s[0] += v[k];
  }
  sum(s);
  const A count = A(n_valid);
  const A mean0 = s[0] / count;
  A m[2] = {A(0), A(0)};
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    if (lane + int64_t(k) * step < n_valid) {
      const A d = v[k] - mean0;
      m[0] += d;
      m[1] += d * d;
    }
  }
  sum(m);
  mean = mean0 + m[0] / count;
  m2 = m[1] - m[0] * m[0] / count;
  if (m2 < A(0)) m2 = A(0);
}

// Chan, Golub & LeVeque: merges a piece of nb elements with mean mb and sum of squared deviations qb into
// the running (n, mean, q) of the pieces before it.
template <typename A>
__device__ __forceinline__ void chan_merge(A& n, A& mean, A& q, A nb, A mb, A qb) {
  if (nb == A(0)) return;
  if (n == A(0)) {
    n = nb;
    mean = mb;
    q = qb;
    return;
  }
  const A tot = n + nb, delta = mb - mean;
  mean += delta * nb / tot;
  q += qb + delta * delta * n * nb / tot;
  n = tot;
}

template <typename A>
struct Moments {
  A n, mean, m2;
};

// Merges the pieces j = lane, lane + nlanes, ... < pieces, piece(j) giving its (count, mean, M2), over the
// nlanes threads that share column col (a tree in smem, 3 * nlanes * ncols values; nlanes a power of
// 2): all of them get the merged mean and m2.
template <typename A, typename Piece>
__device__ void merge_pieces(int64_t pieces, const Piece& piece, int lane, int nlanes, int col, int ncols,
                             A* smem, A& mean, A& m2) {
  Moments<A> r{A(0), A(0), A(0)};
  for (int64_t j = lane; j < pieces; j += nlanes) {
    const Moments<A> b = piece(j);
    chan_merge(r.n, r.mean, r.m2, b.n, b.mean, b.m2);
  }
  A *sn = smem, *smu = smem + nlanes * ncols, *sq = smem + 2 * nlanes * ncols;
  const int i = lane * ncols + col;
  sn[i] = r.n;
  smu[i] = r.mean;
  sq[i] = r.m2;
  __syncthreads();
  for (int stride = nlanes / 2; stride > 0; stride /= 2) {
    if (lane < stride) chan_merge(sn[i], smu[i], sq[i], sn[i + stride * ncols], smu[i + stride * ncols],
                                  sq[i + stride * ncols]);
    __syncthreads();
  }
  mean = smu[col];
  m2 = sq[col];
  __syncthreads();
}

template <typename A>
__device__ __forceinline__ A inv_std(A m2, A count, double eps) {
  return A(1) / sqrt(m2 / count + A(eps));
}

// ---- small planes: one block per plane, plane in registers -------------------------------------

template <typename T, typename A, int ITEMS, int ACT>
__global__ void __launch_bounds__(1024) fwd_plane_kernel(const T* __restrict__ x, T* __restrict__ y, const A* __restrict__ w,
                                 const A* __restrict__ b, A* __restrict__ mean_out,
                                 A* __restrict__ rstd_out, int64_t C, int64_t hw, double eps,
                                 A slope) {
  __shared__ A smem[2 * kWarp];
  const int64_t p = blockIdx.x, c = p % C;
  const T* xp = x + p * hw;
  T* yp = y + p * hw;
  A v[ITEMS];
  A mean, m2;
  load_and_moments<ITEMS>(xp, 1, threadIdx.x, blockDim.x, hw, v, BlockSum<A>{smem}, mean, m2);
  const A rstd = inv_std(m2, A(hw), eps);
  const auto [scale, shift] = affine_of(rstd, w, b, c);
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    const int64_t i = threadIdx.x + int64_t(k) * blockDim.x;
    if (i < hw) yp[i] = static_cast<T>(act_fwd<ACT>(pre_act(v[k] - mean, scale, shift), slope));
  }
  if (threadIdx.x == 0) {
    mean_out[p] = mean;
    rstd_out[p] = rstd;
  }
}

template <typename T, typename A, int ITEMS, int ACT>
__global__ void __launch_bounds__(1024) bwd_plane_kernel(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                                 const A* __restrict__ w, const A* __restrict__ b,
                                 const A* __restrict__ mean_in, const A* __restrict__ rstd_in,
                                 A* __restrict__ sum_g, A* __restrict__ sum_gx, int64_t C, int64_t hw,
                                 A slope) {
  __shared__ A smem[2 * kWarp];
  const int64_t p = blockIdx.x, c = p % C;
  const A mean = mean_in[p], rstd = rstd_in[p];
  const auto [scale, shift] = affine_of(rstd, w, b, c);
  A d[ITEMS], g[ITEMS];
  A s[2] = {A(0), A(0)};
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    const int64_t i = threadIdx.x + int64_t(k) * blockDim.x;
    if (i < hw) {
      d[k] = static_cast<A>(x[p * hw + i]) - mean;
      g[k] = act_grad<ACT>(pre_act(d[k], scale, shift), static_cast<A>(dy[p * hw + i]), slope);
    } else {
      d[k] = A(0);
      g[k] = A(0);
    }
    s[0] += g[k];
    s[1] += g[k] * (d[k] * rstd);
  }
  block_sum<2>(s, smem);
  const A mg = s[0] / A(hw), mgx = s[1] / A(hw);
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    const int64_t i = threadIdx.x + int64_t(k) * blockDim.x;
    if (i < hw) dx[p * hw + i] = static_cast<T>(grad_input(g[k], d[k] * rstd, scale, mg, mgx));
  }
  if (threadIdx.x == 0) {
    sum_g[p] = s[0];
    sum_gx[p] = s[1];
  }
}

// ---- large planes: chunks, then a merge -----------------------------------------------------------
// Block index = plane * chunks + chunk (a flat x index: N * C may exceed gridDim.y's 65535).

// Calls f(i) for this thread's elements i (offsets in the plane) of a chunk: kChunkItems of them, coalesced.
template <typename F>
__device__ __forceinline__ void for_chunk_items(int64_t chunk, int64_t hw, const F& f) {
  const int64_t base = chunk * kChunk, n_valid = min(kChunk, hw - base);
#pragma unroll
  for (int k = 0; k < kChunkItems; ++k) {
    const int64_t i = threadIdx.x + int64_t(k) * blockDim.x;
    if (i < n_valid) f(base + i);
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kChunkThreads) fwd_chunk_stats_kernel(const T* __restrict__ x, A* __restrict__ part, int64_t hw,
                                       int64_t chunks) {
  __shared__ A smem[2 * kWarp];
  const int64_t p = blockIdx.x / chunks, chunk = blockIdx.x % chunks;
  A v[kChunkItems];
  A mean, m2;
  load_and_moments<kChunkItems>(x + p * hw + chunk * kChunk, 1, threadIdx.x, blockDim.x,
                                min(kChunk, hw - chunk * kChunk), v, BlockSum<A>{smem}, mean, m2);
  if (threadIdx.x == 0) {
    part[2 * int64_t(blockIdx.x)] = mean;
    part[2 * int64_t(blockIdx.x) + 1] = m2;
  }
}

template <typename T, typename A, int ACT>
__global__ void __launch_bounds__(kChunkThreads) fwd_chunk_apply_kernel(const T* __restrict__ x, T* __restrict__ y,
                                       const A* __restrict__ part, const A* __restrict__ w,
                                       const A* __restrict__ b, A* __restrict__ mean_out,
                                       A* __restrict__ rstd_out, int64_t C, int64_t hw, int64_t chunks,
                                       double eps, A slope) {
  __shared__ A smem[3 * kChunkThreads];
  const int64_t p = blockIdx.x / chunks, chunk = blockIdx.x % chunks, c = p % C;
  // Every block of the plane merges its chunks' statistics (they are few).
  A mean, m2;
  const auto piece = [&](int64_t j) {
    return Moments<A>{A(min(kChunk, hw - j * kChunk)), part[2 * (p * chunks + j)], part[2 * (p * chunks + j) + 1]};
  };
  merge_pieces(chunks, piece, threadIdx.x, blockDim.x, 0, 1, smem, mean, m2);
  const A rstd = inv_std(m2, A(hw), eps);
  const Affine<A> af = affine_of(rstd, w, b, c);  // not a structured binding: lambdas capture it (C++17)
  const A scale = af.scale, shift = af.shift;
  const T* xp = x + p * hw;
  T* yp = y + p * hw;
  for_chunk_items(chunk, hw, [&](int64_t i) {
    yp[i] = static_cast<T>(act_fwd<ACT>(pre_act(static_cast<A>(xp[i]) - mean, scale, shift), slope));
  });
  if (chunk == 0 && threadIdx.x == 0) {
    mean_out[p] = mean;
    rstd_out[p] = rstd;
  }
}

template <typename T, typename A, int ACT>
__global__ void __launch_bounds__(kChunkThreads) bwd_chunk_sums_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                      const A* __restrict__ w, const A* __restrict__ b,
                                      const A* __restrict__ mean_in, const A* __restrict__ rstd_in,
                                      A* __restrict__ part, int64_t C, int64_t hw, int64_t chunks,
                                      A slope) {
  __shared__ A smem[2 * kWarp];
  const int64_t p = blockIdx.x / chunks, chunk = blockIdx.x % chunks, c = p % C;
  const A mean = mean_in[p], rstd = rstd_in[p];
  const Affine<A> af = affine_of(rstd, w, b, c);  // not a structured binding: lambdas capture it (C++17)
  const A scale = af.scale, shift = af.shift;
  const T *xp = x + p * hw, *dyp = dy + p * hw;
  A s[2] = {A(0), A(0)};
  for_chunk_items(chunk, hw, [&](int64_t i) {
    const A d = static_cast<A>(xp[i]) - mean;
    const A g = act_grad<ACT>(pre_act(d, scale, shift), static_cast<A>(dyp[i]), slope);
    s[0] += g;
    s[1] += g * (d * rstd);
  });
  block_sum<2>(s, smem);
  if (threadIdx.x == 0) {
    part[2 * int64_t(blockIdx.x)] = s[0];
    part[2 * int64_t(blockIdx.x) + 1] = s[1];
  }
}

template <typename T, typename A, int ACT>
__global__ void __launch_bounds__(kChunkThreads) bwd_chunk_apply_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                       T* __restrict__ dx, const A* __restrict__ w,
                                       const A* __restrict__ b, const A* __restrict__ mean_in,
                                       const A* __restrict__ rstd_in, const A* __restrict__ part,
                                       A* __restrict__ sum_g, A* __restrict__ sum_gx, int64_t C,
                                       int64_t hw, int64_t chunks, A slope) {
  __shared__ A smem[2 * kWarp];
  const int64_t p = blockIdx.x / chunks, chunk = blockIdx.x % chunks, c = p % C;
  A s[2] = {A(0), A(0)};
  for (int64_t j = threadIdx.x; j < chunks; j += blockDim.x) {
    s[0] += part[2 * (p * chunks + j)];
    s[1] += part[2 * (p * chunks + j) + 1];
  }
  block_sum<2>(s, smem);
  const A mean = mean_in[p], rstd = rstd_in[p];
  const Affine<A> af = affine_of(rstd, w, b, c);  // not a structured binding: lambdas capture it (C++17)
  const A scale = af.scale, shift = af.shift;
  const A mg = s[0] / A(hw), mgx = s[1] / A(hw);
  const T *xp = x + p * hw, *dyp = dy + p * hw;
  T* dxp = dx + p * hw;
  for_chunk_items(chunk, hw, [&](int64_t i) {
    const A d = static_cast<A>(xp[i]) - mean;
    const A g = act_grad<ACT>(pre_act(d, scale, shift), static_cast<A>(dyp[i]), slope);
    dxp[i] = static_cast<T>(grad_input(g, d * rstd, scale, mg, mgx));
  });
  if (chunk == 0 && threadIdx.x == 0) {
    sum_g[p] = s[0];
    sum_gx[p] = s[1];
  }
}

// ---- NHWC (channels_last) ------------------------------------------------------------------------
// x is (N, H * W, C) in memory. A block of (kTx, kTy) threads takes kTx consecutive channels (a warp
// reads them from one pixel: coalesced along C) and a group of group_rows pixels of one image, its kTy
// rows of threads striding over the pixels. Grid: (channel tiles, pixel groups, images). Per-(n, c)
// statistics are reduced over H * W in two steps: each block writes its group's partial results
// (the forward's from batches of kBatchRows pixels held in registers, two-pass, merged as in
// merge_pieces), then a finalize kernel merges the groups of each (n, c). A third kernel writes y
// (or dx), so x (and dy) is read twice; the second read is usually served from L2.

constexpr int kTx = 32, kTy = 8, kRowItems = 16;
constexpr int64_t kBatchRows = int64_t(kTy) * kRowItems;

// Sums K values over the kTy threads of each column threadIdx.x; all of them get the column's totals.
// smem holds K * kTy * kTx values.
template <int K, typename A>
__device__ __forceinline__ void column_sum(A (&v)[K], A* smem) {
#pragma unroll
  for (int k = 0; k < K; ++k) smem[(k * kTy + threadIdx.y) * kTx + threadIdx.x] = v[k];
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    A s = A(0);
#pragma unroll
    for (int t = 0; t < kTy; ++t) s += smem[(k * kTy + t) * kTx + threadIdx.x];
    v[k] = s;
  }
  __syncthreads();
}

template <typename A>
struct ColumnSum {
  A* smem;
  template <int K>
  __device__ __forceinline__ void operator()(A (&v)[K]) const { column_sum<K>(v, smem); }
};

// This thread's channel c (clamped to C - 1 for loads: threads past C compute and store nothing) and
// image n, and the pixels [r0, r1) of its block's group.
struct NhwcTile {
  int64_t n, c, c_load, r0, r1;
  bool active;
};

__device__ __forceinline__ NhwcTile nhwc_tile(int64_t C, int64_t hw, int64_t group_rows) {
  const int64_t c = int64_t(blockIdx.x) * kTx + threadIdx.x, r0 = int64_t(blockIdx.y) * group_rows;
  return {blockIdx.z, c, min(c, C - 1), r0, min(hw, r0 + group_rows), c < C};
}

// Partial results of group g of image n: part[((n * groups + g) * 2 + k) * C + c] for k = 0, 1.
__device__ __forceinline__ int64_t part_index(const NhwcTile& t, int64_t C, int k) {
  return ((t.n * gridDim.y + blockIdx.y) * 2 + k) * C + t.c;
}

template <typename T, typename A>
__global__ void __launch_bounds__(kTx * kTy) nhwc_fwd_stats_kernel(const T* __restrict__ x, A* __restrict__ part,
                                                                   int64_t C, int64_t hw, int64_t group_rows) {
  __shared__ A smem[2 * kTy * kTx];
  const NhwcTile t = nhwc_tile(C, hw, group_rows);
  Moments<A> r{A(0), A(0), A(0)};
  for (int64_t b0 = t.r0; b0 < t.r1; b0 += kBatchRows) {
    const int64_t rows = min(kBatchRows, t.r1 - b0);
    A v[kRowItems], mean, m2;
    load_and_moments<kRowItems>(x + (t.n * hw + b0) * C + t.c_load, C, threadIdx.y, kTy, rows, v,
                                ColumnSum<A>{smem}, mean, m2);
    chan_merge(r.n, r.mean, r.m2, A(rows), mean, m2);
  }
  if (threadIdx.y == 0 && t.active) {
    part[part_index(t, C, 0)] = r.mean;
    part[part_index(t, C, 1)] = r.m2;
  }
}

// Grid (channel tiles, 1, images): merges the groups' statistics of each (n, c) into mean and rstd.
template <typename A>
__global__ void __launch_bounds__(kTx * kTy) nhwc_fwd_finalize_kernel(const A* __restrict__ part, A* __restrict__ mean_out,
                                                                      A* __restrict__ rstd_out, int64_t C, int64_t hw,
                                                                      int64_t groups, int64_t group_rows, double eps) {
  __shared__ A smem[3 * kTy * kTx];
  const int64_t n = blockIdx.z, c = int64_t(blockIdx.x) * kTx + threadIdx.x, c_load = min(c, C - 1);
  const auto piece = [&](int64_t g) {
    return Moments<A>{A(min(group_rows, hw - g * group_rows)), part[((n * groups + g) * 2) * C + c_load],
                      part[((n * groups + g) * 2 + 1) * C + c_load]};
  };
  A mean, m2;
  merge_pieces(groups, piece, threadIdx.y, kTy, threadIdx.x, kTx, smem, mean, m2);
  if (threadIdx.y == 0 && c < C) {
    mean_out[n * C + c] = mean;
    rstd_out[n * C + c] = inv_std(m2, A(hw), eps);
  }
}

template <typename T, typename A, int ACT>
__global__ void __launch_bounds__(kTx * kTy) nhwc_fwd_apply_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                                   const A* __restrict__ mean_in,
                                                                   const A* __restrict__ rstd_in,
                                                                   const A* __restrict__ w, const A* __restrict__ b,
                                                                   int64_t C, int64_t hw, int64_t group_rows, A slope) {
  const NhwcTile t = nhwc_tile(C, hw, group_rows);
  if (!t.active) return;
  const A mean = mean_in[t.n * C + t.c];
  const auto [scale, shift] = affine_of(rstd_in[t.n * C + t.c], w, b, t.c);
  for (int64_t r = t.r0 + threadIdx.y; r < t.r1; r += kTy) {
    const int64_t i = (t.n * hw + r) * C + t.c;
    y[i] = static_cast<T>(act_fwd<ACT>(pre_act(static_cast<A>(x[i]) - mean, scale, shift), slope));
  }
}

// The backward's per-thread constants and g = dy * act'(y_pre), d = x - mean at element i.
template <typename A, int ACT>
struct NhwcGrad {
  A mean, rstd, scale, shift, slope;
  template <typename T>
  __device__ __forceinline__ A g(const T* x, const T* dy, int64_t i, A& d) const {
    d = static_cast<A>(x[i]) - mean;
    return act_grad<ACT>(pre_act(d, scale, shift), static_cast<A>(dy[i]), slope);
  }
};

template <typename A, int ACT>
__device__ __forceinline__ NhwcGrad<A, ACT> nhwc_grad(const NhwcTile& t, int64_t C, const A* mean, const A* rstd,
                                                      const A* w, const A* b, A slope) {
  const int64_t p = t.n * C + t.c_load;
  const auto [scale, shift] = affine_of(rstd[p], w, b, t.c_load);
  return {mean[p], rstd[p], scale, shift, slope};
}

template <typename T, typename A, int ACT>
__global__ void __launch_bounds__(kTx * kTy) nhwc_bwd_sums_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                                                  const A* __restrict__ w, const A* __restrict__ b,
                                                                  const A* __restrict__ mean, const A* __restrict__ rstd,
                                                                  A* __restrict__ part, int64_t C, int64_t hw,
                                                                  int64_t group_rows, A slope) {
  __shared__ A smem[2 * kTy * kTx];
  const NhwcTile t = nhwc_tile(C, hw, group_rows);
  const NhwcGrad<A, ACT> k = nhwc_grad<A, ACT>(t, C, mean, rstd, w, b, slope);
  A s[2] = {A(0), A(0)};
  for (int64_t r = t.r0 + threadIdx.y; r < t.r1; r += kTy) {
    A d;
    const A g = k.g(x, dy, (t.n * hw + r) * C + t.c_load, d);
    s[0] += g;
    s[1] += g * (d * k.rstd);
  }
  column_sum<2>(s, smem);
  if (threadIdx.y == 0 && t.active) {
    part[part_index(t, C, 0)] = s[0];
    part[part_index(t, C, 1)] = s[1];
  }
}

// Grid (channel tiles, 1, images): adds the groups' sums of each (n, c).
template <typename A>
__global__ void __launch_bounds__(kTx * kTy) nhwc_bwd_finalize_kernel(const A* __restrict__ part, A* __restrict__ sum_g,
                                                                      A* __restrict__ sum_gx, int64_t C, int64_t groups) {
  __shared__ A smem[2 * kTy * kTx];
  const int64_t n = blockIdx.z, c = int64_t(blockIdx.x) * kTx + threadIdx.x, c_load = min(c, C - 1);
  A s[2] = {A(0), A(0)};
  for (int64_t g = threadIdx.y; g < groups; g += kTy) {
    s[0] += part[((n * groups + g) * 2) * C + c_load];
    s[1] += part[((n * groups + g) * 2 + 1) * C + c_load];
  }
  column_sum<2>(s, smem);
  if (threadIdx.y == 0 && c < C) {
    sum_g[n * C + c] = s[0];
    sum_gx[n * C + c] = s[1];
  }
}

template <typename T, typename A, int ACT>
__global__ void __launch_bounds__(kTx * kTy) nhwc_bwd_apply_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                                                   T* __restrict__ dx, const A* __restrict__ w,
                                                                   const A* __restrict__ b, const A* __restrict__ mean,
                                                                   const A* __restrict__ rstd, const A* __restrict__ sum_g,
                                                                   const A* __restrict__ sum_gx, int64_t C, int64_t hw,
                                                                   int64_t group_rows, A slope) {
  const NhwcTile t = nhwc_tile(C, hw, group_rows);
  if (!t.active) return;
  const NhwcGrad<A, ACT> k = nhwc_grad<A, ACT>(t, C, mean, rstd, w, b, slope);
  const A mg = sum_g[t.n * C + t.c] / A(hw), mgx = sum_gx[t.n * C + t.c] / A(hw);
  for (int64_t r = t.r0 + threadIdx.y; r < t.r1; r += kTy) {
    const int64_t i = (t.n * hw + r) * C + t.c;
    A d;
    const A g = k.g(x, dy, i, d);
    dx[i] = static_cast<T>(grad_input(g, d * k.rstd, k.scale, mg, mgx));
  }
}

// ---- launch helpers ---------------------------------------------------------------------------

// Items per thread for the one-block-per-plane path: up to 512 threads with 4 or 8 items, else 16.
template <typename F>
void dispatch_items(int64_t hw, const F& f) {
  if (hw <= 4 * 512) f(std::integral_constant<int, 4>{});
  else if (hw <= 8 * 512) f(std::integral_constant<int, 8>{});
  else f(std::integral_constant<int, 16>{});
}

int threads_for(int64_t hw, int items) {
  const int64_t t = (hw + items - 1) / items;
  return int(std::min<int64_t>(1024, std::max<int64_t>(kWarp, (t + kWarp - 1) / kWarp * kWarp)));
}

// One block per plane (or per chunk of a large plane): the grid's x dimension holds at most
// 2^31 - 1 blocks, and a larger count would wrap silently when narrowed, so refuse it here.
void check_grid(int64_t planes, int64_t hw) {
  const int64_t blocks = hw <= kMaxRegPlane ? planes : planes * ((hw + kChunk - 1) / kChunk);
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "instance_norm_act: ", planes,
              " planes of ", hw, " elements need ", blocks, " CUDA blocks, more than a grid holds; "
              "split the batch");
}

// NHWC launch geometry: pixel groups of whole batches, enough blocks to fill a large GPU.
struct NhwcGrid {
  dim3 tiles;     // (channel tiles, groups, images): the stats, sums and apply kernels
  dim3 finalize;  // (channel tiles, 1, images)
  int64_t groups, group_rows;
};

NhwcGrid nhwc_grid(const Inputs& in) {
  constexpr int64_t kTargetBlocks = 2048;
  const int64_t ctiles = (in.C + kTx - 1) / kTx, batches = (in.hw + kBatchRows - 1) / kBatchRows;
  const int64_t want = std::min(batches, std::max<int64_t>(1, kTargetBlocks / (ctiles * in.N)));
  const int64_t per_group = (batches + want - 1) / want, groups = (batches + per_group - 1) / per_group;
  TORCH_CHECK(in.N <= 65535 && groups <= 65535 && ctiles <= std::numeric_limits<int32_t>::max(),
              "instance_norm_act: a channels_last x of shape (", in.N, ", ", in.C, ", H, W) with H * W = ", in.hw,
              " needs a larger CUDA grid than one launch holds; split the batch");
  return {dim3(unsigned(ctiles), unsigned(groups), unsigned(in.N)), dim3(unsigned(ctiles), 1, unsigned(in.N)),
          groups, per_group * kBatchRows};
}

template <typename T, int ACT>
void launch_forward_nhwc(const Inputs& in, at::Tensor& y, at::Tensor& mean, at::Tensor& rstd, double eps,
                         double slope, cudaStream_t stream) {
  using A = at::opmath_type<T>;
  const NhwcGrid g = nhwc_grid(in);
  const dim3 block(kTx, kTy);
  at::Tensor part = at::empty({in.N * g.groups * 2 * in.C}, in.x.options().dtype(in.acc));
  nhwc_fwd_stats_kernel<T, A><<<g.tiles, block, 0, stream>>>(in.x.data_ptr<T>(), part.data_ptr<A>(), in.C, in.hw,
                                                             g.group_rows);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  nhwc_fwd_finalize_kernel<A><<<g.finalize, block, 0, stream>>>(part.data_ptr<A>(), mean.data_ptr<A>(),
                                                               rstd.data_ptr<A>(), in.C, in.hw, g.groups,
                                                               g.group_rows, eps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  nhwc_fwd_apply_kernel<T, A, ACT><<<g.tiles, block, 0, stream>>>(
      in.x.data_ptr<T>(), y.data_ptr<T>(), mean.data_ptr<A>(), rstd.data_ptr<A>(), ptr_or_null<A>(in.w),
      ptr_or_null<A>(in.b), in.C, in.hw, g.group_rows, A(slope));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int ACT>
void launch_backward_nhwc(const Inputs& in, at::Tensor& dx, at::Tensor& sum_g, at::Tensor& sum_gx, double slope,
                          cudaStream_t stream) {
  using A = at::opmath_type<T>;
  const NhwcGrid g = nhwc_grid(in);
  const dim3 block(kTx, kTy);
  const T *x = in.x.data_ptr<T>(), *dy = in.dy.data_ptr<T>();
  const A *w = ptr_or_null<A>(in.w), *b = ptr_or_null<A>(in.b);
  const A *mean = in.mean.data_ptr<A>(), *rstd = in.rstd.data_ptr<A>();
  at::Tensor part = at::empty({in.N * g.groups * 2 * in.C}, in.x.options().dtype(in.acc));
  nhwc_bwd_sums_kernel<T, A, ACT><<<g.tiles, block, 0, stream>>>(dy, x, w, b, mean, rstd, part.data_ptr<A>(), in.C,
                                                                 in.hw, g.group_rows, A(slope));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  nhwc_bwd_finalize_kernel<A><<<g.finalize, block, 0, stream>>>(part.data_ptr<A>(), sum_g.data_ptr<A>(),
                                                               sum_gx.data_ptr<A>(), in.C, g.groups);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  nhwc_bwd_apply_kernel<T, A, ACT><<<g.tiles, block, 0, stream>>>(dy, x, dx.data_ptr<T>(), w, b, mean, rstd,
                                                                  sum_g.data_ptr<A>(), sum_gx.data_ptr<A>(), in.C,
                                                                  in.hw, g.group_rows, A(slope));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Forward: the NHWC kernels for a channels_last x; else NCHW, one block per plane, or chunk statistics
// and then the output for large planes.
template <typename T, int ACT>
void launch_forward(const Inputs& in, at::Tensor& y, at::Tensor& mean, at::Tensor& rstd, double eps,
                    double slope, cudaStream_t stream) {
  using A = at::opmath_type<T>;
  if (in.layout == at::MemoryFormat::ChannelsLast) {
    return launch_forward_nhwc<T, ACT>(in, y, mean, rstd, eps, slope, stream);
  }
  const int64_t planes = in.N * in.C, hw = in.hw;
  check_grid(planes, hw);
  const T* x = in.x.data_ptr<T>();
  const A *w = ptr_or_null<A>(in.w), *b = ptr_or_null<A>(in.b);
  if (hw <= kMaxRegPlane) {
    dispatch_items(hw, [&](auto it) {
      constexpr int ITEMS = decltype(it)::value;
      fwd_plane_kernel<T, A, ITEMS, ACT><<<planes, threads_for(hw, ITEMS), 0, stream>>>(
          x, y.data_ptr<T>(), w, b, mean.data_ptr<A>(), rstd.data_ptr<A>(), in.C, hw, eps, A(slope));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return;
  }
  const int64_t chunks = (hw + kChunk - 1) / kChunk;
  at::Tensor part = at::empty({planes * chunks * 2}, in.x.options().dtype(in.acc));
  fwd_chunk_stats_kernel<T, A><<<planes * chunks, kChunkThreads, 0, stream>>>(x, part.data_ptr<A>(), hw,
                                                                              chunks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  fwd_chunk_apply_kernel<T, A, ACT><<<planes * chunks, kChunkThreads, 0, stream>>>(
      x, y.data_ptr<T>(), part.data_ptr<A>(), w, b, mean.data_ptr<A>(), rstd.data_ptr<A>(), in.C, hw,
      chunks, eps, A(slope));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Backward: the same paths; sum_g and sum_gx receive the per-plane sums of g and g * xhat.
template <typename T, int ACT>
void launch_backward(const Inputs& in, at::Tensor& dx, at::Tensor& sum_g, at::Tensor& sum_gx, double slope,
                     cudaStream_t stream) {
  using A = at::opmath_type<T>;
  if (in.layout == at::MemoryFormat::ChannelsLast) {
    return launch_backward_nhwc<T, ACT>(in, dx, sum_g, sum_gx, slope, stream);
  }
  const int64_t planes = in.N * in.C, hw = in.hw;
  check_grid(planes, hw);
  const T *x = in.x.data_ptr<T>(), *dy = in.dy.data_ptr<T>();
  const A *w = ptr_or_null<A>(in.w), *b = ptr_or_null<A>(in.b);
  const A *mean = in.mean.data_ptr<A>(), *rstd = in.rstd.data_ptr<A>();
  if (hw <= kMaxRegPlane) {
    dispatch_items(hw, [&](auto it) {
      constexpr int ITEMS = decltype(it)::value;
      bwd_plane_kernel<T, A, ITEMS, ACT><<<planes, threads_for(hw, ITEMS), 0, stream>>>(
          dy, x, dx.data_ptr<T>(), w, b, mean, rstd, sum_g.data_ptr<A>(), sum_gx.data_ptr<A>(), in.C, hw,
          A(slope));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return;
  }
  const int64_t chunks = (hw + kChunk - 1) / kChunk;
  at::Tensor part = at::empty({planes * chunks * 2}, in.x.options().dtype(in.acc));
  bwd_chunk_sums_kernel<T, A, ACT><<<planes * chunks, kChunkThreads, 0, stream>>>(
      dy, x, w, b, mean, rstd, part.data_ptr<A>(), in.C, hw, chunks, A(slope));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  bwd_chunk_apply_kernel<T, A, ACT><<<planes * chunks, kChunkThreads, 0, stream>>>(
      dy, x, dx.data_ptr<T>(), w, b, mean, rstd, part.data_ptr<A>(), sum_g.data_ptr<A>(),
      sum_gx.data_ptr<A>(), in.C, hw, chunks, A(slope));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(const at::Tensor& x,
                                                            const c10::optional<at::Tensor>& weight,
                                                            const c10::optional<at::Tensor>& bias,
                                                            double eps, c10::string_view act, double slope) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Inputs in = forward_inputs(x, weight, bias, eps, act);
  at::Tensor y, mean, rstd;
  std::tie(y, mean, rstd) = forward_outputs(in);
  if (in.N * in.C == 0) return {y, mean, rstd};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "inorm_act_fwd_cuda", [&] {
    dispatch_act(in.act, [&](auto a) {
      launch_forward<scalar_t, decltype(a)::value>(in, y, mean, rstd, eps, slope, stream);
    });
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd,
    c10::string_view act, double slope) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Inputs in = backward_inputs(grad_y, x, weight, bias, mean, rstd, act);
  at::Tensor dx = at::empty_like(in.x, in.layout);
  at::Tensor sum_g = at::zeros({in.N, in.C}, in.x.options().dtype(in.acc));
  at::Tensor sum_gx = at::zeros({in.N, in.C}, in.x.options().dtype(in.acc));
  if (in.N * in.C > 0) {
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "inorm_act_bwd_cuda", [&] {
      dispatch_act(in.act, [&](auto a) {
        launch_backward<scalar_t, decltype(a)::value>(in, dx, sum_g, sum_gx, slope, stream);
      });
    });
  }
  return backward_result(dx, sum_g, sum_gx, in.acc);
}

}  // namespace

TORCH_LIBRARY_IMPL(melano, CUDA, m) {
  m.impl("inorm_act_fwd", &forward_cuda);
  m.impl("inorm_act_bwd", &backward_cuda);
}

}  // namespace melano
