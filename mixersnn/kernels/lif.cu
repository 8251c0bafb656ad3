// lif.cu: fused multi-step LIF forward and exact-BPTT backward (design doc section 2).
//
// One source for every target: mixersnn/kernels/source.py inlines lif_shim.h (CUDA or host
// C++ vocabulary) and the surrogate derivatives generated from mixersnn.neurons.surrogate,
// then NVRTC (cupy backend) or g++ (cpu backend) compiles the result.
//
// Layout: x, spikes, u_saved, grads are [steps, n] contiguous; v0, v_final are [n].
// Storage type scalar_t is float, __half or __nv_bfloat16; all arithmetic is fp32.
//
// Template options (one specialisation per option set, so every branch below is resolved at
// compile time):
//   kHard        1: hard reset to v_reset; 0: soft reset (subtract v_threshold, charge with 0)
//   kDecay       1: H = V + (X - (V - V_reset)) / tau; 0: H = V - (V - V_reset) / tau + X
//   kSave        forward only: 1 stores u = H - v_threshold for the backward pass
//   kDetach      backward only: 1 drops the spike's gradient inside the reset
//   kSurrogate   backward only: index into the generated lif_surrogate<> table
//
// What the backward pass needs is u = H - v_threshold alone: the spike is recomputed as
// "u is not negative" (sign bit, see lif_forward), the surrogate takes u, and the hard-reset
// term (V_reset - H) is (V_reset - v_threshold) - u. So the forward writes one tensor for
// autograd and never the spikes twice.

#include "lif_shim.h"

// @SURROGATES@  (replaced by source.py: template <int kSurrogate> lif_surrogate(u, alpha))

// Charge step. The operation order copies the torch reference exactly (no fused
// multiply-add: both compilers run with contraction off), so spikes match bit for bit.
template <int kDecay>
LIF_DEVICE float lif_charge(float v, float x, float inv_tau, float v_reset_charge) {
  if (kDecay) {
    return v + (x - (v - v_reset_charge)) * inv_tau;
  }
  return v - (v - v_reset_charge) * inv_tau + x;
}

// Forward over all steps.
//   x        [steps, n]  input current
//   v0       [n] or null membrane before step 0; null: rest, read from nowhere (hard reset:
//                        v_reset, as SpikingJelly starts; soft reset: 0)
//   spikes   [steps, n]  out: 0/1
//   u_saved  [steps, n]  out (kSave only): H - v_threshold, with -0 canonicalised to +0
//   v_final  [n] or null out: membrane after the last step; null: not written
// A layer that starts every sample from rest and drops the final membrane (the models' LIF
// nodes) passes both null: at T=4 reading v0 and writing v_final would add 2-3 bytes to the 12
// per element and step the forward must move (measured on the 2-vCPU EPYC, T=4, N=4M: 12.3 ->
// 9.7 ms for the forward alone, against 9.1 ms for its bare memory traffic).
template <typename scalar_t, int kHard, int kDecay, int kSave>
LIF_GLOBAL void lif_forward(const scalar_t* LIF_RESTRICT x, const scalar_t* LIF_RESTRICT v0,
                            scalar_t* LIF_RESTRICT spikes, scalar_t* LIF_RESTRICT u_saved,
                            scalar_t* LIF_RESTRICT v_final, lif_index_t n, int steps,
                            float inv_tau, float v_reset, float v_threshold) {
  // A soft reset charges towards 0 (design doc section 2). The potential the charge leaks
  // towards is also the rest state a null v0 starts from.
  const float v_reset_charge = kHard ? v_reset : 0.0f;
  const bool stream = lif_should_stream((long long)steps * n * (kSave ? 2 : 1) * sizeof(scalar_t));
  LIF_TILE_LOOP(tile, n) {
    float v[LIF_LANES];
    LIF_OUT_ROW(scalar_t, spikes);
    LIF_OUT_ROW(scalar_t, u_saved);
    LIF_LANE_LOOP(j, tile, n) { v[j] = v0 ? lif_load(v0[LIF_INDEX(tile, j)]) : v_reset_charge; }
    LIF_STEPS_FORWARD(t, row, next_row, steps, n) {
      LIF_CHUNK_LOOP(c, tile, n, spikes + row + tile) {
        LIF_PREFETCH(x, row, next_row, c, tile, n, (lif_index_t)steps * n);
        LIF_CHUNK_LANES(j, c, tile, n) {
          const lif_index_t i = row + LIF_INDEX(tile, j);
          const float h = lif_charge<kDecay>(v[j], lif_load(x[i]), inv_tau, v_reset_charge);
          const float u = h - v_threshold;
          const bool fire = u >= 0.0f;
          LIF_OUT(spikes, i, j - c) = lif_store<scalar_t>(fire ? 1.0f : 0.0f);
          if (kSave) {
            // u + 0 turns -0 (which fires) into +0 and leaves every other value alone, so
            // "sign bit clear" == "fired" survives storage; a negative u that rounds to
            // zero in 16 bits keeps its sign (round-to-nearest).
            LIF_OUT(u_saved, i, j - c) = lif_store<scalar_t>(u + 0.0f);
          }
          // Both resets as selects of values computed unconditionally (h - 0 == h exactly),
          // so the CPU build vectorises the loop without speculating a conditional FP
          // operation.
          if (kHard) {
            v[j] = fire ? v_reset : h;
          } else {
            v[j] = h - (fire ? v_threshold : 0.0f);
          }
        }
        LIF_OUT_FLUSH(spikes, row, c, tile, n, stream);
        if (kSave) {
          LIF_OUT_FLUSH(u_saved, row, c, tile, n, stream);
        }
      }
    }
    if (v_final) {
      LIF_LANE_LOOP(j, tile, n) { v_final[LIF_INDEX(tile, j)] = lif_store<scalar_t>(v[j]); }
    }
    lif_stream_fence(stream);
  }
}

// benchmarks/lif.py prices both passes against their bare memory traffic, lif_traffic_forward
// and lif_traffic_backward in lif_shim.h, which share these loops (tiles, LIF_STEPS_*, chunks,
// prefetch, staging, streaming stores): a change to one belongs in the other.

// Backward through time (exact BPTT):
//   g_H[t] = g_S[t] sg(u) + (g_V[t] + g_H[t+1] (1 - 1/tau)) dV/dH
//   dV/dH  = hard: 1 - S + (V_reset - H) sg(u);  soft: 1 - v_threshold sg(u);
//            the sg terms vanish with kDetach
//   g_X[t] = g_H[t] / tau (kDecay) or g_H[t];   g_V0 = g_H[0] (1 - 1/tau)
// The only upstream g_V is on v_final (the intermediate V are not outputs).
//   u_saved      [steps, n]  from lif_forward
//   grad_spikes  [steps, n]
//   grad_vfinal  [n] or null (no gradient reached v_final)
//   grad_x       [steps, n]  out
//   grad_v0      [n] or null (v0 needs no gradient, or was null: a rest start is a constant)
template <typename scalar_t, int kHard, int kDecay, int kDetach, int kSurrogate>
LIF_GLOBAL void lif_backward(const scalar_t* LIF_RESTRICT u_saved,
                             const scalar_t* LIF_RESTRICT grad_spikes,
                             const scalar_t* LIF_RESTRICT grad_vfinal,
                             scalar_t* LIF_RESTRICT grad_x, scalar_t* LIF_RESTRICT grad_v0,
                             lif_index_t n, int steps, float inv_tau, float v_reset,
                             float v_threshold, float alpha) {
  const float leak = 1.0f - inv_tau;
  // V_reset - H = (V_reset - v_threshold) - u
  const float reset_gap = v_reset - v_threshold;
  const bool stream = lif_should_stream((long long)steps * n * sizeof(scalar_t));
  LIF_TILE_LOOP(tile, n) {
    float gv[LIF_LANES];
    LIF_OUT_ROW(scalar_t, grad_x);
    LIF_LANE_LOOP(j, tile, n) {
      gv[j] = grad_vfinal ? lif_load(grad_vfinal[LIF_INDEX(tile, j)]) : 0.0f;
    }
    LIF_STEPS_BACKWARD(t, row, next_row, steps, n) {
      LIF_CHUNK_LOOP(c, tile, n, grad_x + row + tile) {
        LIF_PREFETCH(u_saved, row, next_row, c, tile, n, (lif_index_t)steps * n);
        LIF_PREFETCH(grad_spikes, row, next_row, c, tile, n, (lif_index_t)steps * n);
        float sg[LIF_CHUNK_SIZE];
        // The surrogate first, in its own loop: its long dependency chain (an exp and a
        // division for the sigmoid) overlaps across lanes far better on a CPU without the
        // rest of the step in the same loop body. The second loop reads u again, from L1
        // (keeping u in a chunk array instead measured ~5% slower on the CPU; on the GPU the
        // reload hits the line the first loop brought in).
        LIF_CHUNK_LANES(j, c, tile, n) {
          sg[j - c] = lif_surrogate<kSurrogate>(lif_load(u_saved[row + LIF_INDEX(tile, j)]), alpha);
        }
        LIF_CHUNK_LANES(j, c, tile, n) {
          const lif_index_t i = row + LIF_INDEX(tile, j);
          const float u = lif_load(u_saved[i]);
          float dv_dh;
          if (kHard) {
            const float not_fired = lif_signbit(u) ? 1.0f : 0.0f;
            dv_dh = kDetach ? not_fired : not_fired + (reset_gap - u) * sg[j - c];
          } else {
            dv_dh = kDetach ? 1.0f : 1.0f - v_threshold * sg[j - c];
          }
          const float gh = lif_load(grad_spikes[i]) * sg[j - c] + gv[j] * dv_dh;
          LIF_OUT(grad_x, i, j - c) = lif_store<scalar_t>(kDecay ? gh * inv_tau : gh);
          gv[j] = gh * leak;
        }
        LIF_OUT_FLUSH(grad_x, row, c, tile, n, stream);
      }
    }
    if (grad_v0) {
      LIF_LANE_LOOP(j, tile, n) { grad_v0[LIF_INDEX(tile, j)] = lif_store<scalar_t>(gv[j]); }
    }
    lif_stream_fence(stream);
  }
}
