// lif_shim.h: lets the one LIF kernel source (lif.cu) compile as CUDA (NVRTC) or host C++.
//
// The kernels in lif.cu are written in a small SIMT-style vocabulary:
//
//   LIF_TILE_LOOP(tile, n)        iterate over tiles of elements this "thread" owns
//   LIF_LANE_LOOP(j, tile, n)     iterate over all lanes j of one tile (bounds-checked)
//   LIF_CHUNK_LOOP(c, tile, n, out_row)
//                                 iterate over the chunks c of a tile's lanes (laid on the
//                                 cache lines of out_row, the tile's row of the first output)
//   LIF_CHUNK_LANES(j, c, tile, n)  and over the lanes j of chunk c (see "Chunks" below)
//   LIF_INDEX(tile, j)            the element index of lane j
//   LIF_LANES                     lanes per tile (sizes the per-lane state arrays)
//   LIF_CHUNK_SIZE                lanes per chunk (sizes per-chunk arrays, indexed j - c)
//   LIF_OUT_ROW(type, out)        declare the staging row of output `out` (once per tile)
//   LIF_OUT(out, i, k)            where the lane at chunk position k writes element i of `out`
//   LIF_OUT_FLUSH(out, row, c, tile, n, stream)
//                                 write chunk c of the staged row out (after its lane loops)
//   LIF_PREFETCH(in, row, next_row, c, tile, n, size)
//                                 hint that input `in` (size elements) will be read ahead of
//                                 chunk c: further along this row (offset row from the tile)
//                                 or at the start of the row the tile reads next (next_row)
//   lif_should_stream(bytes)      whether a call writing `bytes` should bypass the cache
//   LIF_STEPS_FORWARD(t, row, next_row, steps, n)
//   LIF_STEPS_BACKWARD(t, row, next_row, steps, n)
//                                 a tile's time loop in the forward's order (step 0 first) or
//                                 the backward's (last step first), declaring row (step t's
//                                 offset, t * n) and next_row (the row the tile reads after
//                                 this one, for LIF_PREFETCH); the body must not `break`
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
// On the CPU a lane writes into an L1-resident staging row and the flush writes it to memory.
// Two things make that faster than writing in place: the loop no longer mixes loads and
// stores of arrays whose addresses agree modulo 4 KiB (large tensors are page-aligned, and
// such a store falsely delays the next row's load), and when a call's outputs are larger than
// the last-level cache the flush uses non-temporal stores, which skip the read-for-ownership
// a normal store pays. Below that size normal stores keep the outputs in cache for the next
// layer, which reads them at once.
//
// Chunks: a time step of a tile is processed in chunks of LIF_CHUNK lanes, each flushed as
// soon as it is computed. Flushing a whole 4096-lane row at once made the memory system
// alternate between reading (while the lanes compute) and writing (while the row drains),
// and the 16 KiB staging rows pushed the tile's state out of L1; chunks interleave reads and
// writes finely and keep their staging in L1. A chunk also lets a kernel
// split its work into passes over the chunk (the backward pass computes the surrogate
// first): shorter dependency chains per loop, which the out-of-order core overlaps better.
// On the GPU a tile is one chunk.
//
// The chunks are laid on the output's cache lines: the first ends where the row reaches a
// 64-byte boundary, so every other flush writes whole lines. A row that starts mid-line (a
// buffer that is not 64-byte aligned, or n not a multiple of 16 floats, so row t starts at
// t * n) would otherwise give every chunk a partial line written by plain stores beside the
// non-temporal ones, which splits the line in the write-combining buffers and costs a
// read-for-ownership besides.
//
// Prefetch: each chunk asks for the input lanes LIF_PREFETCH_LANES ahead of it, in this row or
// at the start of the next row the tile reads (rows are n elements apart, and the hardware
// prefetchers stop at every 4 KiB page). The GPU hides latency with warps instead
// (LIF_PREFETCH is empty there).
//
// What each of these choices was measured to buy is in docs/kernels.md.
//
// Everything else (the arithmetic) is shared verbatim between the two targets.

#ifndef MIXERSNN_LIF_SHIM_H
#define MIXERSNN_LIF_SHIM_H

typedef long long lif_index_t;

// The time loops (shared by both targets; defined once so the kernels and their traffic twins
// below cannot drift apart). After a tile's last step in a pass it reads the first one of the
// next tile: step 0 at offset LIF_LANES (forward), or the last step (backward). The inner
// single-pass loop only scopes row and next_row to the step.
#define LIF_STEPS_FORWARD(t, row, next_row, steps, n)                                             \
  for (int t = 0; t < (steps); ++t)                                                               \
    for (lif_index_t row = (lif_index_t)t * (n),                                                  \
                     next_row = t + 1 < (steps) ? row + (n) : (lif_index_t)LIF_LANES, t##_once = 1; \
         t##_once; t##_once = 0)
#define LIF_STEPS_BACKWARD(t, row, next_row, steps, n)                                            \
  for (int t = (steps) - 1; t >= 0; --t)                                                          \
    for (lif_index_t row = (lif_index_t)t * (n),                                                  \
                     next_row = t > 0 ? row - (n) : (lif_index_t)((steps) - 1) * (n) + LIF_LANES,  \
                     t##_once = 1;                                                                \
         t##_once; t##_once = 0)

#ifdef LIF_HOST
// ------------------------------------------------------------------------------- host C++
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>

#define LIF_GLOBAL static inline
#define LIF_DEVICE static inline
#define LIF_RESTRICT __restrict__

// 4096 lanes = 16 KiB of fp32 state per tile: still L1-resident beside the streamed rows, and
// each row segment spans several 4 KiB pages so the hardware prefetchers (which stop at page
// boundaries) stay ahead (docs/kernels.md has the sweep).
#ifndef LIF_LANES
#define LIF_LANES 4096
#endif
// Below this many elements a parallel region costs more than it saves.
#define LIF_PARALLEL_MIN_ELEMENTS 16384

// Lanes per chunk (see "Chunks" above; 64..512 perform alike, 32 is slower). The
// per-chunk arrays (staging rows, the backward's surrogate) are this long, so they stay in
// L1 beside the tile's state.
#ifndef LIF_CHUNK
#define LIF_CHUNK 64
#endif
#define LIF_CHUNK_SIZE LIF_CHUNK

#define LIF_PRAGMA(x) _Pragma(#x)
#define LIF_TILE_LOOP(tile, n)                                                         \
  LIF_PRAGMA(omp parallel for schedule(static) if ((n) >= LIF_PARALLEL_MIN_ELEMENTS)) \
  for (lif_index_t tile = 0; tile < (n); tile += LIF_LANES)
// Lanes in this tile (the last tile may be short).
#define LIF_TILE_COUNT(tile, n) ((int)((n) - (tile) < LIF_LANES ? (n) - (tile) : LIF_LANES))
#define LIF_LANE_LOOP(j, tile, n) \
  LIF_PRAGMA(omp simd)            \
  for (int j = 0; j < LIF_TILE_COUNT(tile, n); ++j)
// The end of the first chunk: where the fp32 row at out_row reaches a 64-byte boundary (a
// short chunk), or a whole chunk when it starts on one.
static inline int lif_first_chunk_end(const void* out_row, int count) {
  const int head = (int)((16 - (((uintptr_t)out_row >> 2) & 15)) & 15);
  const int end = head ? head : LIF_CHUNK;
  return end < count ? end : count;
}
// c runs over the chunk starts, c##_end (c_end for a loop variable c) is the chunk's end.
#define LIF_CHUNK_LOOP(c, tile, n, out_row)                                                  \
  for (int c = 0, c##_end = lif_first_chunk_end((out_row), LIF_TILE_COUNT(tile, n));         \
       c < LIF_TILE_COUNT(tile, n);                                                         \
       c = c##_end, c##_end = c##_end + LIF_CHUNK < LIF_TILE_COUNT(tile, n)                 \
                                  ? c##_end + LIF_CHUNK : LIF_TILE_COUNT(tile, n))
#define LIF_CHUNK_LANES(j, c, tile, n) \
  LIF_PRAGMA(omp simd)                 \
  for (int j = (c); j < c##_end; ++j)
#define LIF_INDEX(tile, j) ((tile) + (j))

// ---- software prefetch (see "Prefetch" above): any distance from 128 to 4096 lanes does.
#ifndef LIF_PREFETCH_LANES
#define LIF_PREFETCH_LANES 256
#endif
template <typename T>
static inline void lif_prefetch(const T* base, lif_index_t row, lif_index_t next_row,
                                lif_index_t tile, int c, int count, lif_index_t size) {
  const int ahead = c + LIF_PREFETCH_LANES;
  const lif_index_t at = tile + (ahead < count ? row + ahead : next_row + (ahead - count));
  if (at >= size) return;
  for (int k = 0; k < LIF_CHUNK; k += 64 / (int)sizeof(T)) __builtin_prefetch(base + at + k);
}
#define LIF_PREFETCH(in, row, next_row, c, tile, n, size) \
  lif_prefetch((in), (row), (next_row), (tile), (c), LIF_TILE_COUNT(tile, n), (size))

// ---- output staging and streaming stores (see the header comment)
#if defined(__AVX__)
#include <immintrin.h>
#endif

// Calls whose outputs (bytes written) reach this size use non-temporal stores. The Python
// side sets it to the last-level cache size at load (mixersnn.kernels.cpu); glibc's sysconf
// is not used because inside a VM it can report the whole host socket's L3.
static long long lif_stream_min_bytes_value = 32LL << 20;

static inline long long lif_stream_min_bytes(void) {
  return __atomic_load_n(&lif_stream_min_bytes_value, __ATOMIC_RELAXED);
}

static inline bool lif_should_stream(long long bytes) { return bytes >= lif_stream_min_bytes(); }

#define LIF_OUT_ROW(type, out) alignas(64) type out##_row[LIF_CHUNK]
#define LIF_OUT(out, i, k) out##_row[k]
#define LIF_OUT_FLUSH(out, row, c, tile, n, stream) \
  lif_flush_row((out) + (row) + (tile) + (c), out##_row, c##_end - (c), (stream))

// Copy staged lanes to dst: for fp32 with `stream`, non-temporal 32-byte stores where dst is
// 32-byte aligned (the unaligned head and the tail are plain stores); otherwise, and for the
// 16-bit rows of the tests' build (below), a plain copy. The non-temporal stores are weakly
// ordered; the fence that orders them before anything that reads the output is
// lif_stream_fence() after each tile (a fence per flush would stall every 64 lanes until all
// pending stores have drained).
template <typename T>
static inline void lif_flush_row(T* LIF_RESTRICT dst, const T* LIF_RESTRICT src, int count,
                                 bool stream) {
#if defined(__AVX__)
  if constexpr (sizeof(T) == sizeof(float)) {
    if (stream) {
      int k = 0;
      for (; k < count && ((uintptr_t)(dst + k) & 31) != 0; ++k) dst[k] = src[k];
      for (; k + 8 <= count; k += 8) _mm256_stream_ps(dst + k, _mm256_loadu_ps(src + k));
      for (; k < count; ++k) dst[k] = src[k];
      return;
    }
  }
#endif
  (void)stream;
  LIF_PRAGMA(omp simd)
  for (int k = 0; k < count; ++k) dst[k] = src[k];
}

// Order this thread's non-temporal stores before whatever follows (the end of the parallel
// region, then the caller reading the outputs).
static inline void lif_stream_fence(bool stream) {
#if defined(__AVX__)
  if (stream) _mm_sfence();
#else
  (void)stream;
#endif
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
    lif_stream_fence(true);
  }
}

// The fused step's memory traffic without its arithmetic, for benchmarks/lif.py: tiles,
// time loop, chunks, prefetch, staging and streaming stores exactly as lif_forward and
// lif_backward lay them out, around a body of one add. The forward's traffic reads x and writes
// two rows (out_a = x, out_b = x + 1); the backward's reads two rows (in the backward's order,
// last step first) and writes one (out = in_a + in_b). Its time is the most any kernel with
// this traffic can do on a machine; the copy is not, since it moves two streams, not three.
// The time loops are the kernels' own (LIF_STEPS_*); a change to the kernels' chunk layout
// belongs here too.
extern "C" void lif_traffic_forward(const float* LIF_RESTRICT x, float* LIF_RESTRICT out_a,
                                    float* LIF_RESTRICT out_b, long long n, int steps, int threads) {
  omp_set_num_threads(threads);
  const bool stream = lif_should_stream((long long)steps * n * 2 * (long long)sizeof(float));
  LIF_TILE_LOOP(tile, n) {
    LIF_OUT_ROW(float, out_a);
    LIF_OUT_ROW(float, out_b);
    LIF_STEPS_FORWARD(t, row, next_row, steps, n) {
      LIF_CHUNK_LOOP(c, tile, n, out_a + row + tile) {
        LIF_PREFETCH(x, row, next_row, c, tile, n, (lif_index_t)steps * n);
        LIF_CHUNK_LANES(j, c, tile, n) {
          const lif_index_t i = row + LIF_INDEX(tile, j);
          const float v = x[i];
          LIF_OUT(out_a, i, j - c) = v;
          LIF_OUT(out_b, i, j - c) = v + 1.0f;
        }
        LIF_OUT_FLUSH(out_a, row, c, tile, n, stream);
        LIF_OUT_FLUSH(out_b, row, c, tile, n, stream);
      }
    }
    lif_stream_fence(stream);
  }
}
extern "C" void lif_traffic_backward(const float* LIF_RESTRICT in_a, const float* LIF_RESTRICT in_b,
                                     float* LIF_RESTRICT out, long long n, int steps, int threads) {
  omp_set_num_threads(threads);
  const bool stream = lif_should_stream((long long)steps * n * (long long)sizeof(float));
  LIF_TILE_LOOP(tile, n) {
    LIF_OUT_ROW(float, out);
    LIF_STEPS_BACKWARD(t, row, next_row, steps, n) {
      LIF_CHUNK_LOOP(c, tile, n, out + row + tile) {
        LIF_PREFETCH(in_a, row, next_row, c, tile, n, (lif_index_t)steps * n);
        LIF_PREFETCH(in_b, row, next_row, c, tile, n, (lif_index_t)steps * n);
        LIF_CHUNK_LANES(j, c, tile, n) {
          const lif_index_t i = row + LIF_INDEX(tile, j);
          LIF_OUT(out, i, j - c) = in_a[i] + in_b[i];
        }
        LIF_OUT_FLUSH(out, row, c, tile, n, stream);
      }
    }
    lif_stream_fence(stream);
  }
}

static inline bool lif_signbit(float x) { return __builtin_signbitf(x) != 0; }

// The cpu backend only runs fp32 (16-bit tensors are converted in torch around the call).
static inline float lif_load(float x) { return x; }
template <typename scalar_t>
static inline scalar_t lif_store(float x) { return x; }

// 16-bit storage for the tests: on the GPU the kernels keep fp16/bf16 tensors, u_saved
// included, and recompute the spike from the sign of the stored u. tests/test_kernels_cpu.py
// builds the 16-bit instantiations with these host types (source.HOST_DTYPES) so that those
// paths run on a CPU too. Loads are exact; stores round to nearest even, like CUDA's
// __float2half_rn and __float2bfloat16_rn. lif_load and lif_store above reach them through
// the conversions. Only that build defines them (source.py sets LIF_HOST_16BIT): they need
// _Float16, which the cpu backend's own library must not (GCC 11 lacks it on x86).
#ifdef LIF_HOST_16BIT
#ifndef __FLT16_MAX__
#error "the 16-bit host types need _Float16 (GCC >= 12 or clang >= 15 on x86-64; aarch64)"
#endif
struct lif_host_half {
  _Float16 value;
  lif_host_half() = default;
  lif_host_half(float x) : value((_Float16)x) {}
  operator float() const { return (float)value; }
};
struct lif_host_bf16 {
  uint16_t bits;
  lif_host_bf16() = default;
  lif_host_bf16(float x) {
    uint32_t b;
    memcpy(&b, &x, sizeof(b));
    if ((b & 0x7fffffffu) > 0x7f800000u) {
      bits = (uint16_t)((b >> 16) | 0x40u);  // NaN stays a (quiet) NaN
    } else {
      bits = (uint16_t)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);  // round to nearest even
    }
  }
  // Not inlined: GCC 12 crashes (internal compiler error) vectorising the backward pass's
  // sign test on this conversion. Test-only code, so the scalar loop costs nothing that matters.
  __attribute__((noinline)) operator float() const {
    const uint32_t b = (uint32_t)bits << 16;
    float x;
    memcpy(&x, &b, sizeof(x));
    return x;
  }
};
#endif  // LIF_HOST_16BIT

// 2^-a for a >= 0, the surrogates' exponential (the sigmoid's e^-|alpha u| is
// 2^-|alpha log2(e) u|). glibc's exp2f/expf are scalar calls that stop the simd loop from
// vectorising, and their vector variants (libmvec) are only declared under -ffast-math, which
// would also break the exact forward. This one is branch-free, so it vectorises, and is
// written for the fewest multiply-class operations (the sigmoid backward is bound by them on a
// 2-core CPU): no Cody-Waite step, since in base 2 the reduced argument r = -a - round(-a) is
// exact; a degree-5 minimax polynomial for 2^r on [-1/2, 1/2] (constant term exactly 1, so
// 2^0 == 1), in Horner's form; 1.7e-7 relative error at most, about 1.4 ulp. round(-a) comes
// from 1.5 * 2^23 + 127 - a, whose low mantissa bits then hold round(-a) + 127, so shifting
// that number's bits into the exponent field gives 2^round(-a) (no round or float-to-int
// conversion). The clamp to 126 keeps that a normal float (the surrogate is ~0 there either
// way); it is one min on the positive argument (a clamp of -|x| from below compiled to a
// compare, a blend and a mask). A NaN stays NaN. Only the backward pass calls it, so the
// exact forward is untouched.
#if defined(__FMA__)
#define LIF_FMA(a, b, c) __builtin_fmaf((a), (b), (c))
#else
#define LIF_FMA(a, b, c) ((a) * (b) + (c))
#endif
static inline float lif_exp2_neg(float a) {
  a = a > 126.0f ? 126.0f : a;
  const float shifted = 12583039.0f - a;  // 1.5 * 2^23 + 127 - a, rounded to an integer
  const float r = (12583039.0f - shifted) - a;  // -a - round(-a), in [-1/2, 1/2]
  float p = 1.3264726149e-3f;
  p = LIF_FMA(p, r, 9.6715129912e-3f);
  p = LIF_FMA(p, r, 5.5507335812e-2f);
  p = LIF_FMA(p, r, 2.4022242427e-1f);
  p = LIF_FMA(p, r, 6.9314700365e-1f);
  p = LIF_FMA(p, r, 1.0f);
  unsigned bits;
  memcpy(&bits, &shifted, sizeof(bits));
  bits <<= 23;  // (round(-a) + 127) << 23: 2^round(-a), round(-a) in [-126, 0]
  float scale;
  memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

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
// A tile is one chunk (c is always 0): each thread's LIF_LANES lanes stay in registers.
#define LIF_CHUNK_SIZE LIF_LANES
#define LIF_CHUNK_LOOP(c, tile, n, out_row) for (int c = 0; c < 1; ++c)
#define LIF_CHUNK_LANES(j, c, tile, n) LIF_LANE_LOOP(j, tile, n)
#define LIF_INDEX(tile, j) ((tile) + threadIdx.x + (lif_index_t)(j) * blockDim.x)

// Coalesced in-place writes; the host's staging and streaming have no GPU counterpart here.
LIF_DEVICE bool lif_should_stream(long long) { return false; }
LIF_DEVICE void lif_stream_fence(bool) {}
#define LIF_OUT_ROW(type, out)
#define LIF_OUT(out, i, k) (out)[i]
#define LIF_OUT_FLUSH(out, row, c, tile, n, stream) (void)(stream)
#define LIF_PREFETCH(in, row, next_row, c, tile, n, size)

LIF_DEVICE bool lif_signbit(float x) { return signbit(x) != 0; }
// See the host's: 2^-a for a >= 0.
LIF_DEVICE float lif_exp2_neg(float a) { return exp2f(-a); }

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
