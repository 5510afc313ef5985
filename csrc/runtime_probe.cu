// The CUDA runtime probe behind icons_fast.has_cuda_ext().
//
// The extension links the static CUDA runtime of the nvcc that built it, so
// "compiled with CUDA" does not mean "runs here": the driver may be older than
// that runtime (cudaErrorInsufficientDriver), or the GPU's architecture may
// have no kernel image in this build (ICONS_FAST_CUDA_ARCHS did not cover it,
// and no embedded PTX is old enough to JIT). One launch of a one-thread kernel,
// compiled with the same architecture flags as the real kernels, tells.
#include <cuda_runtime.h>

#include <string>

#include "runtime_probe.h"

namespace icons_fast {
namespace {

constexpr int kProbeValue = 0x1C0F;

__global__ void probe_kernel(int* out) { *out = kProbeValue; }

std::string version_string(int v) {  // 13000 -> "13.0"; 0 -> "none"
  if (v <= 0) return "none";
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

}  // namespace

std::string current_device_arch() {
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
    cudaGetLastError();
    return "sm_?";
  }
  return "sm_" + std::to_string(major) + std::to_string(minor);
}

std::string cuda_runtime_status() {
  int runtime = 0, driver = 0;
  cudaRuntimeGetVersion(&runtime);
  cudaDriverGetVersion(&driver);  // 0 when no driver is installed
  const std::string versions = " (CUDA runtime " + version_string(runtime) + " linked in, driver supports " +
                               version_string(driver) + ", kernels built for \"" ICONS_FAST_CUDA_ARCH_LIST "\")";
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return std::string("cudaGetDeviceCount: ") + cudaGetErrorString(e) + versions;
  }
  if (count == 0) return "no CUDA device visible" + versions;
  const std::string where = " on " + current_device_arch();
  int* buf = nullptr;
  e = cudaMalloc(&buf, sizeof(int));
  if (e != cudaSuccess) {
    cudaGetLastError();
    return std::string("cudaMalloc") + where + ": " + cudaGetErrorString(e) + versions;
  }
  probe_kernel<<<1, 1>>>(buf);
  e = cudaGetLastError();
  int got = 0;
  if (e == cudaSuccess) e = cudaMemcpy(&got, buf, sizeof(int), cudaMemcpyDeviceToHost);
  cudaFree(buf);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return std::string("probe kernel launch") + where + ": " + cudaGetErrorString(e) + versions;
  }
  if (got != kProbeValue) return "probe kernel" + where + " wrote " + std::to_string(got) + ", not the expected value" + versions;
  return "";
}

}  // namespace icons_fast
