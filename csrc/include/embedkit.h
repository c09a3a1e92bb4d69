/* embedkit native backend: the C ABI of the csrc libraries.
 *
 * Two shared libraries implement it:
 *   libembedkit_cpu   the C++ CPU functions  (ek_*_cpu)   -- always built
 *   libembedkit_cuda  the CUDA functions     (ek_*_cuda)  -- built when a CUDA compiler is found
 * Every CUDA function has a CPU twin with the same arguments minus the trailing cudaStream_t; some
 * CPU functions have no CUDA twin (masked_mean: on a GPU, embedkit's one kernel is Triton's).
 * No torch headers: callers pass raw pointers and sizes (Python: embedkit/ops/_native.py, ctypes).
 *
 * Conventions
 *   - Packed ("varlen") layout: the rows of all sequences are concatenated; cu_seqlens is int32
 *     [batch + 1], cu_seqlens[0] == 0, non-decreasing, cu_seqlens[batch] == total_rows.
 *   - A "row" is one token: row_bytes bytes (the raw bytes of a [T, ...] tensor's row).
 *   - Every pointer is a host pointer (CPU library) or a device pointer (CUDA library); tensors
 *     are contiguous unless a stride argument says otherwise.
 *   - Functions return an EK_* status code (0 = success); no C++ exception ever crosses this ABI
 *     (each is caught and returned as EK_ERR_OUT_OF_MEMORY / EK_ERR_INTERNAL). The CPU functions are synchronous and
 *     check cu_seqlens contents; the CUDA functions are asynchronous on `stream`, check only what
 *     needs no device sync, and report launch errors (later execution errors surface at the next
 *     synchronizing CUDA call). The CUDA kernels clamp out-of-range cu_seqlens instead of reading
 *     or writing out of bounds.
 *   - ek_error_string(code) names a code; ek_cpu_last_error() / ek_cuda_last_error() give the
 *     detail of the last failure in the calling thread of that library.
 */
#ifndef EMBEDKIT_H_
#define EMBEDKIT_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The same opaque type as the CUDA runtime's (a repeated identical typedef is legal C11/C++). */
struct CUstream_st;
typedef struct CUstream_st *cudaStream_t;

#if defined(_WIN32)
#define EK_API __declspec(dllexport)
#else
#define EK_API __attribute__((visibility("default")))
#endif

/* Bumped whenever a signature below changes or a function is removed; the Python loader refuses a
 * library built from another version of this header (a stale build would otherwise be called with
 * wrong arguments, or miss a symbol). 3: ek_masked_mean_cuda removed. */
#define EK_ABI_VERSION 3

/* Status codes. */
#define EK_OK 0
#define EK_ERR_INVALID_ARGUMENT 1 /* a null pointer with a nonzero size, a negative size, ...     */
#define EK_ERR_UNSUPPORTED_DTYPE 2 /* a dtype code outside EK_DTYPE_*                          */
#define EK_ERR_BAD_CU_SEQLENS 3    /* cu_seqlens not 0-based, decreasing or past total_rows      */
#define EK_ERR_CUDA 4              /* a CUDA runtime error (launch failure, no kernel image, ...) */
#define EK_ERR_OUT_OF_MEMORY 5     /* host memory exhausted (std::bad_alloc inside the library)   */
#define EK_ERR_INTERNAL 6          /* any other C++ exception, caught at the C boundary           */

/* Floating dtypes of masked_mean. */
#define EK_DTYPE_FLOAT32 0
#define EK_DTYPE_FLOAT16 1
#define EK_DTYPE_BFLOAT16 2

EK_API int ek_abi_version(void);
EK_API const char *ek_error_string(int code);
EK_API const char *ek_cpu_last_error(void);
EK_API const char *ek_cuda_last_error(void);
/* CPU library only: how many threads a large call may split its batch over (0 = every CPU this
 * process may run on; embedkit passes torch.get_num_threads()). */
EK_API void ek_cpu_set_num_threads(int num_threads);

/* ---- sequence_fingerprint -------------------------------------------------------------------
 * out[b] = fingerprint of the byte string of sequence b: the n = (cu[b+1] - cu[b]) * row_bytes
 * bytes of its rows, in order. Definition (reproduced exactly by the torch reference):
 *   w_k    = little-endian uint32 of bytes [4k, 4k + 4) (zero-padded past n), k < ceil(n / 4)
 *   term_k = fmix64(((uint64)k << 32 | w_k) ^ EK_FP_SEED)          (injective in (k, w_k))
 *   S      = sum_k term_k  mod 2^64                                 (any summation order)
 *   out[b] = (int64) fmix64(S + fmix64((uint64)n ^ EK_FP_LEN_SEED))
 * fmix64 is MurmurHash3's 64-bit finalizer (a bijection). Order is kept by keying each term with
 * its position k; the combine is a sum mod 2^64, so a parallel reduction in any order gives the
 * same bits on every device. Not cryptographic. Sequences up to 16 GiB (k < 2^32). */
EK_API int ek_sequence_fingerprint_cpu(const void *values, int64_t total_rows, int64_t row_bytes,
                                       const int32_t *cu_seqlens, int64_t batch, int64_t *out);
EK_API int ek_sequence_fingerprint_cuda(const void *values, int64_t total_rows, int64_t row_bytes,
                                        const int32_t *cu_seqlens, int64_t batch, int64_t *out,
                                        cudaStream_t stream);

/* ---- pack / unpack --------------------------------------------------------------------------
 * padded [batch, padded_len, row_bytes]  <->  packed [total_rows, row_bytes].
 * mask (uint8/bool [batch, padded_len], 1 = token) says which padded positions hold tokens; the
 * tokens of row b, in order, are packed rows cu[b] .. cu[b+1]-1. mask == NULL means the
 * right-padded layout: token j of sequence b sits at position j.
 * pack:   packed[cu[b] + j] = padded[b, position of token j]
 * unpack: padded[b, l] = its token's packed row, or fill (row_bytes bytes) where mask is 0. */
EK_API int ek_pack_cpu(const void *padded, const uint8_t *mask, const int32_t *cu_seqlens, int64_t batch,
                       int64_t padded_len, int64_t row_bytes, int64_t total_rows, void *packed);
EK_API int ek_pack_cuda(const void *padded, const uint8_t *mask, const int32_t *cu_seqlens, int64_t batch,
                        int64_t padded_len, int64_t row_bytes, int64_t total_rows, void *packed,
                        cudaStream_t stream);
EK_API int ek_unpack_cpu(const void *packed, const uint8_t *mask, const int32_t *cu_seqlens, int64_t batch,
                         int64_t padded_len, int64_t row_bytes, int64_t total_rows, const void *fill,
                         void *padded);
EK_API int ek_unpack_cuda(const void *packed, const uint8_t *mask, const int32_t *cu_seqlens, int64_t batch,
                          int64_t padded_len, int64_t row_bytes, int64_t total_rows, const void *fill,
                          void *padded, cudaStream_t stream);

/* ---- masked_mean (CPU only) -----------------------------------------------------------------
 * hidden [total_rows, width] of `dtype` (row stride stride_rows elements, unit column stride);
 * pool_mask uint8/bool [total_rows] or NULL (= every token pooled).
 * out[b, :] = sum of the pooled rows of sequence b / their count, accumulated in fp32, written in
 * `dtype` ([batch, width], contiguous); counts[b] = that count, counted in integers and written
 * as fp32. A sequence with no pooled row gives 0/0 = NaN (the Python layer rejects it first). */
EK_API int ek_masked_mean_cpu(const void *hidden, int32_t dtype, int64_t total_rows, int64_t width,
                              int64_t stride_rows, const int32_t *cu_seqlens, const uint8_t *pool_mask,
                              int64_t batch, void *out, float *counts);

#ifdef __cplusplus
}
#endif

#endif /* EMBEDKIT_H_ */
