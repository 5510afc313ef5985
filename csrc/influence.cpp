// Blocked influence products with fused per-segment reductions (CPU path).
//
//   out[i, s] += weight * R_{j in seg s} <x_i, t_j>,  x: [N, k] train rows, t: [M, k] targets,
//   seg s = columns [offsets[s], offsets[s+1]),  R in {mean, max, top-m mean, count(> thr)}.
//
// Never forms the N x M product. Each OpenMP thread takes a block of train
// rows, converts it to fp32 once (packed for the micro-kernel), then sweeps
// the targets in blocks of NC columns: a [rows, NC] tile of dot products is
// computed into a small buffer and folded at once into per-(row, segment)
// running state (sum / max / count / top-m heap). Memory is O(threads *
// (rows * k + rows * NC) + M * k), independent of N.
//
// The GEMM core is the classic register-blocked outer-product micro-kernel
// (MR = 6 train rows x NR = 16 target columns, 12 AVX2 accumulators, fp32
// FMA) over packed panels, with k split into KC-long chunks so a target
// panel (NR x KC fp32 = 16 KiB) stays in L1 while the row panels stream past
// from L2 (BLIS's loop order). Bigger row blocks (the wrapper's default is
// 144) re-use each target panel more often per trip through L3.
// The AVX2+FMA kernel is chosen at run time (__builtin_cpu_supports), so the
// library still loads on CPUs without AVX2 and runs the portable kernel.
//
// Determinism: every dot product is accumulated in the same order (p = 0..kl
// within a KC chunk, chunks added in order) whatever block_rows, the thread
// count or the row's position in a block, so results do not depend on them.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define ICONS_FAST_X86_DISPATCH 1
#endif

#include "influence.h"

namespace py = pybind11;

namespace icons_fast {
namespace {

constexpr int64_t MR = 6;    // train rows per micro-tile
constexpr int64_t NR = 16;   // target columns per micro-tile (two 8-float vectors)
constexpr int64_t KC = 256;  // k chunk: an NR x KC target panel is 16 KiB (L1)
constexpr int64_t NC = 256;  // target columns per reduction tile

// ---------------------------------------------------------------- dtypes ---
inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// IEEE binary16 -> binary32 by bit manipulation, exact for every input and
// branch-free so conversion loops vectorise: move exponent + mantissa to the
// binary32 positions, rebias 15 -> 127 by multiplying by 2^112 (exact, and
// it also normalises half subnormals), then patch inf / nan and the sign.
// (Under flush-to-zero / denormals-are-zero modes half subnormals read as 0.)
inline float half_to_float(uint16_t h) {
  const uint32_t mag = static_cast<uint32_t>(h & 0x7fffu) << 13;
  uint32_t bits = float_to_bits(bits_to_float(mag) * 0x1p112f);
  bits = mag >= (0x7c00u << 13) ? (0x7f800000u | mag) : bits;  // inf / nan keep their payload
  return bits_to_float(bits | (static_cast<uint32_t>(h & 0x8000u) << 16));
}

// bfloat16 is the top half of a binary32.
inline float bf16_to_float(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }

// On x86 the hot loops below get an AVX2 clone chosen at load time (GCC/clang
// target_clones); elsewhere they compile once for the baseline ISA.
#if defined(ICONS_FAST_X86_DISPATCH) && defined(__GNUC__) && !defined(__clang__)
#define ICONS_FAST_CLONES __attribute__((target_clones("avx2", "default")))
// The lane-wise folds also gain from AVX-512's 16-float vectors.
#define ICONS_FAST_CLONES_WIDE __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ICONS_FAST_CLONES
#define ICONS_FAST_CLONES_WIDE
#endif

// dst[0:count] = float(src[start:start+count]) (* scale for int8).
ICONS_FAST_CLONES void convert_row(const void* src, int dtype, int64_t start, int64_t count, float scale, float* dst) {
  switch (dtype) {
    case kF32: {
      const float* s = static_cast<const float*>(src) + start;
      std::memcpy(dst, s, sizeof(float) * count);
      break;
    }
    case kF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src) + start;
      for (int64_t i = 0; i < count; ++i) dst[i] = half_to_float(s[i]);
      break;
    }
    case kBF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src) + start;
      for (int64_t i = 0; i < count; ++i) dst[i] = bf16_to_float(s[i]);
      break;
    }
    case kI8: {
      const int8_t* s = static_cast<const int8_t*>(src) + start;
      for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<float>(s[i]) * scale;
      break;
    }
    default:
      throw std::invalid_argument("influence: unknown dtype code " + std::to_string(dtype));
  }
}

// 64-byte aligned float buffer (vector loads, no false sharing between threads).
struct AlignedBuf {
  float* p = nullptr;
  explicit AlignedBuf(int64_t n) {
    const size_t bytes = ((static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(float) + 63) / 64) * 64;
    p = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (!p) throw std::bad_alloc();
  }
  ~AlignedBuf() { std::free(p); }
  AlignedBuf(const AlignedBuf&) = delete;
  AlignedBuf& operator=(const AlignedBuf&) = delete;
};

// Pack rows [r0, r0 + rows) of src ([*, k]) as W-wide panels, numbered from
// first_panel, into a buffer laid out chunk by chunk (chunk stride ld_chunk * KC):
//   dst[k0 * ld_chunk + (first_panel + r / W) * kl * W + p * W + r % W] = src[r0 + r, k0 + p]
// for every KC chunk (k0, kl). Rows up to the next multiple of W are zero.
void pack_panels(const void* src, int dtype, const float* scale, int64_t r0, int64_t rows, int64_t k,
                 int64_t width, int64_t ld_chunk, int64_t first_panel, float* dst, float* tmp) {
  const int64_t rows_pad = (rows + width - 1) / width * width;
  for (int64_t r = 0; r < rows_pad; ++r) {
    const int64_t panel = first_panel + r / width, lane = r % width;
    if (r < rows) {
      const float sc = scale ? scale[r0 + r] : 1.0f;
      convert_row(src, dtype, (r0 + r) * k, k, sc, tmp);
    } else {
      std::fill(tmp, tmp + k, 0.0f);
    }
    for (int64_t k0 = 0; k0 < k; k0 += KC) {
      const int64_t kl = std::min(KC, k - k0);
      float* d = dst + k0 * ld_chunk + panel * kl * width + lane;
      for (int64_t p = 0; p < kl; ++p) d[p * width] = tmp[k0 + p];
    }
  }
}

// --------------------------------------------------------- micro-kernels ---
// C[0:MR, 0:NR] (row stride ldc) = (acc ? C : 0) + A_panel^T B_panel over kl steps.
using MicroKernel = void (*)(int64_t, const float*, const float*, float*, int64_t, bool);

void kernel_generic(int64_t kl, const float* A, const float* B, float* C, int64_t ldc, bool acc) {
  float c[MR][NR] = {};
  for (int64_t p = 0; p < kl; ++p, A += MR, B += NR)
    for (int64_t i = 0; i < MR; ++i)
      for (int64_t j = 0; j < NR; ++j) c[i][j] += A[i] * B[j];
  for (int64_t i = 0; i < MR; ++i)
    for (int64_t j = 0; j < NR; ++j) C[i * ldc + j] = (acc ? C[i * ldc + j] : 0.0f) + c[i][j];
}

#ifdef ICONS_FAST_X86_DISPATCH
// (A lambda would not inherit the target attribute, hence a named helper.)
__attribute__((target("avx2,fma"))) inline void put_row_avx2(float* C, int64_t ldc, int64_t i, __m256 lo, __m256 hi,
                                                              bool acc) {
  float* cp = C + i * ldc;
  if (acc) {
    lo = _mm256_add_ps(_mm256_loadu_ps(cp), lo);
    hi = _mm256_add_ps(_mm256_loadu_ps(cp + 8), hi);
  }
  _mm256_storeu_ps(cp, lo);
  _mm256_storeu_ps(cp + 8, hi);
}

__attribute__((target("avx2,fma"))) void kernel_avx2(int64_t kl, const float* A, const float* B, float* C,
                                                      int64_t ldc, bool acc) {
  // MR x 2 accumulators (one row of the micro-tile = two 8-float vectors); the
  // fixed-trip loops over i are fully unrolled by the compiler, so the
  // accumulators stay in registers (12 of the 16 ymm).
  __m256 c[MR][2];
#pragma GCC unroll 6
  for (int64_t i = 0; i < MR; ++i) c[i][0] = c[i][1] = _mm256_setzero_ps();
#pragma GCC unroll 4
  for (int64_t p = 0; p < kl; ++p, A += MR, B += NR) {
    const __m256 b0 = _mm256_load_ps(B), b1 = _mm256_load_ps(B + 8);
#pragma GCC unroll 6
    for (int64_t i = 0; i < MR; ++i) {
      const __m256 a = _mm256_broadcast_ss(A + i);
      c[i][0] = _mm256_fmadd_ps(a, b0, c[i][0]);
      c[i][1] = _mm256_fmadd_ps(a, b1, c[i][1]);
    }
  }
#pragma GCC unroll 6
  for (int64_t i = 0; i < MR; ++i) put_row_avx2(C, ldc, i, c[i][0], c[i][1], acc);
}
#endif

// OpenMP threads for one call: the caller's count when positive, else OpenMP's default (1 without OpenMP).
int thread_count(int num_threads) {
#ifdef _OPENMP
  return num_threads > 0 ? num_threads : omp_get_max_threads();
#else
  (void)num_threads;
  return 1;
#endif
}

MicroKernel pick_kernel(bool force_generic, const char** name) {
#ifdef ICONS_FAST_X86_DISPATCH
  if (!force_generic && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    *name = "avx2-fma-6x16";
    return kernel_avx2;
  }
#endif
  (void)force_generic;
  *name = "generic-6x16";
  return kernel_generic;
}

// ------------------------------------------------------------ reductions ---
// Per-row folds over one tile piece, written with independent lanes so they
// vectorise (a plain running max / double sum is one long dependency chain).
// Lanes restart at every piece, and pieces are fixed by the NC tiling, so the
// summation order never depends on block_rows or the thread count.
ICONS_FAST_CLONES double sum_f64(const float* v, int64_t n) {
  double lane[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t t = 0;
  for (; t + 4 <= n; t += 4)
    for (int l = 0; l < 4; ++l) lane[l] += v[t + l];
  double acc = (lane[0] + lane[1]) + (lane[2] + lane[3]);
  for (; t < n; ++t) acc += v[t];
  return acc;
}

ICONS_FAST_CLONES float max_f32(const float* v, int64_t n, float best) {
  float lane[8];
  for (int l = 0; l < 8; ++l) lane[l] = best;
  int64_t t = 0;
  for (; t + 8 <= n; t += 8)
    for (int l = 0; l < 8; ++l) lane[l] = v[t + l] > lane[l] ? v[t + l] : lane[l];
  for (; t < n; ++t) best = v[t] > best ? v[t] : best;
  for (int l = 0; l < 8; ++l) best = lane[l] > best ? lane[l] : best;
  return best;
}

ICONS_FAST_CLONES int64_t count_gt(const float* v, int64_t n, float threshold) {
  int32_t c = 0;  // a piece is at most NC columns
  for (int64_t t = 0; t < n; ++t) c += v[t] > threshold ? 1 : 0;
  return c;
}

// The first t in [t0, n) with v[t] > threshold, or n. Tests 8 values at a time
// (a branch-free compare the compiler vectorises), then finds the one.
ICONS_FAST_CLONES int64_t first_greater(const float* v, int64_t t0, int64_t n, float threshold) {
  int64_t t = t0;
  for (; t + 8 <= n; t += 8) {
    int any = 0;
    for (int l = 0; l < 8; ++l) any |= v[t + l] > threshold ? 1 : 0;
    if (any) break;
  }
  for (; t < n; ++t)
    if (v[t] > threshold) return t;
  return n;
}

// b[0:len] sorted in descending order; put x in its place in b[0:len+1] (b[len] is overwritten).
inline void insert_descending(float* b, int64_t len, float x) {
  int64_t j = len;
  for (; j > 0 && b[j - 1] < x; --j) b[j] = b[j - 1];
  b[j] = x;
}

// Running per-(row, segment) state of one row block, folded one tile at a time.
struct SegmentState {
  int reduction;
  int64_t rows, S, topm;
  float threshold;
  std::vector<double> sum;    // mean
  std::vector<float> best;    // max
  std::vector<int64_t> cnt;   // count
  std::vector<float> heap;    // top-m: [rows * S * topm] kept values, each run sorted descending
  std::vector<int64_t> hsz;   // top-m: how many are kept

  SegmentState(int red, int64_t rows_, int64_t S_, int64_t topm_, float thr)
      : reduction(red), rows(rows_), S(S_), topm(topm_), threshold(thr) {
    const size_t n = static_cast<size_t>(rows * S);
    if (red == kMean) sum.assign(n, 0.0);
    if (red == kMax) best.assign(n, -std::numeric_limits<float>::infinity());
    if (red == kCount) cnt.assign(n, 0);
    if (red == kTopM) {
      heap.assign(n * static_cast<size_t>(topm), 0.0f);
      hsz.assign(n, 0);
    }
  }

  // Fold values v[0:n] (consecutive columns of segment s) of row r.
  void fold(int64_t r, int64_t s, const float* v, int64_t n) {
    const int64_t idx = r * S + s;
    switch (reduction) {
      case kMean:
        sum[idx] += sum_f64(v, n);
        break;
      case kMax:
        best[idx] = max_f32(v, n, best[idx]);
        break;
      case kCount:
        cnt[idx] += count_gt(v, n, threshold);
        break;
      case kTopM: {
        // The m largest so far, sorted in descending order: b[m-1] is the floor a
        // new value must beat. After the first columns few values do (about
        // m ln(n/m) of n), so a vector scan finds them and each costs one
        // insertion (at most m moves, no heap or sort).
        float* b = heap.data() + idx * topm;
        int64_t sz = hsz[idx];
        int64_t t = 0;
        for (; t < n && sz < topm; ++t, ++sz) insert_descending(b, sz, v[t]);
        if (sz == topm)
          for (t = first_greater(v, t, n, b[topm - 1]); t < n; t = first_greater(v, t + 1, n, b[topm - 1]))
            insert_descending(b, topm - 1, v[t]);  // drops the old b[m-1]
        hsz[idx] = sz;
        break;
      }
    }
  }

  // Final value of (r, s); seg_len = number of columns in segment s.
  double value(int64_t r, int64_t s, int64_t seg_len) {
    const int64_t idx = r * S + s;
    switch (reduction) {
      case kMean:
        return sum[idx] / static_cast<double>(seg_len);
      case kMax:
        return best[idx];
      case kCount:
        return static_cast<double>(cnt[idx]);
      default: {  // kTopM: mean of the min(m, seg_len) largest, summed in ascending order
        const float* b = heap.data() + idx * topm;
        const int64_t sz = hsz[idx];
        double acc = 0.0;
        for (int64_t t = sz - 1; t >= 0; --t) acc += b[t];
        return acc / static_cast<double>(sz);
      }
    }
  }
};

void check_args(int train_dtype, int target_dtype, int64_t n, int64_t k, int64_t m, const int64_t* offsets,
                int64_t S, int reduction, int64_t topm, bool has_scale) {
  if (train_dtype < kF32 || train_dtype > kI8) throw std::invalid_argument("influence: bad train dtype code");
  if (target_dtype != kF32 && target_dtype != kF16)
    throw std::invalid_argument("influence: targets must be fp32 or fp16");
  if ((train_dtype == kI8) != has_scale)
    throw std::invalid_argument("influence: int8 train features need a per-row scale (and only int8 takes one)");
  if (n < 0 || k <= 0 || m <= 0 || S <= 0) throw std::invalid_argument("influence: empty k, targets or segments");
  if (reduction < kMean || reduction > kCount) throw std::invalid_argument("influence: bad reduction code");
  if (reduction == kTopM && topm <= 0) throw std::invalid_argument("influence: top-m needs m >= 1");
  if (offsets[0] != 0 || offsets[S] != m)
    throw std::invalid_argument("influence: offsets must start at 0 and end at M");
  for (int64_t s = 0; s < S; ++s)
    if (offsets[s + 1] <= offsets[s]) throw std::invalid_argument("influence: empty or decreasing segment");
}

}  // namespace

// The CPU op (see file header). Pointers are host addresses of C-contiguous
// arrays: train [n, k], scale [n] fp32 or 0, targets [m, k], offsets int64
// [S+1], out fp32 [n, S] (accumulated into). Returns the micro-kernel name.
std::string segment_reduce_cpu(uintptr_t train_ptr, int train_dtype, int64_t n, int64_t k, uintptr_t scale_ptr,
                               uintptr_t targets_ptr, int target_dtype, int64_t m, uintptr_t offsets_ptr,
                               int64_t S, int reduction, int64_t topm, float threshold, float weight,
                               uintptr_t out_ptr, int64_t block_rows, int num_threads, bool force_generic) {
  const void* train = reinterpret_cast<const void*>(train_ptr);
  const float* scale = reinterpret_cast<const float*>(scale_ptr);
  const void* targets = reinterpret_cast<const void*>(targets_ptr);
  const int64_t* offsets = reinterpret_cast<const int64_t*>(offsets_ptr);
  float* out = reinterpret_cast<float*>(out_ptr);
  if (!train || !targets || !offsets || !out) throw std::invalid_argument("influence: null pointer");
  check_args(train_dtype, target_dtype, n, k, m, offsets, S, reduction, topm, scale != nullptr);
  const char* kname = nullptr;
  const MicroKernel kern = pick_kernel(force_generic, &kname);
  if (n == 0) return kname;

  const int64_t R = std::max<int64_t>(MR, (std::max<int64_t>(block_rows, 1) + MR - 1) / MR * MR);
  const int64_t m_pad = (m + NR - 1) / NR * NR;
  const int64_t n_blocks = (n + R - 1) / R;
  const int threads = thread_count(num_threads);

  {
    py::gil_scoped_release nogil;
    // Every buffer is allocated before the parallel region, so nothing in it
    // throws past an OpenMP barrier (which would hang the other threads).
    AlignedBuf bpack(m_pad * k);              // all targets, fp32, NR-wide panels per KC chunk
    AlignedBuf tmp_all(threads * k);          // one converted row per thread
    AlignedBuf apack_all(threads * R * k);    // packed train block per thread
    AlignedBuf cbuf_all(threads * R * NC);    // [R, NC] dot-product tile per thread
    std::string err;
#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
      const int64_t tid = omp_get_thread_num();
#else
      const int64_t tid = 0;
#endif
      float* tmp = tmp_all.p + tid * k;
      float* apack = apack_all.p + tid * R * k;
      float* cbuf = cbuf_all.p + tid * R * NC;
      // Pack the targets (all threads, one NR-wide panel each); the implicit
      // barrier at the loop's end makes bpack complete before anyone reads it.
#pragma omp for schedule(static)
      for (int64_t j = 0; j < m_pad / NR; ++j)
        pack_panels(targets, target_dtype, nullptr, j * NR, std::min(NR, m - j * NR), k, NR, m_pad, j, bpack.p, tmp);

#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < n_blocks; ++b) {
        try {
          const int64_t r0 = b * R, rows = std::min(R, n - r0);
          const int64_t rows_pad = (rows + MR - 1) / MR * MR;
          pack_panels(train, train_dtype, scale, r0, rows, k, MR, rows_pad, 0, apack, tmp);
          SegmentState st(reduction, rows, S, topm, threshold);
          for (int64_t c0 = 0; c0 < m_pad; c0 += NC) {
            const int64_t ncols = std::min(NC, m_pad - c0);  // multiple of NR
            for (int64_t k0 = 0; k0 < k; k0 += KC) {
              const int64_t kl = std::min(KC, k - k0);
              for (int64_t jp = 0; jp < ncols / NR; ++jp) {
                const float* bp = bpack.p + k0 * m_pad + (c0 / NR + jp) * kl * NR;
                for (int64_t ip = 0; ip < rows_pad / MR; ++ip) {
                  const float* ap = apack + k0 * rows_pad + ip * kl * MR;
                  kern(kl, ap, bp, cbuf + ip * MR * NC + jp * NR, NC, k0 > 0);
                }
              }
            }
            // Fold the real columns [c0, c_hi) of this tile into the segment state.
            const int64_t c_hi = std::min(c0 + ncols, m);
            int64_t s = std::upper_bound(offsets, offsets + S + 1, c0) - offsets - 1;
            for (; s < S && offsets[s] < c_hi; ++s) {
              const int64_t lo = std::max(offsets[s], c0), hi = std::min(offsets[s + 1], c_hi);
              for (int64_t r = 0; r < rows; ++r) st.fold(r, s, cbuf + r * NC + (lo - c0), hi - lo);
            }
          }
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t s2 = 0; s2 < S; ++s2) {
              float& o = out[(r0 + r) * S + s2];
              o = static_cast<float>(o + static_cast<double>(weight) * st.value(r, s2, offsets[s2 + 1] - offsets[s2]));
            }
        } catch (const std::exception& e) {  // e.g. bad_alloc of the segment state
#pragma omp critical
          err = e.what();
        }
      }
    }
    if (!err.empty()) throw std::runtime_error(err);
  }
  return kname;
}

// The reduction half of the op on its own, for a block of dot products
// computed elsewhere (the BLAS path: torch/MKL/oneDNN GEMM into a block buffer),
// given transposed: scores_t[j * ld + r] = <x_r, t_j> (fp32 [m, ld], ld >= rows),
//   out[r, s] += weight * R_{j in [offsets[s], offsets[s+1])} scores_t[j * ld + r],  r < rows,
// out fp32 [rows, S].
//
// Why transposed: one target's scores for consecutive train rows are then
// contiguous, so every fold below keeps the running state of kFoldLanes rows
// in independent lanes and takes one column at a time with branch-free
// lane-wise max / min / compare / add that the compiler vectorises. Top-m keeps,
// per lane, the m largest so far sorted (b[0] >= ... >= b[m-1]) and inserts a
// column with one compare-exchange pass down the list (hi = max(b_i, x),
// x = min(b_i, x)); a column where no lane beats its floor b[m-1] is skipped,
// which after the first columns is most of them (a value enters with chance
// about m/j). A row-major fold has to do that insertion row by row with a
// data-dependent branch per kept value, and measured 1.3x slower than the
// GEMM it follows (benchmarks/RESULTS.md, issue 16).
//
// Results: max, top-m and count equal the fused kernel's bit for bit on the
// same dot products (the same comparisons; top-m sums its kept values in
// ascending order, as SegmentState::value does); mean sums in double in column
// order, which may differ from the fused kernel's lane order in the last bit
// of the double, never of the float result unless the sum is a tie.
constexpr int64_t kFoldLanes = 64;
// GCC vector extensions: 16 floats, lowered to whatever vectors the clone's ISA has.
typedef float vf16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));

ICONS_FAST_CLONES_WIDE void fold_lanes(const float* scores_t, int64_t ld, int64_t nl, const int64_t* offsets,
                                       int64_t S, int reduction, int64_t topm, float threshold, float weight,
                                       float* out, vf16* kept) {
  constexpr int64_t L = kFoldLanes;
  alignas(64) float x[L] = {};
  for (int64_t s = 0; s < S; ++s) {
    const int64_t lo = offsets[s], hi = offsets[s + 1];
    double res[L];
    if (reduction == kMean) {
      double acc[L] = {};
      for (int64_t j = lo; j < hi; ++j) {
        const float* c = scores_t + j * ld;
        for (int64_t l = 0; l < nl; ++l) x[l] = c[l];
        for (int64_t l = 0; l < L; ++l) acc[l] += x[l];
      }
      for (int64_t l = 0; l < L; ++l) res[l] = acc[l] / static_cast<double>(hi - lo);
    } else if (reduction == kMax) {
      float best[L];
      for (int64_t l = 0; l < L; ++l) best[l] = -std::numeric_limits<float>::infinity();
      for (int64_t j = lo; j < hi; ++j) {
        const float* c = scores_t + j * ld;
        for (int64_t l = 0; l < nl; ++l) x[l] = c[l];
        for (int64_t l = 0; l < L; ++l) best[l] = x[l] > best[l] ? x[l] : best[l];
      }
      for (int64_t l = 0; l < L; ++l) res[l] = best[l];
    } else if (reduction == kCount) {
      int32_t cnt[L] = {};
      for (int64_t j = lo; j < hi; ++j) {
        const float* c = scores_t + j * ld;
        for (int64_t l = 0; l < nl; ++l) x[l] = c[l];
        for (int64_t l = 0; l < L; ++l) cnt[l] += x[l] > threshold ? 1 : 0;
      }
      for (int64_t l = 0; l < L; ++l) res[l] = cnt[l];
    } else {  // kTopM; kept: [topm][L / 16] vectors, entry i = the (i+1)-th largest of every lane
      constexpr int64_t NV = L / 16;
      vf16 neg_inf;
      for (int t = 0; t < 16; ++t) neg_inf[t] = -std::numeric_limits<float>::infinity();
      for (int64_t t = 0; t < topm * NV; ++t) kept[t] = neg_inf;
      for (int64_t j = lo; j < hi; ++j) {
        const float* c = scores_t + j * ld;
        for (int64_t l = 0; l < nl; ++l) x[l] = c[l];
        vf16 y[NV];
        std::memcpy(y, x, sizeof(y));
        for (int64_t i = 0; i < topm; ++i)  // compare-exchange down the sorted lists, NV independent chains
          for (int64_t v = 0; v < NV; ++v) {
            vf16& bi = kept[i * NV + v];
            const vi16 up = y[v] > bi;
            const vf16 lower = up ? bi : y[v];
            bi = up ? y[v] : bi;
            y[v] = lower;
          }
      }
      const float* kf = reinterpret_cast<const float*>(kept);  // lane l of entry i: kf[i * L + l]
      const int64_t sz = std::min(topm, hi - lo);
      for (int64_t l = 0; l < L; ++l) {
        double acc = 0.0;
        for (int64_t t = sz - 1; t >= 0; --t) acc += kf[t * L + l];
        res[l] = acc / static_cast<double>(sz);
      }
    }
    for (int64_t l = 0; l < nl; ++l) {
      float& o = out[l * S + s];
      o = static_cast<float>(o + static_cast<double>(weight) * res[l]);
    }
    // Lanes past nl hold values of no row (x keeps a previous column there); they are never written out.
  }
}

void segment_fold_t_cpu(uintptr_t scores_t_ptr, int64_t rows, int64_t m, int64_t ld, uintptr_t offsets_ptr,
                        int64_t S, int reduction, int64_t topm, float threshold, float weight, uintptr_t out_ptr,
                        int num_threads) {
  const float* scores_t = reinterpret_cast<const float*>(scores_t_ptr);
  const int64_t* offsets = reinterpret_cast<const int64_t*>(offsets_ptr);
  float* out = reinterpret_cast<float*>(out_ptr);
  if (!scores_t || !offsets || !out) throw std::invalid_argument("influence fold: null pointer");
  if (ld < rows) throw std::invalid_argument("influence fold: column stride ld must be >= rows");
  check_args(kF32, kF32, rows, 1, m, offsets, S, reduction, topm, false);
  if (rows == 0) return;
  const int64_t n_groups = (rows + kFoldLanes - 1) / kFoldLanes;
  const int threads = thread_count(num_threads);
  py::gil_scoped_release nogil;
  std::string err;
#pragma omp parallel num_threads(threads)
  {
    // top-m state: topm x kFoldLanes floats, 64-byte aligned for the vf16 accesses
    std::vector<float> kept_buf(reduction == kTopM ? static_cast<size_t>(topm * kFoldLanes + 16) : 0);
    vf16* kept = reinterpret_cast<vf16*>((reinterpret_cast<uintptr_t>(kept_buf.data()) + 63) & ~uintptr_t(63));
#pragma omp for schedule(static)
    for (int64_t g = 0; g < n_groups; ++g) {
      try {
        const int64_t r0 = g * kFoldLanes;
        fold_lanes(scores_t + r0, ld, std::min(kFoldLanes, rows - r0), offsets, S, reduction, topm, threshold,
                   weight, out + r0 * S, kept);
      } catch (const std::exception& e) {
#pragma omp critical
        err = e.what();
      }
    }
  }
  if (!err.empty()) throw std::runtime_error(err);
}

}  // namespace icons_fast

#ifdef ICONS_FAST_WITH_CUDA
static void segment_reduce_cuda_py(uintptr_t train_ptr, int train_dtype, int64_t n, int64_t k, uintptr_t scale_ptr,
                                   uintptr_t targets_ptr, int target_dtype, int64_t m, uintptr_t offsets_ptr,
                                   int64_t S, int reduction, int64_t topm, float threshold, float weight,
                                   uintptr_t out_ptr, uintptr_t stream) {
  if (reduction == icons_fast::kTopM && (topm < 1 || topm > icons_fast::kCudaMaxTopM))
    throw std::invalid_argument("influence (cuda): top-m needs 1 <= m <= " +
                                std::to_string(icons_fast::kCudaMaxTopM));
  py::gil_scoped_release nogil;
  icons_fast::segment_reduce_cuda(reinterpret_cast<const void*>(train_ptr), train_dtype, n, k,
                                  reinterpret_cast<const float*>(scale_ptr), reinterpret_cast<const void*>(targets_ptr),
                                  target_dtype, m, reinterpret_cast<const int64_t*>(offsets_ptr), S, reduction, topm,
                                  threshold, weight, reinterpret_cast<float*>(out_ptr), reinterpret_cast<void*>(stream));
}
#endif

void register_influence(py::module_& m) {
  using namespace icons_fast;
  m.def("influence_codes", []() {
    py::dict d;
    d["f32"] = static_cast<int>(kF32);
    d["f16"] = static_cast<int>(kF16);
    d["bf16"] = static_cast<int>(kBF16);
    d["i8"] = static_cast<int>(kI8);
    d["mean"] = static_cast<int>(kMean);
    d["max"] = static_cast<int>(kMax);
    d["topm"] = static_cast<int>(kTopM);
    d["count"] = static_cast<int>(kCount);
    d["cuda_max_topm"] = kCudaMaxTopM;
    return d;
  }, "dtype / reduction codes of the influence op (the Python wrapper's contract).");
  m.def("influence_segment_reduce_cpu", &segment_reduce_cpu, py::arg("train_ptr"), py::arg("train_dtype"),
        py::arg("n"), py::arg("k"), py::arg("scale_ptr"), py::arg("targets_ptr"), py::arg("target_dtype"),
        py::arg("m"), py::arg("offsets_ptr"), py::arg("n_segments"), py::arg("reduction"), py::arg("topm"),
        py::arg("threshold"), py::arg("weight"), py::arg("out_ptr"), py::arg("block_rows") = 48,
        py::arg("num_threads") = 0, py::arg("force_generic") = false,
        "out[n, S] += weight * segment-reduce(train @ targets.T); raw host pointers. Returns the kernel name.");
  m.def("influence_segment_fold_t_cpu", &segment_fold_t_cpu, py::arg("scores_t_ptr"), py::arg("rows"), py::arg("m"),
        py::arg("ld"), py::arg("offsets_ptr"), py::arg("n_segments"), py::arg("reduction"), py::arg("topm"),
        py::arg("threshold"), py::arg("weight"), py::arg("out_ptr"), py::arg("num_threads") = 0,
        "out[rows, S] += weight * segment-reduce(scores_t[m, ld].T) for a block of precomputed fp32 dot products.");
#ifdef ICONS_FAST_WITH_CUDA
  m.def("influence_segment_reduce_cuda", &segment_reduce_cuda_py, py::arg("train_ptr"), py::arg("train_dtype"),
        py::arg("n"), py::arg("k"), py::arg("scale_ptr"), py::arg("targets_ptr"), py::arg("target_dtype"),
        py::arg("m"), py::arg("offsets_ptr"), py::arg("n_segments"), py::arg("reduction"), py::arg("topm"),
        py::arg("threshold"), py::arg("weight"), py::arg("out_ptr"), py::arg("stream"),
        "CUDA version of influence_segment_reduce_cpu: device pointers, offsets on the device, a cudaStream_t.");
#endif
}
