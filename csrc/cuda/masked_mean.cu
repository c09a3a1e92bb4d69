// masked_mean: out[b] = mean of the pooled rows of sequence b (fp32 accumulation).
//
// Block = 32 column lanes x 8 row slots; each lane owns VEC adjacent columns (one 16-byte load
// per row when the layout allows it, else one element), each row slot walks every 8th row of
// the sequence, and the 8 partial sums are added in a fixed order (deterministic). Grid: one
// block per (sequence, 32 * VEC columns). Token counts are integers (an fp32 count stalls at 2^24);
// each slot sums its rows in fp32 in two levels (kFlush steps into `part`, then into `acc`), so a
// long sequence's sum does not stall either.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda_common.cuh"

namespace embedkit {
namespace {

constexpr int kLanes = 32, kSlots = kThreads / kLanes, kUnroll = 4;
constexpr int kFlush = 512;  // steps (kUnroll rows each) per first-level partial sum of a slot

template <typename T> struct Conv;
template <> struct Conv<float> {
  static __device__ float load(float x) { return x; }
  static __device__ float store(float x) { return x; }
};
template <> struct Conv<__half> {
  static __device__ float load(__half x) { return __half2float(x); }
  static __device__ __half store(float x) { return __float2half_rn(x); }
};
template <> struct Conv<__nv_bfloat16> {
  static __device__ float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
masked_mean_kernel(const T *__restrict__ hidden, int64_t total_rows, int64_t width, int64_t stride_rows,
                   const int32_t *__restrict__ cu_seqlens, const uint8_t *__restrict__ pool_mask,
                   int64_t col_blocks, T *__restrict__ out, float *__restrict__ counts) {
  __shared__ float partial[kSlots][kLanes * VEC];
  __shared__ int64_t partial_count[kSlots];
  const int lane = threadIdx.x % kLanes, slot = threadIdx.x / kLanes;
  const int64_t b = blockIdx.x / col_blocks;
  const int64_t col = ((blockIdx.x % col_blocks) * kLanes + lane) * VEC;
  const int64_t start = clamp_row(cu_seqlens[b], 0, total_rows);
  const int64_t end = clamp_row(cu_seqlens[b + 1], start, total_rows);
  const bool active = col < width;  // VEC divides width whenever VEC > 1
  float acc[VEC], part[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] = part[i] = 0.0f;
  int64_t count = 0;
  int steps = 0;
  // kUnroll rows per slot per step: their loads are issued together (memory-level parallelism).
  for (int64_t t0 = start + slot; t0 < end; t0 += kSlots * kUnroll) {
    union { uint4 raw; T v[VEC]; } u[kUnroll];
    bool take[kUnroll];
#pragma unroll
    for (int r = 0; r < kUnroll; ++r) {
      const int64_t t = t0 + r * kSlots;
      take[r] = t < end && (pool_mask == nullptr || pool_mask[t] != 0);
      count += take[r] ? 1 : 0;
      if (take[r] && active) {
        const T *row = hidden + t * stride_rows + col;
        if (VEC > 1)
          u[r].raw = __ldg(reinterpret_cast<const uint4 *>(row));
        else
          u[r].v[0] = row[0];
      }
    }
#pragma unroll
    for (int r = 0; r < kUnroll; ++r) {
      if (!(take[r] && active)) continue;
#pragma unroll
      for (int i = 0; i < VEC; ++i) part[i] += Conv<T>::load(u[r].v[i]);
    }
    if (++steps == kFlush) {
      steps = 0;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        acc[i] += part[i];
        part[i] = 0.0f;
      }
    }
  }
#pragma unroll
  for (int i = 0; i < VEC; ++i) partial[slot][lane * VEC + i] = acc[i] + part[i];
  if (lane == 0) partial_count[slot] = count;
  __syncthreads();
  if (slot != 0) return;
  int64_t total = 0;
#pragma unroll
  for (int s = 0; s < kSlots; ++s) total += partial_count[s];
  const float n = static_cast<float>(total);
  if (active) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float sum = 0.0f;
#pragma unroll
      for (int s = 0; s < kSlots; ++s) sum += partial[s][lane * VEC + i];
      out[b * width + col + i] = Conv<T>::store(sum / n);
    }
  }
  if (col == 0) counts[b] = n;
}

template <typename T>
int launch(const void *hidden, int64_t total_rows, int64_t width, int64_t stride_rows, const int32_t *cu_seqlens,
           const uint8_t *pool_mask, int64_t batch, void *out, float *counts, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const uintptr_t align = reinterpret_cast<uintptr_t>(hidden) | reinterpret_cast<uintptr_t>(out) |
                          static_cast<uintptr_t>(stride_rows * sizeof(T));
  const bool vec = align % 16 == 0 && width % kVec == 0;
  const int64_t cols_per_block = kLanes * (vec ? kVec : 1);
  const int64_t col_blocks = width > 0 ? (width + cols_per_block - 1) / cols_per_block : 1;
  EK_REQUIRE(g_cuda_error, batch * col_blocks <= INT32_MAX, "masked_mean: batch x width too large for one grid");
  const dim3 grid(static_cast<unsigned>(batch * col_blocks));
  const T *h = static_cast<const T *>(hidden);
  T *o = static_cast<T *>(out);
  if (vec)
    masked_mean_kernel<T, kVec><<<grid, kThreads, 0, stream>>>(h, total_rows, width, stride_rows, cu_seqlens,
                                                               pool_mask, col_blocks, o, counts);
  else
    masked_mean_kernel<T, 1><<<grid, kThreads, 0, stream>>>(h, total_rows, width, stride_rows, cu_seqlens,
                                                            pool_mask, col_blocks, o, counts);
  return launch_status("masked_mean kernel launch");
}

}  // namespace
}  // namespace embedkit

extern "C" int ek_masked_mean_cuda(const void *hidden, int32_t dtype, int64_t total_rows, int64_t width,
                                   int64_t stride_rows, const int32_t *cu_seqlens, const uint8_t *pool_mask,
                                   int64_t batch, void *out, float *counts, cudaStream_t stream) {
  using namespace embedkit;
  return guarded("ek_masked_mean_cuda", [&]() -> int {
    EK_REQUIRE(g_cuda_error, batch >= 0 && total_rows >= 0 && width >= 0, "negative size");
    EK_REQUIRE(g_cuda_error, stride_rows >= width || total_rows <= 1, "stride_rows (%lld) < width (%lld)",
               (long long)stride_rows, (long long)width);
    EK_REQUIRE(g_cuda_error, cu_seqlens && (counts || batch == 0), "null cu_seqlens or counts");
    EK_REQUIRE(g_cuda_error, out || batch * width == 0, "null out");
    EK_REQUIRE(g_cuda_error, hidden || total_rows * width == 0, "null hidden");
    if (batch == 0) return EK_OK;
    switch (dtype) {
      case EK_DTYPE_FLOAT32:
        return launch<float>(hidden, total_rows, width, stride_rows, cu_seqlens, pool_mask, batch, out, counts, stream);
      case EK_DTYPE_FLOAT16:
        return launch<__half>(hidden, total_rows, width, stride_rows, cu_seqlens, pool_mask, batch, out, counts, stream);
      case EK_DTYPE_BFLOAT16:
        return launch<__nv_bfloat16>(hidden, total_rows, width, stride_rows, cu_seqlens, pool_mask, batch, out, counts,
                                     stream);
      default:
        return fail(g_cuda_error, EK_ERR_UNSUPPORTED_DTYPE, "dtype code %d is not one of EK_DTYPE_*", dtype);
    }
  });
}
