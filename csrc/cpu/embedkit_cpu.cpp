// The C++ CPU twins of the CUDA functions (libembedkit_cpu). Synchronous and strict: unlike the
// CUDA kernels they check cu_seqlens and the mask against each other, since reading host memory
// costs nothing extra here. Sequences are independent, so large calls split the batch over a few
// threads (at least 8 MiB of data each, at most torch.get_num_threads()). No C++ exception leaves
// this library: every extern "C" function and every worker thread catches them and returns a status
// code (EK_ERR_OUT_OF_MEMORY for std::bad_alloc, EK_ERR_INTERNAL for anything else).
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include "../common.h"

using embedkit::fail;

namespace {

thread_local embedkit::ErrorSlot g_error = {{0}};
std::atomic<int> g_num_threads{0};  // 0 = every usable CPU

// ---- fp16 / bf16 <-> fp32 (round to nearest even), after Maratyszcza's FP16 library -----------
inline uint32_t bits_of(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float float_of(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline float half_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = float_of((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = float_of((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t result = sign | (two_w < (1u << 27) ? bits_of(denormalized) : bits_of(normalized));
  return float_of(result);
}

inline uint16_t float_to_half(float f) {
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = bits_of(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = float_of((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = bits_of(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

inline float bf16_to_float(uint16_t h) { return float_of(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  const uint32_t u = bits_of(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

struct F32 { using T = float; static float load(T x) { return x; } static T store(float x) { return x; } };
struct F16 { using T = uint16_t; static float load(T x) { return half_to_float(x); } static T store(float x) { return float_to_half(x); } };
struct BF16 { using T = uint16_t; static float load(T x) { return bf16_to_float(x); } static T store(float x) { return float_to_bf16(x); } };

int usable_cpus() {
  int cpus = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) cpus = std::max(1, CPU_COUNT(&set));
  const int cap = g_num_threads.load(std::memory_order_relaxed);
  return cap > 0 ? std::min(cpus, cap) : cpus;
}

// f() with every C++ exception turned into a status code and a message in this thread's slot:
// an exception crossing the C ABI (or leaving a std::thread) would terminate the process.
template <class F>
int guarded(const char *what, F &&f) noexcept {
  try {
    return f();
  } catch (const std::bad_alloc &) {
    return fail(g_error, EK_ERR_OUT_OF_MEMORY, "%s: out of host memory (std::bad_alloc)", what);
  } catch (const std::exception &e) {
    return fail(g_error, EK_ERR_INTERNAL, "%s: C++ exception: %s", what, e.what());
  } catch (...) {
    return fail(g_error, EK_ERR_INTERNAL, "%s: unknown C++ exception", what);
  }
}

// Runs body(b0, b1) over [0, batch) split into contiguous ranges, one per thread; returns the
// first nonzero status, whose message is moved into the calling thread's error slot. Ranges whose
// thread cannot be started (std::system_error) run on the calling thread instead.
template <class Body>
int parallel_over_sequences(int64_t batch, int64_t work_bytes, Body body) {
  const int64_t by_work = std::max<int64_t>(1, work_bytes >> 23);  // >= 8 MiB per thread
  const int64_t n = std::min<int64_t>({static_cast<int64_t>(usable_cpus()), batch, by_work});
  if (n <= 1) return body(int64_t(0), batch);
  std::vector<int> status(static_cast<size_t>(n), EK_OK);
  std::vector<std::string> message(static_cast<size_t>(n));
  auto run = [&](int64_t i) {
    status[i] = guarded("worker", [&] { return body(batch * i / n, batch * (i + 1) / n); });
    if (status[i] != EK_OK) {
      try {
        message[i] = g_error.text;  // g_error is this thread's slot
      } catch (...) {  // (a string copy can throw bad_alloc too; the status code remains)
      }
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(n));
  int64_t started = 0;
  for (; started < n; ++started) {
    try {
      threads.emplace_back(run, started);
    } catch (...) {  // std::system_error: no more threads; the rest runs here
      break;
    }
  }
  for (int64_t i = started; i < n; ++i) run(i);
  for (auto &t : threads) t.join();
  for (int64_t i = 0; i < n; ++i)
    if (status[i] != EK_OK) return fail(g_error, status[i], "%s", message[i].c_str());
  return EK_OK;
}

// memcpy with a size-0 guard: memcpy(nullptr, nullptr, 0) is undefined behaviour (UBSan flags it),
// and empty tensors hand null pointers.
inline void copy_bytes(void *dst, const void *src, int64_t n) {
  if (n > 0) std::memcpy(dst, src, static_cast<size_t>(n));
}

int check_cu(const int32_t *cu, int64_t batch, int64_t total_rows) {
  if (cu[0] != 0) return fail(g_error, EK_ERR_BAD_CU_SEQLENS, "cu_seqlens[0] must be 0, got %d", cu[0]);
  for (int64_t b = 0; b < batch; ++b) {
    if (cu[b + 1] < cu[b])
      return fail(g_error, EK_ERR_BAD_CU_SEQLENS, "cu_seqlens must be non-decreasing: cu_seqlens[%lld] = %d < "
                  "cu_seqlens[%lld] = %d", (long long)(b + 1), cu[b + 1], (long long)b, cu[b]);
  }
  if (cu[batch] != total_rows)
    return fail(g_error, EK_ERR_BAD_CU_SEQLENS, "cu_seqlens[-1] = %d must equal total_rows = %lld", cu[batch],
                (long long)total_rows);
  return EK_OK;
}

// Rows per first-level fp32 partial sum: two levels keep the rounding error near
// (chunk + length / chunk) ulps instead of length ulps (one fp32 sum of 20M rows of 1s and 2s
// stalls at 2^25). Counts are integers (an fp32 count stalls at 2^24).
constexpr int64_t kSumChunk = 4096;

template <class D>
int masked_mean_rows(const void *hidden, int64_t width, int64_t stride_rows, const int32_t *cu,
                     const uint8_t *mask, int64_t b0, int64_t b1, void *out, float *counts) {
  using T = typename D::T;
  const T *x = static_cast<const T *>(hidden);
  T *y = static_cast<T *>(out);
  std::vector<float> acc(static_cast<size_t>(width)), part(static_cast<size_t>(width));
  for (int64_t b = b0; b < b1; ++b) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    int64_t count = 0;
    for (int64_t t0 = cu[b]; t0 < cu[b + 1]; t0 += kSumChunk) {
      const int64_t t1 = std::min<int64_t>(t0 + kSumChunk, cu[b + 1]);
      std::fill(part.begin(), part.end(), 0.0f);
      for (int64_t t = t0; t < t1; ++t) {
        if (mask != nullptr && !mask[t]) continue;
        const T *row = x + t * stride_rows;
        for (int64_t h = 0; h < width; ++h) part[h] += D::load(row[h]);
        ++count;
      }
      for (int64_t h = 0; h < width; ++h) acc[h] += part[h];
    }
    const float n = static_cast<float>(count);
    for (int64_t h = 0; h < width; ++h) y[b * width + h] = D::store(acc[h] / n);
    counts[b] = n;
  }
  return EK_OK;
}

}  // namespace

extern "C" {

int ek_abi_version(void) { return EK_ABI_VERSION; }
const char *ek_error_string(int code) { return embedkit::error_string(code); }
const char *ek_cpu_last_error(void) { return g_error.text; }
void ek_cpu_set_num_threads(int num_threads) { g_num_threads.store(num_threads > 0 ? num_threads : 0); }

int ek_sequence_fingerprint_cpu(const void *values, int64_t total_rows, int64_t row_bytes,
                                const int32_t *cu_seqlens, int64_t batch, int64_t *out) {
  return guarded("ek_sequence_fingerprint_cpu", [&]() -> int {
    EK_REQUIRE(g_error, batch >= 0 && total_rows >= 0 && row_bytes >= 0, "negative size");
    EK_REQUIRE(g_error, cu_seqlens && (out || batch == 0), "null cu_seqlens or out");
    EK_REQUIRE(g_error, values || total_rows * row_bytes == 0, "null values");
    if (int rc = check_cu(cu_seqlens, batch, total_rows)) return rc;
    const uint8_t *bytes = static_cast<const uint8_t *>(values);
    return parallel_over_sequences(batch, total_rows * row_bytes, [=](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const uint8_t *p = bytes + static_cast<int64_t>(cu_seqlens[b]) * row_bytes;
        const uint64_t n = static_cast<uint64_t>(cu_seqlens[b + 1] - cu_seqlens[b]) * row_bytes;
        const uint64_t full = n / 4;
        uint64_t sum = 0;
        for (uint64_t k = 0; k < full; ++k) {
          uint32_t w;
          std::memcpy(&w, p + 4 * k, 4);  // little-endian hosts (x86-64, aarch64)
          sum += embedkit::fp_term(k, w);
        }
        if (n % 4) sum += embedkit::fp_term(full, embedkit::fp_word_bytes(p, full, n));
        out[b] = embedkit::fp_finish(sum, n);
      }
      return EK_OK;
    });
  });
}

int ek_pack_cpu(const void *padded, const uint8_t *mask, const int32_t *cu_seqlens, int64_t batch,
                int64_t padded_len, int64_t row_bytes, int64_t total_rows, void *packed) {
  return guarded("ek_pack_cpu", [&]() -> int {
    EK_REQUIRE(g_error, batch >= 0 && padded_len >= 0 && row_bytes >= 0 && total_rows >= 0, "negative size");
    EK_REQUIRE(g_error, cu_seqlens != nullptr, "null cu_seqlens");
    EK_REQUIRE(g_error, padded || batch * padded_len * row_bytes == 0, "null padded");
    EK_REQUIRE(g_error, packed || total_rows * row_bytes == 0, "null packed");
    if (int rc = check_cu(cu_seqlens, batch, total_rows)) return rc;
    const uint8_t *src = static_cast<const uint8_t *>(padded);
    uint8_t *dst = static_cast<uint8_t *>(packed);
    return parallel_over_sequences(batch, 2 * total_rows * row_bytes, [=](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t len = cu_seqlens[b + 1] - cu_seqlens[b];
        const uint8_t *row_mask = mask ? mask + b * padded_len : nullptr;
        int64_t j = 0;
        for (int64_t l = 0; l < padded_len && (row_mask || j < len); ++l) {
          if (row_mask && !row_mask[l]) continue;
          if (j >= len)
            return fail(g_error, EK_ERR_INVALID_ARGUMENT, "attention mask row %lld has more tokens than "
                        "cu_seqlens gives sequence %lld (%lld)", (long long)b, (long long)b, (long long)len);
          copy_bytes(dst + (cu_seqlens[b] + j) * row_bytes, src + (b * padded_len + l) * row_bytes, row_bytes);
          ++j;
        }
        if (j != len)
          return fail(g_error, EK_ERR_INVALID_ARGUMENT, "sequence %lld has %lld tokens in cu_seqlens but %lld "
                      "positions in the padded layout", (long long)b, (long long)len, (long long)j);
      }
      return EK_OK;
    });
  });
}

int ek_unpack_cpu(const void *packed, const uint8_t *mask, const int32_t *cu_seqlens, int64_t batch,
                  int64_t padded_len, int64_t row_bytes, int64_t total_rows, const void *fill, void *padded) {
  return guarded("ek_unpack_cpu", [&]() -> int {
    EK_REQUIRE(g_error, batch >= 0 && padded_len >= 0 && row_bytes >= 0 && total_rows >= 0, "negative size");
    EK_REQUIRE(g_error, cu_seqlens != nullptr, "null cu_seqlens");
    EK_REQUIRE(g_error, packed || total_rows * row_bytes == 0, "null packed");
    EK_REQUIRE(g_error, (padded && fill) || batch * padded_len * row_bytes == 0, "null padded or fill");
    if (int rc = check_cu(cu_seqlens, batch, total_rows)) return rc;
    const uint8_t *src = static_cast<const uint8_t *>(packed);
    uint8_t *dst = static_cast<uint8_t *>(padded);
    return parallel_over_sequences(batch, (total_rows + batch * padded_len) * row_bytes, [=](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t len = cu_seqlens[b + 1] - cu_seqlens[b];
        const uint8_t *row_mask = mask ? mask + b * padded_len : nullptr;
        int64_t j = 0;
        for (int64_t l = 0; l < padded_len; ++l) {
          uint8_t *out_row = dst + (b * padded_len + l) * row_bytes;
          const bool token = row_mask ? row_mask[l] != 0 : l < len;
          if (token && j >= len)
            return fail(g_error, EK_ERR_INVALID_ARGUMENT, "attention mask row %lld has more tokens than "
                        "cu_seqlens gives sequence %lld (%lld)", (long long)b, (long long)b, (long long)len);
          copy_bytes(out_row, token ? src + (cu_seqlens[b] + j) * row_bytes : fill, row_bytes);
          j += token;
        }
        if (j != len)
          return fail(g_error, EK_ERR_INVALID_ARGUMENT, "sequence %lld has %lld tokens in cu_seqlens but %lld "
                      "positions in the padded layout", (long long)b, (long long)len, (long long)j);
      }
      return EK_OK;
    });
  });
}

int ek_masked_mean_cpu(const void *hidden, int32_t dtype, int64_t total_rows, int64_t width,
                       int64_t stride_rows, const int32_t *cu_seqlens, const uint8_t *pool_mask,
                       int64_t batch, void *out, float *counts) {
  return guarded("ek_masked_mean_cpu", [&]() -> int {
    EK_REQUIRE(g_error, batch >= 0 && total_rows >= 0 && width >= 0, "negative size");
    EK_REQUIRE(g_error, stride_rows >= width || total_rows <= 1, "stride_rows (%lld) < width (%lld)",
               (long long)stride_rows, (long long)width);
    EK_REQUIRE(g_error, cu_seqlens && (counts || batch == 0), "null cu_seqlens or counts");
    EK_REQUIRE(g_error, out || batch * width == 0, "null out");
    EK_REQUIRE(g_error, hidden || total_rows * width == 0, "null hidden");
    if (int rc = check_cu(cu_seqlens, batch, total_rows)) return rc;
    const int64_t bytes = total_rows * width * (dtype == EK_DTYPE_FLOAT32 ? 4 : 2);
    switch (dtype) {
      case EK_DTYPE_FLOAT32:
        return parallel_over_sequences(batch, bytes, [=](int64_t b0, int64_t b1) {
          return masked_mean_rows<F32>(hidden, width, stride_rows, cu_seqlens, pool_mask, b0, b1, out, counts);
        });
      case EK_DTYPE_FLOAT16:
        return parallel_over_sequences(batch, bytes, [=](int64_t b0, int64_t b1) {
          return masked_mean_rows<F16>(hidden, width, stride_rows, cu_seqlens, pool_mask, b0, b1, out, counts);
        });
      case EK_DTYPE_BFLOAT16:
        return parallel_over_sequences(batch, bytes, [=](int64_t b0, int64_t b1) {
          return masked_mean_rows<BF16>(hidden, width, stride_rows, cu_seqlens, pool_mask, b0, b1, out, counts);
        });
      default:
        return fail(g_error, EK_ERR_UNSUPPORTED_DTYPE, "dtype code %d is not one of EK_DTYPE_*", dtype);
    }
  });
}

}  // extern "C"
