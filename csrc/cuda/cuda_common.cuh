// Shared by the CUDA sources: block-wide reductions / scans, launch-error reporting.
#pragma once

#include <cuda_runtime.h>

#include <exception>
#include <new>

#include "../common.h"

namespace embedkit {

extern thread_local ErrorSlot g_cuda_error;

constexpr int kThreads = 256;  // every kernel here runs 256-thread blocks
constexpr int kWarps = kThreads / 32;

// Status of the launch just made: an EK_ERR_CUDA naming `what` if the runtime reports an error.
inline int launch_status(const char *what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return fail(g_cuda_error, EK_ERR_CUDA, "%s: %s (%s)", what, cudaGetErrorString(err), cudaGetErrorName(err));
  return EK_OK;
}

// f() with every C++ exception turned into a status code: none may cross the extern "C" ABI (the
// host code here allocates nothing today; this keeps it so whatever it grows into).
template <class F>
int guarded(const char *what, F &&f) noexcept {
  try {
    return f();
  } catch (const std::bad_alloc &) {
    return fail(g_cuda_error, EK_ERR_OUT_OF_MEMORY, "%s: out of host memory (std::bad_alloc)", what);
  } catch (const std::exception &e) {
    return fail(g_cuda_error, EK_ERR_INTERNAL, "%s: C++ exception: %s", what, e.what());
  } catch (...) {
    return fail(g_cuda_error, EK_ERR_INTERNAL, "%s: unknown C++ exception", what);
  }
}

// Sum over the block, returned to every thread. `scratch` holds kWarps values; the trailing
// barrier lets the caller reuse it immediately.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T *scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += scratch[w];  // the same fixed order in every thread
  __syncthreads();
  return total;
}

// Inclusive prefix sum of x over the block (thread order); *total gets the block's sum.
__device__ __forceinline__ int block_inclusive_scan(int x, int *total, int *scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, off);
    if (lane >= off) x += y;
  }
  if (lane == 31) scratch[warp] = x;
  __syncthreads();
  int before = 0, sum = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    before += w < warp ? scratch[w] : 0;
    sum += scratch[w];
  }
  __syncthreads();
  *total = sum;
  return x + before;
}

// cu_seqlens entry b clamped into [lo, total_rows]: bad offsets (validation off) never index
// outside the tensors.
__device__ __forceinline__ int64_t clamp_row(int32_t v, int64_t lo, int64_t total_rows) {
  const int64_t x = v;
  return x < lo ? lo : (x > total_rows ? total_rows : x);
}

}  // namespace embedkit
