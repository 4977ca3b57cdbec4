// XLA FFI CPU kernel: y[M, N] = x[M, K] @ w[K, N] for bf16 weights and few rows (decode).
//
// XLA:CPU has no fast bf16 matrix-vector product: it runs bf16 dots through a path about 8x
// slower than its f32 one, so bf16 weights decoded no faster than f32 ones although they are
// half the bytes. Decode with few rows is bound by streaming the weights once, so this
// kernel reads each weight row once, widens it to f32 (a 16-bit shift), and accumulates in
// f32; the work is split over contiguous row slabs of w (sequential reads) on XLA's intra-op
// thread pool, each worker summing into its own [M, N] f32 buffer, reduced at the end.
// x and y are f32 or bf16 (the same); accumulation is always f32, rounding to nearest even.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SAFEVLM_TARGET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SAFEVLM_TARGET_CLONES
#endif

namespace {

constexpr int64_t kRowBlock = 4;    // weight rows folded into one pass over the accumulator
constexpr int64_t kColBlock = 512;  // columns widened to f32 at a time (4 x 2 KiB in L1)
constexpr int64_t kMinParallelBytes = 1 << 18;  // below this, one thread is faster

inline float Bf16ToF32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint16_t F32ToBf16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// acc[m, n] += sum_{k0 <= k < k1} x[m, k] * w[k, n]; x f32 [M, K], w bf16 [K, N], acc f32 [M, N].
// Portable version (auto-vectorized): widens kRowBlock rows into an f32 tile, then adds.
SAFEVLM_TARGET_CLONES
void AccumulateRowsPortable(const float* __restrict x, const uint16_t* __restrict w,
                            float* __restrict acc, int64_t M, int64_t K, int64_t N, int64_t k0,
                            int64_t k1) {
  alignas(64) float tile[kRowBlock][kColBlock];
  for (int64_t k = k0; k < k1; k += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, k1 - k);
    for (int64_t n0 = 0; n0 < N; n0 += kColBlock) {
      const int64_t cols = std::min(kColBlock, N - n0);
      for (int64_t r = 0; r < kRowBlock; ++r) {
        float* t = tile[r];
        if (r < rows) {
          const uint16_t* wr = w + (k + r) * N + n0;
          for (int64_t j = 0; j < cols; ++j) t[j] = Bf16ToF32(wr[j]);
        } else {
          for (int64_t j = 0; j < cols; ++j) t[j] = 0.0f;
        }
      }
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = x + m * K + k;
        const float a0 = xm[0];
        const float a1 = rows > 1 ? xm[1] : 0.0f;
        const float a2 = rows > 2 ? xm[2] : 0.0f;
        const float a3 = rows > 3 ? xm[3] : 0.0f;
        float* am = acc + m * N + n0;
        for (int64_t j = 0; j < cols; ++j) {
          am[j] += a0 * tile[0][j] + a1 * tile[1][j] + a2 * tile[2][j] + a3 * tile[3][j];
        }
      }
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define SAFEVLM_AVX512 1
// The same with AVX-512: kRowBlock rows widened in registers (16 columns at a time, the
// last partial group masked), each row's x broadcast straight into the FMA, and the next
// row block prefetched (the hardware prefetcher alone reached ~75% of the bandwidth).
__attribute__((target("avx512f,avx512bw,avx512vl")))
void AccumulateRowsAvx512(const float* __restrict x, const uint16_t* __restrict w,
                          float* __restrict acc, int64_t M, int64_t K, int64_t N, int64_t k0,
                          int64_t k1) {
  for (int64_t k = k0; k < k1; k += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, k1 - k);
    for (int64_t n = 0; n < N; n += 16) {
      const __mmask16 mask = N - n >= 16 ? __mmask16(0xffff) : __mmask16((1u << (N - n)) - 1);
      __m512 v[kRowBlock];
      for (int64_t r = 0; r < kRowBlock; ++r) {
        const __m256i h = r < rows ? _mm256_maskz_loadu_epi16(mask, w + (k + r) * N + n)
                                   : _mm256_setzero_si256();
        v[r] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      }
      if (k + kRowBlock < k1 && n % 32 == 0) {  // next block's cache line: 1.3x the bandwidth
        for (int64_t r = 0; r < kRowBlock; ++r) {
          _mm_prefetch(reinterpret_cast<const char*>(w + (k + kRowBlock + r) * N + n), _MM_HINT_T0);
        }
      }
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = x + m * K + k;
        float* am = acc + m * N + n;
        __m512 a = _mm512_maskz_loadu_ps(mask, am);
        for (int64_t r = 0; r < rows; ++r) a = _mm512_fmadd_ps(_mm512_set1_ps(xm[r]), v[r], a);
        _mm512_mask_storeu_ps(am, mask, a);
      }
    }
  }
}
#endif

void AccumulateRows(const float* x, const uint16_t* w, float* acc, int64_t M, int64_t K,
                    int64_t N, int64_t k0, int64_t k1) {
#ifdef SAFEVLM_AVX512
  static const bool avx512 = __builtin_cpu_supports("avx512f") &&
                             __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl");
  if (avx512) return AccumulateRowsAvx512(x, w, acc, M, K, N, k0, k1);
#endif
  AccumulateRowsPortable(x, w, acc, M, K, N, k0, k1);
}

// Shared by the caller and the pool tasks of one call; tasks may outlive the call (they
// then find no chunk left), so it is reference counted.
struct Work {
  const float* x;
  const uint16_t* w;
  int64_t M, K, N, rows_per_chunk, num_chunks;
  std::vector<std::vector<float>> partial;  // one [M, N] accumulator per worker slot
  std::atomic<int64_t> next_chunk{0};
  std::atomic<int64_t> completed{0};
  std::atomic<int> slots{0};

  // Takes chunks until none are left. A worker claims an accumulator only once it holds a
  // chunk, so every claimed accumulator is complete when `completed == num_chunks`.
  void Run() {
    int64_t chunk = next_chunk.fetch_add(1);
    if (chunk >= num_chunks) return;
    std::vector<float>& acc = partial[slots.fetch_add(1)];
    acc.assign(M * N, 0.0f);
    for (; chunk < num_chunks; chunk = next_chunk.fetch_add(1)) {
      const int64_t k0 = chunk * rows_per_chunk;
      AccumulateRows(x, w, acc.data(), M, K, N, k0, std::min(K, k0 + rows_per_chunk));
      completed.fetch_add(1, std::memory_order_release);
    }
  }
};

template <typename T>
void ToF32(const T* src, float* dst, int64_t n);
template <>
void ToF32(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
template <>
void ToF32(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = Bf16ToF32(src[i]);
}

ffi::Error MatvecImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::BF16> w,
                      ffi::Result<ffi::AnyBuffer> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2 || xd[1] != wd[0] ||
      yd[0] != xd[0] || yd[1] != wd[1]) {
    return ffi::Error::InvalidArgument("safevlm_bf16_matvec: expects x [M, K], w [K, N], y [M, N]");
  }
  const bool bf16 = x.element_type() == ffi::BF16;
  if ((!bf16 && x.element_type() != ffi::F32) || y->element_type() != x.element_type()) {
    return ffi::Error::InvalidArgument("safevlm_bf16_matvec: x and y must both be f32 or bf16");
  }
  const int64_t M = xd[0], K = xd[1], N = wd[1];
  std::vector<float> x32(M * K);
  if (bf16) {
    ToF32(static_cast<const uint16_t*>(x.untyped_data()), x32.data(), M * K);
  } else {
    ToF32(static_cast<const float*>(x.untyped_data()), x32.data(), M * K);
  }

  const int64_t threads =
      K * N * 2 < kMinParallelBytes ? 1 : std::max<int64_t>(1, pool.num_threads());
  auto work = std::make_shared<Work>();
  work->x = x32.data();
  work->w = reinterpret_cast<const uint16_t*>(w.typed_data());
  work->M = M, work->K = K, work->N = N;
  // About four chunks per worker, whole row blocks each.
  const int64_t target = (K + 4 * threads - 1) / (4 * threads);
  work->rows_per_chunk = std::max<int64_t>(kRowBlock, (target + kRowBlock - 1) / kRowBlock * kRowBlock);
  work->num_chunks = (K + work->rows_per_chunk - 1) / work->rows_per_chunk;
  work->partial.resize(threads);
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([work] { work->Run(); });
  work->Run();
  while (work->completed.load(std::memory_order_acquire) < work->num_chunks) {
    std::this_thread::yield();
  }

  const int used = work->slots.load();
  std::vector<float>& sum = work->partial[0];
  for (int s = 1; s < used; ++s) {
    const float* p = work->partial[s].data();
    for (int64_t i = 0; i < M * N; ++i) sum[i] += p[i];
  }
  if (K == 0) sum.assign(M * N, 0.0f);
  if (bf16) {
    auto* out = static_cast<uint16_t*>(y->untyped_data());
    for (int64_t i = 0; i < M * N; ++i) out[i] = F32ToBf16(sum[i]);
  } else {
    std::memcpy(y->untyped_data(), sum.data(), M * N * sizeof(float));
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SafeVlmBf16Matvec, MatvecImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::AnyBuffer>());
