// lif_shim.h: lets the one LIF kernel source (lif.cu) compile as CUDA (NVRTC) or host C++.
//
// The kernels in lif.cu are written in a small SIMT-style vocabulary:
//
//   LIF_TILE_LOOP(tile, n)        iterate over tiles of elements this "thread" owns
//   LIF_LANE_LOOP(j, tile, n)     iterate over the lanes j of one tile (bounds-checked)
//   LIF_INDEX(tile, j)            the element index of lane j
//   LIF_LANES                     lanes per tile (sizes the per-lane state arrays)
//
// On the GPU a tile is one thread block's slab of blockDim.x * LIF_LANES elements; each thread
// holds LIF_LANES elements strided by blockDim.x, so every lane's load is coalesced across the
// warp and a thread keeps LIF_LANES independent loads in flight (one per element is too few to
// saturate HBM). The lane arrays are indexed by unrolled constants and live in registers.
//
// On the CPU a tile is LIF_LANES consecutive elements; OpenMP splits tiles across threads and
// the lane loop is an `omp simd` loop. The time loop sits between the two, so one tile's state
// (LIF_LANES floats) stays in L1 while every time step of the tile streams through; memory is
// touched exactly once per element and step.
//
// Everything else (the arithmetic) is shared verbatim between the two targets.

#ifndef MIXERSNN_LIF_SHIM_H
#define MIXERSNN_LIF_SHIM_H

typedef long long lif_index_t;

#ifdef LIF_HOST
// ------------------------------------------------------------------------------- host C++
#include <math.h>
#include <string.h>
#include <omp.h>

#define LIF_GLOBAL static inline
#define LIF_DEVICE static inline
#define LIF_RESTRICT __restrict__

// 4096 lanes = 16 KiB of fp32 state per tile: still L1-resident beside the streamed rows, and
// each row segment spans several 4 KiB pages so the hardware prefetchers (which stop at page
// boundaries) stay ahead; measured 512..8192 on a 2-core EPYC: 4096-8192 best, ~10% over 512.
#ifndef LIF_LANES
#define LIF_LANES 4096
#endif
// Below this many elements a parallel region costs more than it saves.
#define LIF_PARALLEL_MIN_ELEMENTS 16384

#define LIF_PRAGMA(x) _Pragma(#x)
#define LIF_TILE_LOOP(tile, n)                                                         \
  LIF_PRAGMA(omp parallel for schedule(static) if ((n) >= LIF_PARALLEL_MIN_ELEMENTS)) \
  for (lif_index_t tile = 0; tile < (n); tile += LIF_LANES)
#define LIF_LANE_LOOP(j, tile, n) \
  LIF_PRAGMA(omp simd)            \
  for (int j = 0; j < (int)((n) - (tile) < LIF_LANES ? (n) - (tile) : LIF_LANES); ++j)
#define LIF_INDEX(tile, j) ((tile) + (j))

static inline bool lif_signbit(float x) { return __builtin_signbitf(x) != 0; }

// The host build only sees fp32 (16-bit inputs are converted in torch around the call).
static inline float lif_load(float x) { return x; }
template <typename scalar_t>
static inline scalar_t lif_store(float x) { return x; }

// glibc's expf is a scalar call that stops the simd loop from vectorising, and its vector
// variant (libmvec) is only declared under -ffast-math, which would also break the exact
// forward. This is Cody-Waite range reduction plus Cephes' degree-6 polynomial: about 1 ulp
// on the clamped range, branch-free, so it vectorises. The clamp keeps 2^n a normal float;
// the surrogate is ~0 there either way.
static inline float lif_expf(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float n = floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int bits = ((int)n + 127) << 23;
  float scale;
  memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}
// Surrogate expressions are C source shared with CUDA (mixersnn.neurons.surrogate); route
// their expf to the vectorisable one.
#define expf lif_expf

#else
// ------------------------------------------------------------------------------- CUDA
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define LIF_GLOBAL __global__
#define LIF_DEVICE __device__ __forceinline__
#define LIF_RESTRICT __restrict__

#ifndef LIF_LANES
#define LIF_LANES 4
#endif

#define LIF_TILE_LOOP(tile, n)                                                  \
  for (lif_index_t tile = (lif_index_t)blockIdx.x * blockDim.x * LIF_LANES;    \
       tile < (n); tile += (lif_index_t)gridDim.x * blockDim.x * LIF_LANES)
#define LIF_LANE_LOOP(j, tile, n)               \
  _Pragma("unroll") for (int j = 0; j < LIF_LANES; ++j) \
    if (LIF_INDEX(tile, j) < (n))
#define LIF_INDEX(tile, j) ((tile) + threadIdx.x + (lif_index_t)(j) * blockDim.x)

LIF_DEVICE bool lif_signbit(float x) { return signbit(x) != 0; }

LIF_DEVICE float lif_load(float x) { return x; }
LIF_DEVICE float lif_load(__half x) { return __half2float(x); }
LIF_DEVICE float lif_load(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename scalar_t>
LIF_DEVICE scalar_t lif_store(float x);
template <>
LIF_DEVICE float lif_store<float>(float x) { return x; }
template <>
LIF_DEVICE __half lif_store<__half>(float x) { return __float2half_rn(x); }
template <>
LIF_DEVICE __nv_bfloat16 lif_store<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

#endif  // LIF_HOST

#endif  // MIXERSNN_LIF_SHIM_H
