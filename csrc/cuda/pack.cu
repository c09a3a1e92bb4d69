// pack / unpack between padded [B, L, row] and packed [T, row].
//
// Grid: one block per (sequence, tile of padded positions); tiles are sized so each block moves
// ~64 KiB, which gives thousands of blocks for big rows (hidden states) and few, long ones for
// token ids. A block first counts the mask's tokens before its tile (its output offset within the
// sequence), then walks the tile 256 positions at a time: a block scan of the mask gives each
// token its packed row, and the block copies the rows cooperatively in 16-, 4- or 1-byte units
// (the widest the pointers and row size allow). No nonzero(), no index tensor, no host sync.
#include <cstdint>

#include "cuda_common.cuh"

namespace embedkit {
namespace {

template <bool UNPACK, typename V>
__global__ void __launch_bounds__(kThreads)
pack_kernel(const uint8_t *__restrict__ src, const uint8_t *__restrict__ mask, const int32_t *__restrict__ cu_seqlens,
            int64_t padded_len, int64_t row_bytes, int64_t total_rows, int64_t tile_rows, int64_t tiles_per_seq,
            const uint8_t *__restrict__ fill, uint8_t *__restrict__ dst) {
  __shared__ int64_t rows[kThreads];  // pack: padded position of each token; unpack: packed row or -1
  __shared__ int scratch[kWarps];
  const int64_t b = blockIdx.x / tiles_per_seq;
  const int64_t l0 = (blockIdx.x % tiles_per_seq) * tile_rows;
  const int64_t l1 = min(padded_len, l0 + tile_rows);
  const int64_t start = clamp_row(cu_seqlens[b], 0, total_rows);
  const int64_t len = clamp_row(cu_seqlens[b + 1], start, total_rows) - start;
  const uint8_t *row_mask = mask ? mask + b * padded_len : nullptr;
  int64_t before;  // tokens of sequence b at positions < the current chunk
  if (row_mask) {
    int c = 0;
    for (int64_t l = threadIdx.x; l < l0; l += kThreads) c += row_mask[l] != 0;
    before = block_sum(c, scratch);
  } else {
    before = l0;
  }
  const unsigned nvec = static_cast<unsigned>(row_bytes / sizeof(V));
  for (int64_t c0 = l0; c0 < l1; c0 += kThreads) {
    if (!UNPACK && before >= len) break;  // the rest of this tile holds padding only
    const int64_t l = c0 + threadIdx.x;
    const bool in_tile = l < l1;
    const int token = in_tile && (row_mask ? row_mask[l] != 0 : l < len);
    int chunk_tokens;
    const int rank = block_inclusive_scan(token, &chunk_tokens, scratch);  // 1-based among tokens
    const int64_t j = before + rank - 1;                                  // token index in sequence
    unsigned items;
    if (!UNPACK) {
      if (token && j < len) rows[rank - 1] = l;
      const int64_t room = len - before;
      items = static_cast<unsigned>(room < chunk_tokens ? (room > 0 ? room : 0) : chunk_tokens);
    } else {
      if (in_tile) rows[threadIdx.x] = token && j < len ? start + j : -1;
      items = static_cast<unsigned>(l1 - c0 < kThreads ? l1 - c0 : int64_t(kThreads));
    }
    __syncthreads();
#pragma unroll 4
    for (unsigned u = threadIdx.x; u < items * nvec; u += kThreads) {
      const unsigned r = u / nvec, v = u - r * nvec;
      if (!UNPACK) {
        const V *s = reinterpret_cast<const V *>(src + (b * padded_len + rows[r]) * row_bytes);
        V *d = reinterpret_cast<V *>(dst + (start + before + r) * row_bytes);
        d[v] = s[v];
      } else {
        const int64_t packed_row = rows[r];
        const V *s = packed_row >= 0 ? reinterpret_cast<const V *>(src + packed_row * row_bytes)
                                     : reinterpret_cast<const V *>(fill);
        V *d = reinterpret_cast<V *>(dst + (b * padded_len + c0 + r) * row_bytes);
        d[v] = s[v];
      }
    }
    before += chunk_tokens;
    __syncthreads();  // rows[] is rewritten by the next chunk
  }
}

template <bool UNPACK>
int launch(const void *src, const uint8_t *mask, const int32_t *cu_seqlens, int64_t batch, int64_t padded_len,
           int64_t row_bytes, int64_t total_rows, const void *fill, void *dst, cudaStream_t stream) {
  const char *name = UNPACK ? "unpack" : "pack";
  EK_REQUIRE(g_cuda_error, batch >= 0 && padded_len >= 0 && row_bytes >= 0 && total_rows >= 0, "negative size");
  EK_REQUIRE(g_cuda_error, row_bytes <= (int64_t(1) << 23), "%s: rows of %lld bytes exceed the 8 MiB limit",
             name, (long long)row_bytes);
  EK_REQUIRE(g_cuda_error, cu_seqlens != nullptr, "null cu_seqlens");
  if (batch == 0 || padded_len == 0 || row_bytes == 0) return EK_OK;
  // Here batch * padded_len * row_bytes > 0: the padded side and fill exist; packed may be empty.
  const void *padded_side = UNPACK ? dst : src, *packed_side = UNPACK ? src : dst;
  EK_REQUIRE(g_cuda_error, padded_side && (!UNPACK || fill), "null padded or fill");
  EK_REQUIRE(g_cuda_error, packed_side || total_rows == 0, "null packed");
  int64_t tile_rows = (int64_t(1) << 16) / row_bytes;
  tile_rows = tile_rows < 32 ? 32 : (tile_rows > 8192 ? 8192 : tile_rows);
  const int64_t tiles_per_seq = (padded_len + tile_rows - 1) / tile_rows;
  EK_REQUIRE(g_cuda_error, batch * tiles_per_seq <= INT32_MAX, "%s: batch too large for one grid", name);
  const uintptr_t align = reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst) |
                          reinterpret_cast<uintptr_t>(fill) | static_cast<uintptr_t>(row_bytes);
  const dim3 grid(static_cast<unsigned>(batch * tiles_per_seq));
  const uint8_t *s = static_cast<const uint8_t *>(src), *f = static_cast<const uint8_t *>(fill);
  uint8_t *d = static_cast<uint8_t *>(dst);
  if (align % 16 == 0)
    pack_kernel<UNPACK, uint4><<<grid, kThreads, 0, stream>>>(s, mask, cu_seqlens, padded_len, row_bytes,
                                                              total_rows, tile_rows, tiles_per_seq, f, d);
  else if (align % 4 == 0)
    pack_kernel<UNPACK, uint32_t><<<grid, kThreads, 0, stream>>>(s, mask, cu_seqlens, padded_len, row_bytes,
                                                                 total_rows, tile_rows, tiles_per_seq, f, d);
  else
    pack_kernel<UNPACK, uint8_t><<<grid, kThreads, 0, stream>>>(s, mask, cu_seqlens, padded_len, row_bytes,
                                                                total_rows, tile_rows, tiles_per_seq, f, d);
  return launch_status(UNPACK ? "unpack kernel launch" : "pack kernel launch");
}

}  // namespace
}  // namespace embedkit

extern "C" {

int ek_pack_cuda(const void *padded, const uint8_t *mask, const int32_t *cu_seqlens, int64_t batch,
                 int64_t padded_len, int64_t row_bytes, int64_t total_rows, void *packed, cudaStream_t stream) {
  return embedkit::guarded("ek_pack_cuda", [&] {
    return embedkit::launch<false>(padded, mask, cu_seqlens, batch, padded_len, row_bytes, total_rows, nullptr,
                                   packed, stream);
  });
}

int ek_unpack_cuda(const void *packed, const uint8_t *mask, const int32_t *cu_seqlens, int64_t batch,
                   int64_t padded_len, int64_t row_bytes, int64_t total_rows, const void *fill, void *padded,
                   cudaStream_t stream) {
  return embedkit::guarded("ek_unpack_cuda", [&] {
    return embedkit::launch<true>(packed, mask, cu_seqlens, batch, padded_len, row_bytes, total_rows, fill, padded,
                                  stream);
  });
}

}  // extern "C"
