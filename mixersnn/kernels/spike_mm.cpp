// spike_mm.cpp: event-driven synapses for the cpu backend (host C++ only; appended to the host
// build of lif.cu by mixersnn/kernels/cpu.py and called from mixersnn/kernels/spike_linear.py).
//
// A Linear layer fed by spikes multiplies a matrix that is 85-96% zeros. A dense GEMM does
// every multiply; these kernels do work in proportion to the nonzeros:
//
//   spk_count / spk_fill  the nonzero columns of each row of s [M, K] (CSR without values)
//   spk_linear_fwd        y [M, N] = s @ w^T (+ b), w [N, K]: per row, the sum of the rows
//                         of w^T at its nonzeros, times their values
//   spk_linear_wgrad      gw [N, K] = gy^T @ s: row k of gw^T is the sum of the rows of gy
//                         whose s[:, k] is nonzero, times those values
//
// Any values work (a value multiplies its row: exact for 0/1 spikes, correct for any sparse
// input); only the speed depends on how few nonzeros there are. The grad of s, gy @ w, is
// dense and stays with the BLAS.
//
// Both products run over column blocks of w's N rows (kBlock = 64 floats, four 16-lane
// vectors; a narrower last block computes only the vectors it has): a block of w^T ([K, 64],
// at most a few hundred KiB) stays in L2 while the rows of s visit it. The forward transposes
// w once per call, block by block, then splits (block, 32-row tile) tasks over the threads;
// the weight gradient gives each thread whole blocks, or (block, row range) tasks when there
// are fewer blocks than threads. Accumulation is in fp32 in the order of increasing k
// (forward) or m (weight gradient); the bias is added last.

#include <omp.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int kLanes = 16;
constexpr int kBlock = 4 * kLanes;
typedef float vec __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));

inline vec load(const float* p) { return *(const vec*)p; }
inline void store(float* p, vec v) { *(vec*)p = v; }

// The width of column block c (the last one may be narrower).
inline long long block_width(long long c, long long n) {
  long long rest = n - c * kBlock;
  return rest < kBlock ? rest : kBlock;
}
// Column blocks of kBlock covering n (the last one may be narrower: block_width).
inline long long column_blocks(long long n) { return (n + kBlock - 1) / kBlock; }

// dst [k_count, kBlock] = src[j, k] for j < width (rows of a row-major [*, ld] matrix), zero
// for the padding lanes; 16x16 tiles keep both sides in L1.
void transpose_block(const float* src, long long ld, long long width, long long k_count, float* dst) {
  if (width < kBlock) memset(dst, 0, sizeof(float) * k_count * kBlock);
  for (long long k0 = 0; k0 < k_count; k0 += kLanes) {
    long long kb = k_count - k0 < kLanes ? k_count - k0 : kLanes;
    for (long long j = 0; j < width; ++j) {
      const float* row = src + j * ld + k0;
      for (long long kk = 0; kk < kb; ++kk) dst[(k0 + kk) * kBlock + j] = row[kk];
    }
  }
}

}  // namespace

// row_ptr[m + 1] - row_ptr[m] = nonzeros of row m of s [M, K] (row_ptr[0] = 0); returns the total.
extern "C" long long spk_count(const float* s, long long M, long long K, int* row_ptr, int threads) {
  omp_set_num_threads(threads);
#pragma omp parallel for schedule(static)
  for (long long m = 0; m < M; ++m) {
    const float* r = s + m * K;
    int c = 0;
    long long k = 0;
#if defined(__AVX512F__)
    for (; k < K; k += kLanes) {  // NaN counts as nonzero (unordered compare)
      const __mmask16 live = K - k >= kLanes ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
      const __m512 v = _mm512_maskz_loadu_ps(live, r + k);
      c += __builtin_popcount((unsigned)_mm512_mask_cmp_ps_mask(live, v, _mm512_setzero_ps(), _CMP_NEQ_UQ));
    }
#endif
    for (; k < K; ++k) c += (r[k] != 0.0f);
    row_ptr[m + 1] = c;
  }
  row_ptr[0] = 0;
  long long total = 0;
  for (long long m = 0; m < M; ++m) {
    total += row_ptr[m + 1];
    row_ptr[m + 1] = (int)total;
  }
  return total;
}

// cols[row_ptr[m] ...] = the nonzero columns of row m, increasing. scratch: threads * (K + 16) ints.
extern "C" void spk_fill(const float* s, long long M, long long K, const int* row_ptr, int* cols, int* scratch,
                         int threads) {
  omp_set_num_threads(threads);
#pragma omp parallel
  {
    int* buf = scratch + (long long)omp_get_thread_num() * (K + kLanes);
#pragma omp for schedule(static)
    for (long long m = 0; m < M; ++m) {
      const float* r = s + m * K;
      int* c = buf;
      long long k = 0;
#if defined(__AVX512F__)
      // Compress to a register, then store all 16 lanes: buf has room for the overhang
      // (a compress straight to memory is microcoded and slow on some CPUs).
      __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      const __m512i step = _mm512_set1_epi32(kLanes);
      for (; k < K; k += kLanes) {
        const __mmask16 live = K - k >= kLanes ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        const __m512 v = _mm512_maskz_loadu_ps(live, r + k);
        const __mmask16 nz = _mm512_mask_cmp_ps_mask(live, v, _mm512_setzero_ps(), _CMP_NEQ_UQ);
        _mm512_storeu_si512((void*)c, _mm512_maskz_compress_epi32(nz, idx));
        c += __builtin_popcount((unsigned)nz);
        idx = _mm512_add_epi32(idx, step);
      }
#endif
      for (; k < K; ++k) {  // branch-free: write always, advance on a nonzero
        *c = (int)k;
        c += (r[k] != 0.0f);
      }
      memcpy(cols + row_ptr[m], buf, sizeof(int) * (c - buf));
    }
  }
}

namespace {

// Row m of s times one column block: acc[v] = sum over the row's nonzeros k of s[m, k] *
// wb[k, 16v : 16v + 16], for the block's first NV vectors (a narrow last block, or a narrow
// layer, computes only the lanes it has).
template <int NV>
inline void row_times_block(const float* sr, const int* cols, int begin, int end, const float* wb, vec* acc) {
  vec a[NV];
  for (int v = 0; v < NV; ++v) a[v] = vec{0};
  for (int i = begin; i < end; ++i) {
    const int k = cols[i];
    const float x = sr[k];
    const float* wr = wb + (long long)k * kBlock;
    for (int v = 0; v < NV; ++v) a[v] += x * load(wr + v * kLanes);
  }
  for (int v = 0; v < NV; ++v) acc[v] = a[v];
}

template <int NV>
void forward_rows(const float* s, const int* row_ptr, const int* cols, const float* wb, const float* bias_block,
                  float* y, long long m_begin, long long m_end, long long K, long long N, long long n0,
                  long long width) {
  vec bias[NV];
  for (int v = 0; v < NV; ++v) bias[v] = load(bias_block + v * kLanes);
  for (long long m = m_begin; m < m_end; ++m) {
    vec acc[NV];
    row_times_block<NV>(s + m * K, cols, row_ptr[m], row_ptr[m + 1], wb, acc);
    float* yr = y + m * N + n0;
    if (width == NV * kLanes) {
      for (int v = 0; v < NV; ++v) store(yr + v * kLanes, acc[v] + bias[v]);
    } else {
      float out[kBlock] __attribute__((aligned(64)));
      for (int v = 0; v < NV; ++v) store(out + v * kLanes, acc[v] + bias[v]);
      for (long long j = 0; j < width; ++j) yr[j] = out[j];
    }
  }
}

// Adds s[m, k] * gy[m, n0 : n0 + width] to at[k, :] for every nonzero k of rows
// [m_begin, m_end); at is one column block of gw^T, [K, kBlock].
template <int NV>
void wgrad_rows(const float* s, const int* row_ptr, const int* cols, const float* gy, float* at,
                long long m_begin, long long m_end, long long K, long long N, long long n0, long long width) {
  for (long long m = m_begin; m < m_end; ++m) {
    const int begin = row_ptr[m], end = row_ptr[m + 1];
    if (begin == end) continue;
    vec g[NV];
    const float* gr = gy + m * N + n0;
    if (width == NV * kLanes) {
      for (int v = 0; v < NV; ++v) g[v] = load(gr + v * kLanes);
    } else {
      float buf[kBlock] __attribute__((aligned(64))) = {0};
      for (long long j = 0; j < width; ++j) buf[j] = gr[j];
      for (int v = 0; v < NV; ++v) g[v] = load(buf + v * kLanes);
    }
    const float* sr = s + m * K;
    for (int i = begin; i < end; ++i) {
      const int k = cols[i];
      const float x = sr[k];
      float* ar = at + (long long)k * kBlock;
      for (int v = 0; v < NV; ++v) store(ar + v * kLanes, load(ar + v * kLanes) + x * g[v]);
    }
  }
}

// The vectors a block of this width needs (1-4).
inline int vectors(long long width) { return (int)((width + kLanes - 1) / kLanes); }

}  // namespace

// y [M, N] = s [M, K] @ w [N, K]^T + b [N] (b may be null). wt: scratch of
// ceil(N / 64) * (K + 1) * 64 floats (each block's w^T, then its bias).
extern "C" void spk_linear_fwd(const float* s, const int* row_ptr, const int* cols, const float* w,
                               const float* b, float* y, float* wt, long long M, long long K, long long N,
                               int threads) {
  omp_set_num_threads(threads);
  const long long blocks = column_blocks(N);
  const long long row_tiles = (M + 31) / 32;
  const long long stride = (K + 1) * kBlock;
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (long long c = 0; c < blocks; ++c) {
      const long long width = block_width(c, N);
      float* wb = wt + c * stride;
      transpose_block(w + c * kBlock * K, K, width, K, wb);
      float* bias_block = wb + K * kBlock;
      for (long long j = 0; j < kBlock; ++j) bias_block[j] = (b && j < width) ? b[c * kBlock + j] : 0.0f;
    }
    // (the implicit barrier: every block is transposed before any is read)
#pragma omp for collapse(2) schedule(static)
    for (long long c = 0; c < blocks; ++c) {
      for (long long t = 0; t < row_tiles; ++t) {
        const long long width = block_width(c, N);
        const float* wb = wt + c * stride;
        const long long m0 = t * 32, m1 = (t + 1) * 32 < M ? (t + 1) * 32 : M;
        const float* bb = wb + K * kBlock;
        switch (vectors(width)) {
          case 1: forward_rows<1>(s, row_ptr, cols, wb, bb, y, m0, m1, K, N, c * kBlock, width); break;
          case 2: forward_rows<2>(s, row_ptr, cols, wb, bb, y, m0, m1, K, N, c * kBlock, width); break;
          case 3: forward_rows<3>(s, row_ptr, cols, wb, bb, y, m0, m1, K, N, c * kBlock, width); break;
          default: forward_rows<4>(s, row_ptr, cols, wb, bb, y, m0, m1, K, N, c * kBlock, width); break;
        }
      }
    }
  }
}

namespace {

// How many row ranges spk_linear_wgrad splits M into: 1 when there are at least as many
// column blocks as threads, else enough (block, range) tasks for every thread, each range at
// least 256 rows.
long long wgrad_ranges(long long M, long long N, int threads) {
  const long long blocks = column_blocks(N);
  const long long ranges = (threads + blocks - 1) / blocks;
  const long long most = M / 256 > 1 ? M / 256 : 1;
  return ranges < most ? ranges : most;
}

// gw[n0 + j, k0 + kk] = at[k0 + kk, j] for one 16-row tile of a block's gw^T slab.
inline void store_transposed(const float* at, float* gw, long long K, long long n0, long long width, long long k0) {
  const long long kb = K - k0 < kLanes ? K - k0 : kLanes;
  for (long long j = 0; j < width; ++j) {
    float* dst = gw + (n0 + j) * K + k0;
    for (long long kk = 0; kk < kb; ++kk) dst[kk] = at[(k0 + kk) * kBlock + j];
  }
}

void wgrad_block_range(const float* s, const int* row_ptr, const int* cols, const float* gy, float* at,
                       long long m0, long long m1, long long K, long long N, long long c) {
  const long long width = block_width(c, N);
  memset(at, 0, sizeof(float) * K * kBlock);
  switch (vectors(width)) {
    case 1: wgrad_rows<1>(s, row_ptr, cols, gy, at, m0, m1, K, N, c * kBlock, width); break;
    case 2: wgrad_rows<2>(s, row_ptr, cols, gy, at, m0, m1, K, N, c * kBlock, width); break;
    case 3: wgrad_rows<3>(s, row_ptr, cols, gy, at, m0, m1, K, N, c * kBlock, width); break;
    default: wgrad_rows<4>(s, row_ptr, cols, gy, at, m0, m1, K, N, c * kBlock, width); break;
  }
}

}  // namespace

// Floats of scratch spk_linear_wgrad needs for these sizes and threads.
extern "C" long long spk_wgrad_scratch(long long M, long long K, long long N, int threads) {
  const long long ranges = wgrad_ranges(M, N, threads);
  const long long blocks = column_blocks(N);
  return (ranges == 1 ? (long long)threads : blocks * ranges) * K * kBlock;
}

// gw [N, K] = gy [M, N]^T @ s [M, K]; acc: spk_wgrad_scratch(M, K, N, threads) floats.
// With a column block per thread or more, each thread sums whole blocks into its own [K, 64]
// slab of gw^T (reused, so it stays in L2) and writes each out transposed. With fewer blocks
// than threads, each (block, row range) task sums into a slab of its own; the slabs of a
// block are then added in range order (the result does not depend on scheduling) and written.
extern "C" void spk_linear_wgrad(const float* s, const int* row_ptr, const int* cols, const float* gy,
                                 float* gw, float* acc, long long M, long long K, long long N, int threads) {
  omp_set_num_threads(threads);
  const long long blocks = column_blocks(N);
  const long long ranges = wgrad_ranges(M, N, threads);
  const long long slab = K * kBlock;
  if (ranges == 1) {
#pragma omp parallel
    {
      float* at = acc + (long long)omp_get_thread_num() * slab;
#pragma omp for schedule(static)
      for (long long c = 0; c < blocks; ++c) {
        wgrad_block_range(s, row_ptr, cols, gy, at, 0, M, K, N, c);
        for (long long k0 = 0; k0 < K; k0 += kLanes) store_transposed(at, gw, K, c * kBlock, block_width(c, N), k0);
      }
    }
    return;
  }
  const long long k_tiles = (K + kLanes - 1) / kLanes;
#pragma omp parallel
  {
#pragma omp for collapse(2) schedule(static)
    for (long long c = 0; c < blocks; ++c)
      for (long long r = 0; r < ranges; ++r)
        wgrad_block_range(s, row_ptr, cols, gy, acc + (c * ranges + r) * slab, M * r / ranges,
                          M * (r + 1) / ranges, K, N, c);
    // (the implicit barrier: every slab is complete)
#pragma omp for collapse(2) schedule(static)
    for (long long c = 0; c < blocks; ++c) {
      for (long long t = 0; t < k_tiles; ++t) {
        const long long k0 = t * kLanes, kb = K - k0 < kLanes ? K - k0 : kLanes;
        float* first = acc + c * ranges * slab;
        for (long long r = 1; r < ranges; ++r) {
          const float* more = first + r * slab;
          for (long long i = k0 * kBlock; i < (k0 + kb) * kBlock; i += kLanes)
            store(first + i, load(first + i) + load(more + i));
        }
        store_transposed(first, gw, K, c * kBlock, block_width(c, N), k0);
      }
    }
  }
}
