// lif_shim.h: lets the one LIF kernel source (lif.cu) compile as CUDA (NVRTC) or host C++.
//
// The kernels in lif.cu are written in a small SIMT-style vocabulary:
//
//   LIF_TILE_LOOP(tile, n)        iterate over tiles of elements this "thread" owns
//   LIF_LANE_LOOP(j, tile, n)     iterate over the lanes j of one tile (bounds-checked)
//   LIF_INDEX(tile, j)            the element index of lane j
//   LIF_LANES                     lanes per tile (sizes the per-lane state arrays)
//   LIF_OUT_ROW(type, out)        declare the staging row of output `out` (once per tile)
//   LIF_OUT(out, i, j)            where lane j writes element i of `out`
//   LIF_OUT_FLUSH(out, row, tile, n, stream)
//                                 write the staged row out (after each lane loop)
//   lif_should_stream(bytes)      whether a call writing `bytes` should bypass the cache
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
// Outputs: on the GPU a lane writes its element in place (LIF_OUT is out[i], the flush is empty).
// On the CPU a lane writes into an L1-resident staging row and the flush writes the row to
// memory in one pass. Two things make that faster than writing in place: the loop no longer
// mixes loads and stores of arrays whose addresses agree modulo 4 KiB (large tensors are
// page-aligned, and such a store falsely delays the next row's load), and when a call's
// outputs are larger than the last-level cache the flush uses non-temporal stores, which skip
// the read-for-ownership a normal store pays: measured on a 2-vCPU EPYC, the forward pass ran
// ~45% faster at T=4, N=4M. Below that size normal stores keep the outputs in cache for the
// next layer, which reads them at once.
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

// ---- output staging and streaming stores (see the header comment)
#if defined(__AVX__)
#include <immintrin.h>
#endif
#include <stdint.h>

// Calls whose outputs (bytes written) reach this size use non-temporal stores. The Python
// side sets it to the last-level cache size at load (mixersnn.kernels.cpu); glibc's sysconf
// is not used because inside a VM it can report the whole host socket's L3.
static long long lif_stream_min_bytes_value = 32LL << 20;

static inline long long lif_stream_min_bytes(void) {
  return __atomic_load_n(&lif_stream_min_bytes_value, __ATOMIC_RELAXED);
}

static inline bool lif_should_stream(long long bytes) { return bytes >= lif_stream_min_bytes(); }

#define LIF_OUT_ROW(type, out) alignas(64) type out##_row[LIF_LANES]
#define LIF_OUT(out, i, j) out##_row[j]
#define LIF_OUT_FLUSH(out, row, tile, n, stream)                                        \
  lif_flush_row((out) + (row) + (tile), out##_row,                                     \
                (int)((n) - (tile) < LIF_LANES ? (n) - (tile) : LIF_LANES), (stream))

// Copy a staged row to dst: non-temporal 32-byte stores where dst is 32-byte aligned (the
// unaligned head and the tail are plain stores), or a plain copy.
static inline void lif_flush_row(float* LIF_RESTRICT dst, const float* LIF_RESTRICT src,
                                 int count, bool stream) {
#if defined(__AVX__)
  if (stream) {
    int k = 0;
    for (; k < count && ((uintptr_t)(dst + k) & 31) != 0; ++k) dst[k] = src[k];
    for (; k + 8 <= count; k += 8) _mm256_stream_ps(dst + k, _mm256_loadu_ps(src + k));
    for (; k < count; ++k) dst[k] = src[k];
    _mm_sfence();  // order the weakly-ordered stores before anything that follows
    return;
  }
#else
  (void)stream;
#endif
  memcpy(dst, src, (size_t)count * sizeof(float));
}

// For the Python side: the threshold (tests force either path), and a streaming copy the
// benchmarks use to measure the machine's best copy bandwidth.
extern "C" long long lif_get_stream_min_bytes(void) { return lif_stream_min_bytes(); }
extern "C" void lif_set_stream_min_bytes(long long bytes) {
  __atomic_store_n(&lif_stream_min_bytes_value, bytes, __ATOMIC_RELAXED);
}
extern "C" void lif_stream_copy(const float* LIF_RESTRICT src, float* LIF_RESTRICT dst,
                                long long n, int threads) {
  omp_set_num_threads(threads);
#pragma omp parallel for schedule(static)
  for (long long start = 0; start < n; start += LIF_LANES) {
    const long long count = n - start < LIF_LANES ? n - start : LIF_LANES;
    lif_flush_row(dst + start, src + start, (int)count, true);
  }
}

static inline bool lif_signbit(float x) { return __builtin_signbitf(x) != 0; }

// The host build only sees fp32 (16-bit inputs are converted in torch around the call).
static inline float lif_load(float x) { return x; }
template <typename scalar_t>
static inline scalar_t lif_store(float x) { return x; }

// glibc's expf is a scalar call that stops the simd loop from vectorising, and its vector
// variant (libmvec) is only declared under -ffast-math, which would also break the exact
// forward. This is Cody-Waite range reduction plus Cephes' degree-6 polynomial, evaluated in
// Estrin's scheme with fused multiply-adds where the CPU has them (shorter dependency chains:
// the sigmoid backward is bound by this arithmetic on the CPU): about 1 ulp on the clamped
// range, branch-free, so it vectorises. The clamp keeps 2^n a normal float; the surrogate is
// ~0 there either way. Only the backward pass calls it, so the exact forward is untouched.
#if defined(__FMA__)
#define LIF_FMA(a, b, c) __builtin_fmaf((a), (b), (c))
#else
#define LIF_FMA(a, b, c) ((a) * (b) + (c))
#endif
static inline float lif_expf(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float n = floorf(x * 1.44269504088896341f + 0.5f);
  float r = LIF_FMA(n, -0.693359375f, x);
  r = LIF_FMA(n, 2.12194440e-4f, r);
  const float r2 = r * r;
  const float c45 = LIF_FMA(1.9875691500e-4f, r, 1.3981999507e-3f);
  const float c23 = LIF_FMA(8.3334519073e-3f, r, 4.1665795894e-2f);
  const float c01 = LIF_FMA(1.6666665459e-1f, r, 5.0000001201e-1f);
  const float p = LIF_FMA(LIF_FMA(c45, r2, c23), r2, c01);
  const float y = LIF_FMA(p, r2, r) + 1.0f;
  const int bits = ((int)n + 127) << 23;
  float scale;
  memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}
// Surrogate bodies are C source shared with CUDA (mixersnn.neurons.surrogate); route
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

// Coalesced in-place writes; the host's staging and streaming have no GPU counterpart here.
LIF_DEVICE bool lif_should_stream(long long) { return false; }
#define LIF_OUT_ROW(type, out)
#define LIF_OUT(out, i, j) (out)[i]
#define LIF_OUT_FLUSH(out, row, tile, n, stream) (void)(stream)

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
