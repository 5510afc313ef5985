// Shared declarations of the influence op: dtype / reduction codes and the
// CUDA launcher (implemented in influence_cuda.cu, compiled only with nvcc).
//
// The op: for train rows x_i ([N, k]) and target rows t_j ([M, k]) cut into
// S segments by offsets ([S+1], offsets[0] = 0, offsets[S] = M),
//   out[i, s] += weight * R_{j in [offsets[s], offsets[s+1])} <x_i, t_j>
// where R is one of mean, max, top-m mean, count(> threshold).
#pragma once
#include <cstdint>

namespace icons_fast {

// Element types. The codes are part of the Python <-> C++ contract; the
// wrapper reads them from _C.influence_codes(), never hard-codes them.
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kI8 = 3 };
enum Reduction : int { kMean = 0, kMax = 1, kTopM = 2, kCount = 3 };

// Largest m the CUDA top-m reduction keeps per (row, segment) in shared memory.
constexpr int kCudaMaxTopM = 32;

#ifdef ICONS_FAST_WITH_CUDA
// All pointers are device pointers; offsets is int64 [S+1] on the device.
// `stream` is a cudaStream_t (0 = legacy default stream). Throws
// std::runtime_error with the CUDA error string on failure.
void segment_reduce_cuda(const void* train, int train_dtype, int64_t n, int64_t k, const float* scale,
                         const void* targets, int target_dtype, int64_t m, const int64_t* offsets,
                         int64_t n_segments, int reduction, int64_t topm, float threshold, float weight,
                         float* out, void* stream);
#endif

}  // namespace icons_fast
