// Project op: the counter-hash Rademacher matrix of the projection contract
// (icons_fast/features/rademacher.py), CPU path, C++17 + OpenMP.
//
// For parameter id pid = fnv1a32(name), element index i and column j:
//   h1 = fmix32(seed ^ pid);  h1 = fmix32(h1 ^ (i >> 32)) when i >= 2**32
//   h  = fmix32(fmix32(h1 ^ (i & 0xffffffff)) ^ (j / 32))
//   R[i, j] = +scale if bit (j % 32) of h is 0, else -scale
//
// Bound functions (all buffers are caller-owned, passed as integer addresses;
// the Python wrapper in icons_fast/ops/project.py checks device, dtype,
// contiguity and size before calling, so this file never links to torch):
//   fnv1a32(name) -> int
//   rademacher_words(out_u32, pid, seed, row_start, n_rows, k)
//       out[r, w] = h for row row_start + r, word w   (uint32 [n_rows, ceil(k/32)])
//   rademacher_signs(out_f32, ld, pid, seed, row_start, n_rows, k, scale)
//       out[r, j] = R[row_start + r, j] * scale        (float32 [n_rows, ld], ld >= k)
//   project_accumulate(out_f32, ld_out, g_f32, ld_g, batch, n_rows, pid, seed, row_start, k, scale)
//       out[b, j] += scale * sum_r g[b, r] * sign(row_start + r, j)   (never stores R)
//
// project_accumulate is a "method of four Russians" product: 8 rows of R
// have only 256 possible sign patterns per column, so for each group of 8
// rows we tabulate T[p][b] = sum_r (+-g[b, r]) for every pattern p once
// (256 * batch adds), and then every column costs one table lookup-and-add
// per 8 rows instead of 8 multiply-adds. With AVX2 the pattern of a column
// comes straight out of the 8 lane hashes with one movemask.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define ICONS_FAST_X86 1
#endif

namespace py = pybind11;

namespace {

constexpr uint32_t kFmixC1 = 0x85EBCA6Bu;
constexpr uint32_t kFmixC2 = 0xC2B2AE35u;
constexpr uint32_t kSignBit = 0x80000000u;

inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= kFmixC1;
  h ^= h >> 13;
  h *= kFmixC2;
  h ^= h >> 16;
  return h;
}

uint32_t fnv1a32(const std::string& name) {
  uint32_t h = 0x811C9DC5u;
  for (unsigned char c : name) {
    h ^= c;
    h *= 0x01000193u;
  }
  return h;
}

// fmix32(seed ^ pid): the per-(seed, parameter) start of the chain.
inline uint32_t seed_hash(uint32_t pid, uint64_t seed) { return fmix32(static_cast<uint32_t>(seed) ^ pid); }

// fmix32(h1' ^ (i & mask)) with h1' = fmix32(h1 ^ (i >> 32)) when i >= 2**32.
inline uint32_t row_base(uint32_t h1, uint64_t i) {
  const uint32_t high = static_cast<uint32_t>(i >> 32);
  const uint32_t h = high ? fmix32(h1 ^ high) : h1;
  return fmix32(h ^ static_cast<uint32_t>(i));
}

inline uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// ---------------------------------------------------------------- sign tiles

// Columns [0, nb) of one hash word: dst[b] = scale_bits with its sign bit
// flipped when bit b of h is set. Branch-free; vectorised by the compiler.
inline void expand_word(uint32_t h, uint32_t scale_bits, uint32_t* dst, int nb) {
  for (int b = 0; b < nb; ++b) dst[b] = scale_bits ^ (((h >> b) & 1u) << 31);
}

#ifdef ICONS_FAST_X86
// AVX2: 32 columns with four variable shifts that move bit b to the sign bit.
__attribute__((target("avx2"))) void fill_rows_avx2(uint32_t* out, int64_t ld, uint32_t h1, uint64_t row_start,
                                                   int64_t r0, int64_t r1, int64_t k, uint32_t scale_bits) {
  const int64_t full_words = k / 32;
  const __m256i sb = _mm256_set1_epi32(static_cast<int>(scale_bits));
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(kSignBit));
  const __m256i sh0 = _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24);
  const __m256i eight = _mm256_set1_epi32(8);
  const __m256i sh1 = _mm256_sub_epi32(sh0, eight);
  const __m256i sh2 = _mm256_sub_epi32(sh1, eight);
  const __m256i sh3 = _mm256_sub_epi32(sh2, eight);
  for (int64_t r = r0; r < r1; ++r) {
    const uint32_t base = row_base(h1, row_start + static_cast<uint64_t>(r));
    uint32_t* dst = out + r * ld;
    for (int64_t w = 0; w < full_words; ++w) {
      const __m256i hv = _mm256_set1_epi32(static_cast<int>(fmix32(base ^ static_cast<uint32_t>(w))));
      __m256i* d = reinterpret_cast<__m256i*>(dst + 32 * w);
      _mm256_storeu_si256(d + 0, _mm256_xor_si256(sb, _mm256_and_si256(_mm256_sllv_epi32(hv, sh0), sign)));
      _mm256_storeu_si256(d + 1, _mm256_xor_si256(sb, _mm256_and_si256(_mm256_sllv_epi32(hv, sh1), sign)));
      _mm256_storeu_si256(d + 2, _mm256_xor_si256(sb, _mm256_and_si256(_mm256_sllv_epi32(hv, sh2), sign)));
      _mm256_storeu_si256(d + 3, _mm256_xor_si256(sb, _mm256_and_si256(_mm256_sllv_epi32(hv, sh3), sign)));
    }
    if (k % 32) {
      const uint32_t h = fmix32(base ^ static_cast<uint32_t>(full_words));
      expand_word(h, scale_bits, dst + 32 * full_words, static_cast<int>(k % 32));
    }
  }
}
#endif

void fill_rows_generic(uint32_t* out, int64_t ld, uint32_t h1, uint64_t row_start, int64_t r0, int64_t r1,
                       int64_t k, uint32_t scale_bits) {
  const int64_t n_words = (k + 31) / 32;
  for (int64_t r = r0; r < r1; ++r) {
    const uint32_t base = row_base(h1, row_start + static_cast<uint64_t>(r));
    uint32_t* dst = out + r * ld;
    for (int64_t w = 0; w < n_words; ++w) {
      const int nb = static_cast<int>(std::min<int64_t>(32, k - 32 * w));
      expand_word(fmix32(base ^ static_cast<uint32_t>(w)), scale_bits, dst + 32 * w, nb);
    }
  }
}

bool cpu_has_avx2() {
#ifdef ICONS_FAST_X86
  static const bool ok = __builtin_cpu_supports("avx2");
  return ok;
#else
  return false;
#endif
}

void rademacher_signs(uintptr_t out_addr, int64_t ld, uint32_t pid, uint64_t seed, uint64_t row_start,
                      int64_t n_rows, int64_t k, float scale) {
  if (n_rows < 0 || k < 1 || ld < k) throw std::invalid_argument("rademacher_signs: need n_rows >= 0, k >= 1, ld >= k");
  if (n_rows == 0) return;
  if (out_addr == 0) throw std::invalid_argument("rademacher_signs: null output buffer");
  uint32_t* out = reinterpret_cast<uint32_t*>(out_addr);
  const uint32_t h1 = seed_hash(pid, seed);
  const uint32_t scale_bits = float_bits(scale);
  const bool avx2 = cpu_has_avx2();
  // Rows in chunks of 16 so each thread writes whole cache-line runs.
  const int64_t chunk = 16;
  const int64_t n_chunks = (n_rows + chunk - 1) / chunk;
  py::gil_scoped_release nogil;
#pragma omp parallel for schedule(static) if (n_rows * k >= (1 << 15))
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t r0 = c * chunk, r1 = std::min(n_rows, r0 + chunk);
#ifdef ICONS_FAST_X86
    if (avx2) {
      fill_rows_avx2(out, ld, h1, row_start, r0, r1, k, scale_bits);
      continue;
    }
#endif
    (void)avx2;
    fill_rows_generic(out, ld, h1, row_start, r0, r1, k, scale_bits);
  }
}

void rademacher_words(uintptr_t out_addr, uint32_t pid, uint64_t seed, uint64_t row_start, int64_t n_rows,
                      int64_t k) {
  if (n_rows < 0 || k < 1) throw std::invalid_argument("rademacher_words: need n_rows >= 0, k >= 1");
  if (n_rows == 0) return;
  if (out_addr == 0) throw std::invalid_argument("rademacher_words: null output buffer");
  uint32_t* out = reinterpret_cast<uint32_t*>(out_addr);
  const uint32_t h1 = seed_hash(pid, seed);
  const int64_t n_words = (k + 31) / 32;
  for (int64_t r = 0; r < n_rows; ++r) {
    const uint32_t base = row_base(h1, row_start + static_cast<uint64_t>(r));
    for (int64_t w = 0; w < n_words; ++w) out[r * n_words + w] = fmix32(base ^ static_cast<uint32_t>(w));
  }
}

// ------------------------------------------------- fused projection (4 Russians)

// Table of all 256 signed sums of 8 rows: T[p][b] = sum_r (bit r of p ? -1 : +1) * gr[r][b].
// Built incrementally: clearing the lowest set bit r of p turns -g_r back into +g_r.
inline void build_table(const float* gr /*[8][bp]*/, int64_t bp, float* table /*[256][bp]*/) {
  for (int64_t b = 0; b < bp; ++b) {
    float s = 0.f;
    for (int r = 0; r < 8; ++r) s += gr[r * bp + b];
    table[b] = s;
  }
  for (int p = 1; p < 256; ++p) {
    const int r = __builtin_ctz(static_cast<unsigned>(p));
    const float* src = table + static_cast<int64_t>(p & (p - 1)) * bp;
    const float* g = gr + r * bp;
    float* dst = table + static_cast<int64_t>(p) * bp;
    for (int64_t b = 0; b < bp; ++b) dst[b] = src[b] - 2.f * g[b];
  }
}

// Copy 8 rows (r0 .. r0+8, zero past n_rows) of the batch block [b0, b0+bn) of g into gr[8][bp].
inline void gather_rows(const float* g, int64_t ld_g, int64_t b0, int64_t bn, int64_t bp, int64_t r0, int64_t n_rows,
                        float* gr) {
  std::fill(gr, gr + 8 * bp, 0.f);
  for (int r = 0; r < 8 && r0 + r < n_rows; ++r)
    for (int64_t b = 0; b < bn; ++b) gr[r * bp + b] = g[(b0 + b) * ld_g + r0 + r];
}

inline void row_bases8(uint32_t h1, uint64_t row_start, int64_t r0, uint32_t* base) {
  for (int r = 0; r < 8; ++r) base[r] = row_base(h1, row_start + static_cast<uint64_t>(r0 + r));
}

// One thread's share: words [w0, w1) (columns [32*w0, min(k, 32*w1))) for all rows, batch block of
// width bp (a multiple of 8). acc[(j - 32*w0)][b] accumulates the unscaled sums.
void accumulate_generic(const float* g, int64_t ld_g, int64_t b0, int64_t bn, int64_t bp, int64_t n_rows, uint32_t h1,
                        uint64_t row_start, int64_t k, int64_t w0, int64_t w1, float* acc, float* gr, float* table) {
  uint32_t base[8];
  for (int64_t r0 = 0; r0 < n_rows; r0 += 8) {
    gather_rows(g, ld_g, b0, bn, bp, r0, n_rows, gr);
    build_table(gr, bp, table);
    row_bases8(h1, row_start, r0, base);
    for (int64_t w = w0; w < w1; ++w) {
      uint32_t h[8];
      for (int r = 0; r < 8; ++r) h[r] = fmix32(base[r] ^ static_cast<uint32_t>(w));
      const int nb = static_cast<int>(std::min<int64_t>(32, k - 32 * w));
      for (int b = 0; b < nb; ++b) {
        unsigned p = 0;
        for (int r = 0; r < 8; ++r) p |= ((h[r] >> b) & 1u) << r;
        float* a = acc + (32 * (w - w0) + b) * bp;
        const float* t = table + static_cast<int64_t>(p) * bp;
        for (int64_t q = 0; q < bp; ++q) a[q] += t[q];
      }
    }
  }
}

#ifdef ICONS_FAST_X86
__attribute__((target("avx2"))) inline __m256i fmix32_v(__m256i h) {
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int>(kFmixC1)));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 13));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int>(kFmixC2)));
  return _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
}

template <int BP>  // BP = batch block width (multiple of 8); 0 means runtime bp
__attribute__((target("avx2"))) void accumulate_avx2(const float* g, int64_t ld_g, int64_t b0, int64_t bn,
                                                     int64_t bp_rt, int64_t n_rows, uint32_t h1, uint64_t row_start,
                                                     int64_t k, int64_t w0, int64_t w1, float* acc, float* gr,
                                                     float* table) {
  const int64_t bp = BP ? BP : bp_rt;
  alignas(32) uint32_t base[8];
  for (int64_t r0 = 0; r0 < n_rows; r0 += 8) {
    gather_rows(g, ld_g, b0, bn, bp, r0, n_rows, gr);
    build_table(gr, bp, table);
    row_bases8(h1, row_start, r0, base);
    const __m256i bv = _mm256_load_si256(reinterpret_cast<const __m256i*>(base));
    for (int64_t w = w0; w < w1; ++w) {
      // Lane r holds the hash word of row r0 + r; bit b of every lane, read with movemask after
      // shifting it to the sign position, is column 32*w + b's 8-row sign pattern.
      __m256i hv = fmix32_v(_mm256_xor_si256(bv, _mm256_set1_epi32(static_cast<int>(w))));
      const int nb = static_cast<int>(std::min<int64_t>(32, k - 32 * w));
      float* aw = acc + 32 * (w - w0) * bp;
      for (int b = 31; b >= 0; --b) {
        const unsigned p = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(hv)));
        hv = _mm256_add_epi32(hv, hv);
        if (b >= nb) continue;
        float* a = aw + b * bp;
        const float* t = table + static_cast<int64_t>(p) * bp;
        for (int64_t q = 0; q < bp; q += 8)
          _mm256_storeu_ps(a + q, _mm256_add_ps(_mm256_loadu_ps(a + q), _mm256_loadu_ps(t + q)));
      }
    }
  }
}
#endif

void project_accumulate(uintptr_t out_addr, int64_t ld_out, uintptr_t g_addr, int64_t ld_g, int64_t batch,
                        int64_t n_rows, uint32_t pid, uint64_t seed, uint64_t row_start, int64_t k, float scale) {
  if (batch < 0 || n_rows < 0 || k < 1 || ld_out < k || ld_g < n_rows)
    throw std::invalid_argument("project_accumulate: need batch, n_rows >= 0, k >= 1, ld_out >= k, ld_g >= n_rows");
  if (batch == 0 || n_rows == 0) return;
  if (out_addr == 0 || g_addr == 0) throw std::invalid_argument("project_accumulate: null buffer");
  float* out = reinterpret_cast<float*>(out_addr);
  const float* g = reinterpret_cast<const float*>(g_addr);
  const uint32_t h1 = seed_hash(pid, seed);
  const int64_t n_words = (k + 31) / 32;
  const bool avx2 = cpu_has_avx2();
  // Batch blocks of at most 32 keep one table (256 x 32 floats = 32 KB) near L1 and a
  // thread's accumulator (its columns x 32 floats) in L2.
  const int64_t kBlock = 32;
  // Threads split the columns: no reduction, each thread hashes only its words and
  // rebuilds the (cheap) tables; a few words per thread at least, so tables stay amortised.
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(max_threads(), n_words / 4)));
  py::gil_scoped_release nogil;
#pragma omp parallel num_threads(nt)
  {
#ifdef _OPENMP
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
#else
    const int tid = 0, nth = 1;
#endif
    const int64_t w0 = n_words * tid / nth, w1 = n_words * (tid + 1) / nth;
    const int64_t c0 = 32 * w0, c1 = std::min(k, 32 * w1);
    std::vector<float> gr(8 * kBlock), table(256 * kBlock), acc;
    for (int64_t b0 = 0; b0 < batch && w1 > w0; b0 += kBlock) {
      const int64_t bn = std::min(kBlock, batch - b0);
      const int64_t bp = (bn + 7) / 8 * 8;
      acc.assign(static_cast<size_t>(32 * (w1 - w0) * bp), 0.f);
#ifdef ICONS_FAST_X86
      if (avx2) {
        if (bp == 16)
          accumulate_avx2<16>(g, ld_g, b0, bn, bp, n_rows, h1, row_start, k, w0, w1, acc.data(), gr.data(), table.data());
        else if (bp == 32)
          accumulate_avx2<32>(g, ld_g, b0, bn, bp, n_rows, h1, row_start, k, w0, w1, acc.data(), gr.data(), table.data());
        else
          accumulate_avx2<0>(g, ld_g, b0, bn, bp, n_rows, h1, row_start, k, w0, w1, acc.data(), gr.data(), table.data());
      } else
#endif
      {
        (void)avx2;
        accumulate_generic(g, ld_g, b0, bn, bp, n_rows, h1, row_start, k, w0, w1, acc.data(), gr.data(), table.data());
      }
      for (int64_t b = 0; b < bn; ++b) {
        float* o = out + (b0 + b) * ld_out;
        for (int64_t j = c0; j < c1; ++j) o[j] += scale * acc[(j - c0) * bp + b];
      }
    }
  }
}

}  // namespace

void register_project(py::module_& m) {
  m.def("fnv1a32", &fnv1a32, py::arg("name"), "FNV-1a 32-bit hash of the UTF-8 bytes of name (the parameter id).");
  m.def("cpu_has_avx2", &cpu_has_avx2, "True when the AVX2 paths of the project op run on this CPU.");
  m.def("rademacher_words", &rademacher_words, py::arg("out_addr"), py::arg("pid"), py::arg("seed"),
        py::arg("row_start"), py::arg("n_rows"), py::arg("k"),
        "Fill uint32 [n_rows, ceil(k/32)] at out_addr with the contract's hash words.");
  m.def("rademacher_signs", &rademacher_signs, py::arg("out_addr"), py::arg("ld"), py::arg("pid"), py::arg("seed"),
        py::arg("row_start"), py::arg("n_rows"), py::arg("k"), py::arg("scale"),
        "Fill float32 [n_rows, ld] at out_addr with R[row_start:row_start+n_rows, :k] * scale (+-scale).");
  m.def("project_accumulate", &project_accumulate, py::arg("out_addr"), py::arg("ld_out"), py::arg("g_addr"),
        py::arg("ld_g"), py::arg("batch"), py::arg("n_rows"), py::arg("pid"), py::arg("seed"), py::arg("row_start"),
        py::arg("k"), py::arg("scale"),
        "out[b, :k] += scale * g[b, :n_rows] @ R[row_start:row_start+n_rows, :k], R never stored (float32).");
}
