// Fused InstanceNorm + activation: CUDA kernels for the ops defined in instance_norm_act.cpp.
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

// Loads a block's slice [base, base + ITEMS * blockDim) of a plane (coalesced: item k of thread t is
// element base + t + k * blockDim), then the mean and the corrected sum of squared deviations.
template <int ITEMS, typename T, typename A>
__device__ __forceinline__ void load_and_moments(const T* __restrict__ xp, int64_t base, int64_t hw,
                                                 A (&v)[ITEMS], A* smem, A& count, A& mean,
                                                 A& m2) {
  int64_t n_valid = hw - base;
  if (n_valid > int64_t(ITEMS) * blockDim.x) n_valid = int64_t(ITEMS) * blockDim.x;
  A s[1] = {A(0)};
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    const int64_t i = threadIdx.x + int64_t(k) * blockDim.x;
    v[k] = i < n_valid ? static_cast<A>(xp[base + i]) : A(0);
    s[0] += v[k];
  }
  block_sum<1>(s, smem);
  count = A(n_valid);
  const A mean0 = s[0] / count;
  A m[2] = {A(0), A(0)};
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    const int64_t i = threadIdx.x + int64_t(k) * blockDim.x;
    if (i < n_valid) {
      const A d = v[k] - mean0;
      m[0] += d;
      m[1] += d * d;
    }
  }
  block_sum<2>(m, smem);
  mean = mean0 + m[0] / count;
  m2 = m[1] - m[0] * m[0] / count;
  if (m2 < A(0)) m2 = A(0);
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
  A count, mean, m2;
  load_and_moments<ITEMS>(xp, 0, hw, v, smem, count, mean, m2);
  const A rstd = inv_std(m2, count, eps);
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
  A count, mean, m2;
  load_and_moments<kChunkItems>(x + p * hw, chunk * kChunk, hw, v, smem, count, mean, m2);
  if (threadIdx.x == 0) {
    part[2 * blockIdx.x] = mean;
    part[2 * blockIdx.x + 1] = m2;
  }
}

// Merges the chunk statistics of plane p (every block of the plane does it; chunks are few).
template <typename A>
__device__ void merge_chunk_stats(const A* __restrict__ part, int64_t p, int64_t hw, int64_t chunks,
                                  A* smem, A& mean, A& m2) {
  // Each thread merges a strided subset; then a tree across the block. (count, mean, M2) triples.
  A n = 0, mu = 0, q = 0;
  for (int64_t j = threadIdx.x; j < chunks; j += blockDim.x) {
    const A nb = A(min(kChunk, hw - j * kChunk));
    const A mb = part[2 * (p * chunks + j)], qb = part[2 * (p * chunks + j) + 1];
    const A tot = n + nb, delta = mb - mu;
    mu += delta * nb / tot;
    q += qb + delta * delta * n * nb / tot;
    n = tot;
  }
  A* sn = smem;
  A* smu = smem + blockDim.x;
  A* sq = smem + 2 * blockDim.x;
  sn[threadIdx.x] = n;
  smu[threadIdx.x] = mu;
  sq[threadIdx.x] = q;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      const A na = sn[threadIdx.x], nb = sn[threadIdx.x + stride];
      const A tot = na + nb;
      if (nb > A(0)) {
        const A delta = smu[threadIdx.x + stride] - smu[threadIdx.x];
        smu[threadIdx.x] += delta * nb / tot;
        sq[threadIdx.x] += sq[threadIdx.x + stride] + delta * delta * na * nb / tot;
        sn[threadIdx.x] = tot;
      }
    }
    __syncthreads();
  }
  mean = smu[0];
  m2 = sq[0];
  __syncthreads();
}

template <typename T, typename A, int ACT>
__global__ void __launch_bounds__(kChunkThreads) fwd_chunk_apply_kernel(const T* __restrict__ x, T* __restrict__ y,
                                       const A* __restrict__ part, const A* __restrict__ w,
                                       const A* __restrict__ b, A* __restrict__ mean_out,
                                       A* __restrict__ rstd_out, int64_t C, int64_t hw, int64_t chunks,
                                       double eps, A slope) {
  __shared__ A smem[3 * kChunkThreads];
  const int64_t p = blockIdx.x / chunks, chunk = blockIdx.x % chunks, c = p % C;
  A mean, m2;
  merge_chunk_stats(part, p, hw, chunks, smem, mean, m2);
  const A rstd = inv_std(m2, A(hw), eps);
  const auto [scale, shift] = affine_of(rstd, w, b, c);
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
  const auto [scale, shift] = affine_of(rstd, w, b, c);
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
    part[2 * blockIdx.x] = s[0];
    part[2 * blockIdx.x + 1] = s[1];
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
  const auto [scale, shift] = affine_of(rstd, w, b, c);
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

// NCHW forward: one block per plane, or chunk statistics and then the output for large planes.
template <typename T, int ACT>
void launch_forward(const Inputs& in, at::Tensor& y, at::Tensor& mean, at::Tensor& rstd, double eps,
                    double slope, cudaStream_t stream) {
  using A = at::opmath_type<T>;
  const int64_t planes = in.N * in.C, hw = in.hw;
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

// NCHW backward: the same two paths; sum_g and sum_gx receive the per-plane sums of g and g * xhat.
template <typename T, int ACT>
void launch_backward(const Inputs& in, at::Tensor& dx, at::Tensor& sum_g, at::Tensor& sum_gx, double slope,
                     cudaStream_t stream) {
  using A = at::opmath_type<T>;
  const int64_t planes = in.N * in.C, hw = in.hw;
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
  check_grid(in.N * in.C, in.hw);
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
  at::Tensor dx = at::empty_like(in.x, at::MemoryFormat::Contiguous);
  at::Tensor sum_g = at::zeros({in.N, in.C}, in.x.options().dtype(in.acc));
  at::Tensor sum_gx = at::zeros({in.N, in.C}, in.x.options().dtype(in.acc));
  if (in.N * in.C > 0) {
    check_grid(in.N * in.C, in.hw);
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
