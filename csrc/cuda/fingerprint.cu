// sequence_fingerprint: one block per sequence; each thread sums the position-keyed hash terms
// of a strided subset of the sequence's 32-bit words, then a block sum mod 2^64 combines them.
// Integer addition is associative and commutative, so the bits match the CPU twin and the torch
// reference whatever the reduction order (see embedkit.h for the definition).
#include <cstdint>

#include "cuda_common.cuh"

namespace embedkit {

thread_local ErrorSlot g_cuda_error = {{0}};

namespace {

__global__ void __launch_bounds__(kThreads)
fingerprint_kernel(const uint8_t *__restrict__ values, int64_t total_rows, int64_t row_bytes,
                   const int32_t *__restrict__ cu_seqlens, int64_t *__restrict__ out) {
  __shared__ unsigned long long scratch[kWarps];
  const int64_t b = blockIdx.x;
  const int64_t start = clamp_row(cu_seqlens[b], 0, total_rows);
  const int64_t end = clamp_row(cu_seqlens[b + 1], start, total_rows);
  const uint8_t *p = values + start * row_bytes;
  const uint64_t n = static_cast<uint64_t>(end - start) * row_bytes;
  const uint64_t full = n / 4;
  unsigned long long acc = 0;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(p);
  if (addr % 16 == 0) {
    const uint4 *q = reinterpret_cast<const uint4 *>(p);
    const uint64_t nvec = n / 16;
#pragma unroll 4
    for (uint64_t v = threadIdx.x; v < nvec; v += kThreads) {
      const uint4 x = __ldg(q + v);
      const uint64_t k = 4 * v;
      acc += fp_term(k, x.x) + fp_term(k + 1, x.y) + fp_term(k + 2, x.z) + fp_term(k + 3, x.w);
    }
    for (uint64_t k = 4 * nvec + threadIdx.x; k < full; k += kThreads)
      acc += fp_term(k, __ldg(reinterpret_cast<const uint32_t *>(p) + k));
  } else if (addr % 4 == 0) {
    for (uint64_t k = threadIdx.x; k < full; k += kThreads)
      acc += fp_term(k, __ldg(reinterpret_cast<const uint32_t *>(p) + k));
  } else {
    for (uint64_t k = threadIdx.x; k < full; k += kThreads) acc += fp_term(k, fp_word_bytes(p, k, n));
  }
  if (n % 4 != 0 && threadIdx.x == 0) acc += fp_term(full, fp_word_bytes(p, full, n));
  const unsigned long long sum = block_sum(acc, scratch);
  if (threadIdx.x == 0) out[b] = fp_finish(sum, n);
}

}  // namespace
}  // namespace embedkit

extern "C" {

int ek_abi_version(void) { return EK_ABI_VERSION; }
const char *ek_error_string(int code) { return embedkit::error_string(code); }
const char *ek_cuda_last_error(void) { return embedkit::g_cuda_error.text; }

int ek_sequence_fingerprint_cuda(const void *values, int64_t total_rows, int64_t row_bytes,
                                 const int32_t *cu_seqlens, int64_t batch, int64_t *out, cudaStream_t stream) {
  using namespace embedkit;
  return guarded("ek_sequence_fingerprint_cuda", [&]() -> int {
    EK_REQUIRE(g_cuda_error, batch >= 0 && total_rows >= 0 && row_bytes >= 0, "negative size");
    EK_REQUIRE(g_cuda_error, batch <= INT32_MAX, "batch %lld exceeds the grid limit", (long long)batch);
    EK_REQUIRE(g_cuda_error, cu_seqlens && (out || batch == 0), "null cu_seqlens or out");
    EK_REQUIRE(g_cuda_error, values || total_rows * row_bytes == 0, "null values");
    if (batch == 0) return EK_OK;
    fingerprint_kernel<<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(
        static_cast<const uint8_t *>(values), total_rows, row_bytes, cu_seqlens, out);
    return launch_status("sequence_fingerprint kernel launch");
  });
}

}  // extern "C"
