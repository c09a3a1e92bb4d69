// Shared by the CPU and CUDA sources: the fingerprint hash and argument checks.
#pragma once

#include <stdint.h>

#include <cstdarg>
#include <cstdio>
#include <cstring>

#include "embedkit.h"

#if defined(__CUDACC__)
#define EK_HD __host__ __device__ __forceinline__
#else
#define EK_HD inline
#endif

namespace embedkit {

// Fingerprint constants (see embedkit.h). Mirrored in embedkit/ops/reference.py.
constexpr uint64_t kFpSeed = 0x9E3779B97F4A7C15ull;
constexpr uint64_t kFpLenSeed = 0xD6E8FEB86659FD93ull;

// MurmurHash3's 64-bit finalizer: a bijection on uint64 with full avalanche.
EK_HD uint64_t fmix64(uint64_t x) {
  x ^= x >> 33;
  x *= 0xFF51AFD7ED558CCDull;
  x ^= x >> 33;
  x *= 0xC4CEB9FE1A85EC53ull;
  x ^= x >> 33;
  return x;
}

EK_HD uint64_t fp_term(uint64_t k, uint32_t word) { return fmix64(((k << 32) | word) ^ kFpSeed); }

EK_HD int64_t fp_finish(uint64_t sum, uint64_t nbytes) {
  return static_cast<int64_t>(fmix64(sum + fmix64(nbytes ^ kFpLenSeed)));
}

// Little-endian word k of the n-byte string p, zero-padded past n (byte by byte: any alignment).
EK_HD uint32_t fp_word_bytes(const uint8_t *p, uint64_t k, uint64_t n) {
  uint32_t w = 0;
  for (int j = 0; j < 4; ++j) {
    uint64_t i = 4 * k + j;
    if (i < n) w |= static_cast<uint32_t>(p[i]) << (8 * j);
  }
  return w;
}

// Per-library "last error" detail, thread-local. Each library defines its own storage.
struct ErrorSlot {
  char text[512];
};

inline int fail(ErrorSlot &slot, int code, const char *fmt, ...) {
  va_list args;
  va_start(args, fmt);
  vsnprintf(slot.text, sizeof(slot.text), fmt, args);
  va_end(args);
  return code;
}

inline const char *error_string(int code) {
  switch (code) {
    case EK_OK: return "success";
    case EK_ERR_INVALID_ARGUMENT: return "invalid argument";
    case EK_ERR_UNSUPPORTED_DTYPE: return "unsupported dtype";
    case EK_ERR_BAD_CU_SEQLENS: return "invalid cu_seqlens";
    case EK_ERR_CUDA: return "CUDA error";
    case EK_ERR_OUT_OF_MEMORY: return "out of host memory";
    case EK_ERR_INTERNAL: return "internal error (C++ exception)";
    default: return "unknown embedkit error code";
  }
}

// Checks shared by both twins (no pointer is dereferenced here).
#define EK_REQUIRE(slot, cond, ...)                                \
  do {                                                             \
    if (!(cond)) return ::embedkit::fail(slot, EK_ERR_INVALID_ARGUMENT, __VA_ARGS__); \
  } while (0)

}  // namespace embedkit
