// Blocked influence products with fused per-segment reductions (CUDA path).
//
//   out[i, s] += weight * R_{j in [offsets[s], offsets[s+1])} <x_i, t_j>
//
// One CTA owns BM = 64 train rows and sweeps all M targets in BN = 64-column
// tiles. Each tile's [64, 64] dot products are computed into shared memory
// (fp32 accumulation) and folded at once into per-row running state held in
// registers (sum / max / count) or shared memory (top-m list), so the N x M
// product never exists. Columns arrive in increasing order, so each row only
// ever has one open segment; it is flushed into `out` when the column index
// passes the segment's end.
//
// Two tile engines:
//   * wmma (tensor cores, fp16 / bf16 train rows): 4 warps, each a 32 x 32
//     sub-tile of 2 x 2 16x16x16 fragments; targets are rounded to the train
//     dtype on their way into shared memory (that is the operand type of the
//     tensor-core product; accumulation stays fp32).
//   * simt (fp32 / int8 train rows, or GPUs without the needed tensor cores):
//     256 threads, each a 4 x 4 register tile over a BK-deep shared-memory slab.
// Before each launch the host asks the runtime which image it will run
// (cudaFuncGetAttributes): no image for this GPU is a clear error, an image
// from too old an architecture for tensor cores takes the simt engine.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "influence.h"
#include "runtime_probe.h"

namespace icons_fast {
namespace {

constexpr int BM = 64;  // train rows per CTA
constexpr int BN = 64;  // target columns per tile
constexpr int BK = 32;  // k slab staged in shared memory
constexpr int CPAD = 4; // Cs row padding (floats): keeps float4 / wmma alignment

struct Params {
  const void* train;
  const float* scale;  // int8 only, else nullptr
  const void* targets;
  const int64_t* offsets;
  float* out;
  int64_t n, k, m, S;
  int reduction, topm;
  float threshold, weight;
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(int8_t v) { return static_cast<float>(v); }

template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// ------------------------------------------------------------- row state ---
// The open segment of one train row, owned by one thread across all tiles.
struct RowState {
  int64_t seg, seg_end;
  double sum;
  float best;
  int64_t cnt;
  int tsz, tmin_i;
  float tmin;
};

__device__ __forceinline__ void state_open(RowState& st, int64_t seg, const Params& p) {
  st.seg = seg;
  st.seg_end = p.offsets[seg + 1];
  st.sum = 0.0;
  st.best = -INFINITY;
  st.cnt = 0;
  st.tsz = 0;
  st.tmin_i = 0;
  st.tmin = INFINITY;
}

// Fold one dot product into the open segment. `top` is this row's top-m list
// (unsorted, size tsz, with its minimum tracked so most values cost one compare).
__device__ __forceinline__ void state_fold(RowState& st, float v, float* top, const Params& p) {
  switch (p.reduction) {
    case kMean: st.sum += v; break;
    case kMax: st.best = v > st.best ? v : st.best; break;
    case kCount: st.cnt += v > p.threshold; break;
    default: {  // kTopM
      if (st.tsz < p.topm) {
        top[st.tsz++] = v;
        if (st.tsz == p.topm) {
          st.tmin = top[0], st.tmin_i = 0;
          for (int t = 1; t < st.tsz; ++t)
            if (top[t] < st.tmin) st.tmin = top[t], st.tmin_i = t;
        }
      } else if (v > st.tmin) {
        top[st.tmin_i] = v;
        st.tmin = top[0], st.tmin_i = 0;
        for (int t = 1; t < st.tsz; ++t)
          if (top[t] < st.tmin) st.tmin = top[t], st.tmin_i = t;
      }
    }
  }
}

// out[row, seg] += weight * value(open segment).
__device__ __forceinline__ void state_flush(const RowState& st, const float* top, int64_t row, const Params& p) {
  const int64_t len = st.seg_end - p.offsets[st.seg];
  double v;
  switch (p.reduction) {
    case kMean: v = st.sum / static_cast<double>(len); break;
    case kMax: v = st.best; break;
    case kCount: v = static_cast<double>(st.cnt); break;
    default: {
      double acc = 0.0;
      for (int t = 0; t < st.tsz; ++t) acc += top[t];
      v = acc / st.tsz;
    }
  }
  float& o = p.out[row * p.S + st.seg];
  o = static_cast<float>(o + static_cast<double>(p.weight) * v);
}

// Fold the real columns of tile [c0, c0 + BN) of local row r (Cs row-major).
__device__ void fold_tile(const float* Cs, int r, int64_t c0, RowState& st, float* top, const Params& p) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(BM) + r;
  const float* crow = Cs + r * (BN + CPAD);
  for (int c = 0; c < BN && c0 + c < p.m; ++c) {
    while (c0 + c >= st.seg_end) {  // segments are non-empty, so this advances to the right one
      if (row < p.n) state_flush(st, top, row, p);
      state_open(st, st.seg + 1, p);
    }
    state_fold(st, crow[c], top, p);
  }
}

// ------------------------------------------------------------ simt tile ---
template <class TA, class TB>
__global__ void __launch_bounds__(256) segment_reduce_simt(Params p) {
  __shared__ __align__(16) float As[BK][BM + CPAD];  // k-major: As[kk][row]
  __shared__ __align__(16) float Bs[BK][BN + CPAD];  // Bs[kk][col]
  __shared__ __align__(16) float Cs[BM][BN + CPAD];
  __shared__ float topbuf[BM][kCudaMaxTopM];
  const TA* A = static_cast<const TA*>(p.train);
  const TB* B = static_cast<const TB*>(p.targets);
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t row0 = blockIdx.x * static_cast<int64_t>(BM);
  RowState st;
  if (tid < BM) state_open(st, 0, p);

  for (int64_t c0 = 0; c0 < p.m; c0 += BN) {
    float acc[4][4] = {};
    for (int64_t k0 = 0; k0 < p.k; k0 += BK) {
      for (int e = tid; e < BM * BK; e += 256) {  // consecutive threads read consecutive k
        const int r = e / BK, kk = e % BK;
        const int64_t gr = row0 + r, gk = k0 + kk;
        float v = 0.0f;
        if (gr < p.n && gk < p.k) {
          v = to_float(A[gr * p.k + gk]);
          if (p.scale) v *= p.scale[gr];
        }
        As[kk][r] = v;
        const int64_t gc = c0 + r;  // BN == BM: the same loop stages the target slab
        Bs[kk][r] = (gc < p.m && gk < p.k) ? to_float(B[gc * p.k + gk]) : 0.0f;
      }
      __syncthreads();
#pragma unroll 8
      for (int kk = 0; kk < BK; ++kk) {
        const float4 a = *reinterpret_cast<const float4*>(&As[kk][ty * 4]);
        const float4 b = *reinterpret_cast<const float4*>(&Bs[kk][tx * 4]);
        const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) Cs[ty * 4 + i][tx * 4 + j] = acc[i][j];
    __syncthreads();
    if (tid < BM) fold_tile(&Cs[0][0], tid, c0, st, topbuf[tid], p);
    // The next tile writes Cs only after its k loop's barriers, which the
    // folding threads also pass, so no extra barrier is needed here.
  }
  if (tid < BM && row0 + tid < p.n) state_flush(st, topbuf[tid], row0 + tid, p);
}
static_assert(BM == BN, "segment_reduce_simt stages A and B slabs in one loop");

// ------------------------------------------------------------ wmma tile ---
template <class T16, class TB>
__device__ void wmma_body(const Params& p) {
  using namespace nvcuda;
  constexpr int LDS = BK + 8;  // 16-bit elements; multiple of 8 as wmma requires
  __shared__ __align__(128) T16 As[BM][LDS];  // row-major, k contiguous
  __shared__ __align__(128) T16 Bs[BN][LDS];  // = B^T column-major
  __shared__ __align__(128) float Cs[BM][BN + CPAD];
  __shared__ float topbuf[BM][kCudaMaxTopM];
  const T16* A = static_cast<const T16*>(p.train);
  const TB* B = static_cast<const TB*>(p.targets);
  const int tid = threadIdx.x, warp = tid / 32, wm = warp / 2, wn = warp % 2;
  const int64_t row0 = blockIdx.x * static_cast<int64_t>(BM);
  RowState st;
  if (tid < BM) state_open(st, 0, p);
  const T16 zero = from_float<T16>(0.0f);

  for (int64_t c0 = 0; c0 < p.m; c0 += BN) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
    for (int64_t k0 = 0; k0 < p.k; k0 += BK) {
      for (int e = tid; e < BM * BK; e += 128) {
        const int r = e / BK, kk = e % BK;
        const int64_t gr = row0 + r, gc = c0 + r, gk = k0 + kk;
        As[r][kk] = (gr < p.n && gk < p.k) ? A[gr * p.k + gk] : zero;
        T16 b = zero;
        if (gc < p.m && gk < p.k) {
          if constexpr (std::is_same<TB, T16>::value) b = B[gc * p.k + gk];
          else b = from_float<T16>(to_float(B[gc * p.k + gk]));
        }
        Bs[r][kk] = b;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T16, wmma::row_major> a[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T16, wmma::col_major> b[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], &As[wm * 32 + i * 16][kk], LDS);
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], &Bs[wn * 32 + j * 16][kk], LDS);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(&Cs[wm * 32 + i * 16][wn * 32 + j * 16], acc[i][j], BN + CPAD, wmma::mem_row_major);
    __syncthreads();
    if (tid < BM) fold_tile(&Cs[0][0], tid, c0, st, topbuf[tid], p);
  }
  if (tid < BM && row0 + tid < p.n) state_flush(st, topbuf[tid], row0 + tid, p);
}

// fp16 fragments need sm_70, bf16 fragments sm_80. Older device passes
// compile a body that traps; the host launches this kernel only when the
// image the runtime picked was compiled for a new enough architecture
// (cudaFuncAttributes::ptxVersion, see launch_any), so the trap is a guard
// against silent zeros, never the plan.
template <class T16, class TB>
__global__ void __launch_bounds__(128) segment_reduce_wmma(Params p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 700
  if constexpr (std::is_same<T16, __nv_bfloat16>::value) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    wmma_body<T16, TB>(p);
#else
    __trap();
#endif
  } else {
    wmma_body<T16, TB>(p);
  }
#else
  __trap();
#endif
}
static_assert(BM == BN, "segment_reduce_wmma stages A and B slabs in one loop");

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("influence (cuda): ") + what + ": " + cudaGetErrorString(e));
}

using Kernel = void (*)(Params);

// The architecture this build's image of `k` was compiled for on the current
// device (10 * major + minor of its virtual architecture), or a clear error
// when the build has no image this GPU can run (e.g. sm_75 with the default
// "80;90" build: no sm_75 code, and compute_90 PTX cannot be JIT-compiled down).
int image_arch(Kernel k) {
  cudaFuncAttributes a{};
  const cudaError_t e = cudaFuncGetAttributes(&a, reinterpret_cast<const void*>(k));
  if (e != cudaSuccess) {
    cudaGetLastError();  // not sticky: clear it so the caller's next CUDA call is not blamed
    throw std::runtime_error(std::string("influence (cuda): this build has no kernel image for the GPU (") +
                             current_device_arch() + "; built for \"" ICONS_FAST_CUDA_ARCH_LIST "\"): " +
                             cudaGetErrorString(e) + ". Rebuild with ICONS_FAST_CUDA_ARCHS naming this GPU's "
                             "compute capability (pip install -e .), or use backend='torch'");
  }
  return a.ptxVersion;
}

// Tensor cores (wmma) for 16-bit train rows when both the device (cc) and the
// image the runtime picked (image_arch) reach `tc_arch` (70 fp16, 80 bf16);
// otherwise the simt engine, which every image can run.
template <class TA>
void launch_any(const Params& p, int target_dtype, int tc_arch, int cc, cudaStream_t s) {
  const unsigned grid = static_cast<unsigned>((p.n + BM - 1) / BM);
  if constexpr (std::is_same<TA, __half>::value || std::is_same<TA, __nv_bfloat16>::value) {
    if (cc >= tc_arch) {
      Kernel k = target_dtype == kF16 ? segment_reduce_wmma<TA, __half> : segment_reduce_wmma<TA, float>;
      if (image_arch(k) >= tc_arch) {
        k<<<grid, 128, 0, s>>>(p);
        return;
      }
    }
  }
  Kernel k = target_dtype == kF16 ? segment_reduce_simt<TA, __half> : segment_reduce_simt<TA, float>;
  image_arch(k);  // throws when there is no image for this GPU
  k<<<grid, 256, 0, s>>>(p);
}

}  // namespace

void segment_reduce_cuda(const void* train, int train_dtype, int64_t n, int64_t k, const float* scale,
                         const void* targets, int target_dtype, int64_t m, const int64_t* offsets,
                         int64_t n_segments, int reduction, int64_t topm, float threshold, float weight,
                         float* out, void* stream) {
  if (n <= 0) return;
  if (k <= 0 || m <= 0 || n_segments <= 0) throw std::invalid_argument("influence (cuda): empty k, targets or segments");
  if (target_dtype != kF32 && target_dtype != kF16) throw std::invalid_argument("influence (cuda): targets must be fp32 or fp16");
  if (reduction < kMean || reduction > kCount) throw std::invalid_argument("influence (cuda): bad reduction code");
  if (reduction == kTopM && (topm < 1 || topm > kCudaMaxTopM))
    throw std::invalid_argument("influence (cuda): top-m needs 1 <= m <= " + std::to_string(kCudaMaxTopM));
  if ((n + BM - 1) / BM > 0x7fffffffLL) throw std::invalid_argument("influence (cuda): too many train rows for one call");
  Params p{train, scale, targets, offsets, out, n, k, m, n_segments, reduction, static_cast<int>(topm), threshold, weight};
  int dev = 0, major = 0, minor = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "compute capability");
  check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev), "compute capability");
  const int cc = 10 * major + minor;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (train_dtype) {
    case kF32: launch_any<float>(p, target_dtype, 0, cc, s); break;
    case kF16: launch_any<__half>(p, target_dtype, 70, cc, s); break;
    case kBF16: launch_any<__nv_bfloat16>(p, target_dtype, 80, cc, s); break;
    case kI8:
      if (!scale) throw std::invalid_argument("influence (cuda): int8 train features need a scale");
      launch_any<int8_t>(p, target_dtype, 0, cc, s);
      break;
    default: throw std::invalid_argument("influence (cuda): bad train dtype code");
  }
  check(cudaGetLastError(), "kernel launch");
}

}  // namespace icons_fast
