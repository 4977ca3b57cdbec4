// XLA FFI CPU kernel: y[M, N] = x[M, K] @ w[K, N] for few rows M (decode), w f32 or bf16.
//
// Decoding a few rows is bound by streaming the weights once. XLA:CPU runs bf16 dots through
// a much slower path than its f32 one, so bf16 weights decoded no faster than f32 ones
// although they are half the bytes, and its f32 product streams below what prefetching
// reaches (measurements: docs/performance.md). This kernel reads each weight row once, widens bf16
// to f32 (a 16-bit shift) and accumulates in f32; the rows are split in contiguous slabs
// (sequential reads) over XLA's intra-op thread pool, each slab summed into its own [M, N] f32
// buffer, the buffers added in slab order at the end (so every call gives the same bits). x and y are f32 or bf16 (the same dtype); bf16 outputs round to
// nearest even.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
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

inline float Widen(float v) { return v; }
inline float Widen(uint16_t v) { return Bf16ToF32(v); }

// acc[m, n] += sum_{k0 <= k < k1} x[m, k] * w[k, n]; x f32 [M, K], w [K, N] f32 or bf16 (W =
// float or uint16_t), acc f32 [M, N]. Portable version (auto-vectorized): widens kRowBlock
// rows into an f32 tile, then adds them to each accumulator row.
template <typename W>
SAFEVLM_TARGET_CLONES void AccumulateRowsPortable(const float* __restrict x, const W* __restrict w,
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
          const W* wr = w + (k + r) * N + n0;
          for (int64_t j = 0; j < cols; ++j) t[j] = Widen(wr[j]);
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
#define SAFEVLM_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl")))

// 16 values as f32: all 16 (kFull; plain loads, faster than masked ones) or the lanes in `mask`
// (the last, partial group of a row; the other lanes 0).
template <bool kFull>
SAFEVLM_AVX512_TARGET inline __m512 Load16(const float* p, __mmask16 mask) {
  return kFull ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(mask, p);
}
template <bool kFull>
SAFEVLM_AVX512_TARGET inline __m512 Load16(const uint16_t* p, __mmask16 mask) {
  const __m256i half = kFull ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                             : _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// Software prefetch: bf16 rows prefetch the next row block, f32 rows 1 KiB ahead in the same
// rows, the distances that streamed fastest on a 2-core AVX-512 machine with the weights
// beyond the last-level cache (docs/performance.md). The address may pass the end of w: a
// prefetch never faults.
template <typename W>
SAFEVLM_AVX512_TARGET inline void Prefetch(const W* w, int64_t N, int64_t k, int64_t k1,
                                           int64_t rows, int64_t n) {
  constexpr int64_t kLine = 64 / sizeof(W);  // elements per cache line
  if (n % kLine != 0) return;
  if constexpr (sizeof(W) == 4) {
    for (int64_t r = 0; r < rows; ++r) {
      const uintptr_t at = reinterpret_cast<uintptr_t>(w + (k + r) * N + n) + 1024;
      _mm_prefetch(reinterpret_cast<const char*>(at), _MM_HINT_T0);
    }
  } else if (k + kRowBlock < k1) {
    for (int64_t r = 0; r < kRowBlock; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (k + kRowBlock + r) * N + n), _MM_HINT_T0);
    }
  }
}

// acc[:, n:n+16] += rows k..k+rows-1 of w (columns n..n+15) weighted by x; kFull: all 16
// columns exist, else those in `mask`.
template <bool kFull, typename W>
SAFEVLM_AVX512_TARGET inline void Columns16(const float* __restrict x, const W* __restrict w,
                                            float* __restrict acc, int64_t M, int64_t K,
                                            int64_t N, int64_t k, int64_t k1, int64_t rows,
                                            int64_t n, __mmask16 mask) {
  __m512 v[kRowBlock];
  for (int64_t r = 0; r < kRowBlock; ++r) {
    v[r] = r < rows ? Load16<kFull>(w + (k + r) * N + n, mask) : _mm512_setzero_ps();
  }
  Prefetch(w, N, k, k1, rows, n);
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K + k;
    float* am = acc + m * N + n;
    __m512 a = Load16<kFull>(am, mask);
    for (int64_t r = 0; r < rows; ++r) a = _mm512_fmadd_ps(_mm512_set1_ps(xm[r]), v[r], a);
    if (kFull) {
      _mm512_storeu_ps(am, a);
    } else {
      _mm512_mask_storeu_ps(am, mask, a);
    }
  }
}

// AccumulateRowsPortable with AVX-512: kRowBlock rows widened in registers, 16 columns at a
// time, each row's x broadcast straight into the FMA.
template <typename W>
SAFEVLM_AVX512_TARGET void AccumulateRowsAvx512(const float* __restrict x, const W* __restrict w,
                          float* __restrict acc, int64_t M, int64_t K, int64_t N, int64_t k0,
                          int64_t k1) {
  const int64_t full = N / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (N - full)) - 1);
  for (int64_t k = k0; k < k1; k += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, k1 - k);
    for (int64_t n = 0; n < full; n += 16) {
      Columns16<true>(x, w, acc, M, K, N, k, k1, rows, n, tail);
    }
    if (full < N) Columns16<false>(x, w, acc, M, K, N, k, k1, rows, full, tail);
  }
}
#endif

template <typename W>
void AccumulateRows(const float* x, const W* w, float* acc, int64_t M, int64_t K, int64_t N,
                    int64_t k0, int64_t k1) {
#ifdef SAFEVLM_AVX512
  // SAFEVLM_JAX_PORTABLE_MATVEC (set when the process starts) forces the portable path: the
  // tests run it on AVX-512 machines too.
  static const bool avx512 = std::getenv("SAFEVLM_JAX_PORTABLE_MATVEC") == nullptr &&
                             __builtin_cpu_supports("avx512f") &&
                             __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl");
  if (avx512) return AccumulateRowsAvx512(x, w, acc, M, K, N, k0, k1);
#endif
  AccumulateRowsPortable(x, w, acc, M, K, N, k0, k1);
}

// The library's helper threads. Each spins for kSpin after its last task before it sleeps:
// a decode step calls the kernel ~170 times with a few microseconds of other work between
// calls, and XLA's intra-op pool threads, asleep in between, took a large part of a product
// to wake (docs/performance.md). Created on first use, never destroyed (they sleep when idle).
class Helpers {
 public:
  static constexpr auto kSpin = std::chrono::microseconds(200);

  static Helpers& Get(int64_t cores) {
    static Helpers* helpers = new Helpers(std::max<int64_t>(0, cores - 1));
    return *helpers;
  }

  int64_t size() const { return size_; }

  // Every helper runs `task` once (unless a later Post replaces it before the helper wakes:
  // tasks must let the caller finish the work alone).
  void Post(std::function<void()> task) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      task_ = std::move(task);
      generation_.fetch_add(1, std::memory_order_release);
    }
    if (sleepers_.load() > 0) wake_.notify_all();
  }

 private:
  explicit Helpers(int64_t size) : size_(size) {
    for (int64_t i = 0; i < size; ++i) std::thread([this] { Loop(); }).detach();
  }

  void Loop() {
    uint64_t seen = 0;
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + kSpin;
      while (generation_.load(std::memory_order_acquire) == seen &&
             std::chrono::steady_clock::now() < until) {
#if defined(__x86_64__)
        _mm_pause();
#endif
      }
      std::function<void()> task;
      {
        std::unique_lock<std::mutex> lock(mu_);
        if (generation_.load() == seen) {
          ++sleepers_;
          wake_.wait(lock, [&] { return generation_.load() != seen; });
          --sleepers_;
        }
        seen = generation_.load();
        task = task_;
      }
      task();
    }
  }

  const int64_t size_;
  std::mutex mu_;
  std::condition_variable wake_;
  std::function<void()> task_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> sleepers_{0};
};

// Shared by the caller and the helpers' tasks of one call; tasks may outlive the call (they
// then find no chunk left), so it is reference counted.
template <typename W>
struct Work {
  const float* x;
  const W* w;
  int64_t M, K, N, rows_per_chunk, num_chunks;
  std::vector<std::vector<float>> partial;  // one [M, N] accumulator per chunk
  std::atomic<int64_t> next_chunk{0};
  std::atomic<int64_t> completed{0};

  // Takes chunks until none are left, each summed into its own accumulator: which worker
  // runs a chunk varies from call to call (a helper the OS has descheduled takes fewer), so
  // summing chunks per worker made the rounding, and greedy tokens, vary between identical
  // calls; the chunks are added in chunk order at the end.
  void Run() {
    for (int64_t chunk = next_chunk.fetch_add(1); chunk < num_chunks; chunk = next_chunk.fetch_add(1)) {
      std::vector<float>& acc = partial[chunk];
      acc.assign(M * N, 0.0f);
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

// y = x @ w with w's rows split over the caller and the helpers; x32 [M, K] f32.
template <typename W>
std::vector<float> Product(Helpers& helpers, const std::vector<float>& x32, const W* w,
                           int64_t M, int64_t K, int64_t N) {
  const int64_t threads =
      K * N * static_cast<int64_t>(sizeof(W)) < kMinParallelBytes ? 1 : 1 + helpers.size();
  auto work = std::make_shared<Work<W>>();
  work->x = x32.data();
  work->w = w;
  work->M = M, work->K = K, work->N = N;
  // About four chunks per worker (one on one thread), whole row blocks each.
  const int64_t chunks = threads == 1 ? 1 : 4 * threads;
  const int64_t target = (K + chunks - 1) / chunks;
  work->rows_per_chunk = std::max<int64_t>(kRowBlock, (target + kRowBlock - 1) / kRowBlock * kRowBlock);
  work->num_chunks = (K + work->rows_per_chunk - 1) / work->rows_per_chunk;
  work->partial.resize(work->num_chunks);
  if (threads > 1) helpers.Post([work] { work->Run(); });
  work->Run();
  while (work->completed.load(std::memory_order_acquire) < work->num_chunks) {
    std::this_thread::yield();
  }
  if (K == 0) return std::vector<float>(M * N, 0.0f);
  std::vector<float>& sum = work->partial[0];
  for (int64_t c = 1; c < work->num_chunks; ++c) {  // in chunk order: the same sum every call
    const float* p = work->partial[c].data();
    for (int64_t i = 0; i < M * N; ++i) sum[i] += p[i];
  }
  return std::move(sum);
}

ffi::Error MatvecImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                      ffi::Result<ffi::AnyBuffer> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2 || xd[1] != wd[0] ||
      yd[0] != xd[0] || yd[1] != wd[1]) {
    return ffi::Error::InvalidArgument("safevlm_matvec: expects x [M, K], w [K, N], y [M, N]");
  }
  const auto f32_or_bf16 = [](ffi::DataType t) { return t == ffi::F32 || t == ffi::BF16; };
  if (!f32_or_bf16(x.element_type()) || !f32_or_bf16(w.element_type()) ||
      y->element_type() != x.element_type()) {
    return ffi::Error::InvalidArgument(
        "safevlm_matvec: x, w are f32 or bf16 and y has x's dtype");
  }
  const int64_t M = xd[0], K = xd[1], N = wd[1];
  Helpers& helpers = Helpers::Get(pool.num_threads());  // as many workers as XLA has cores
  std::vector<float> x32(M * K);
  const bool bf16_x = x.element_type() == ffi::BF16;
  if (bf16_x) {
    ToF32(static_cast<const uint16_t*>(x.untyped_data()), x32.data(), M * K);
  } else {
    ToF32(static_cast<const float*>(x.untyped_data()), x32.data(), M * K);
  }
  const std::vector<float> sum =
      w.element_type() == ffi::BF16
          ? Product(helpers, x32, static_cast<const uint16_t*>(w.untyped_data()), M, K, N)
          : Product(helpers, x32, static_cast<const float*>(w.untyped_data()), M, K, N);
  if (bf16_x) {
    auto* out = static_cast<uint16_t*>(y->untyped_data());
    for (int64_t i = 0; i < M * N; ++i) out[i] = F32ToBf16(sum[i]);
  } else {
    std::memcpy(y->untyped_data(), sum.data(), M * N * sizeof(float));
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SafeVlmMatvec, MatvecImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
