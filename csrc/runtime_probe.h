// Can the CUDA path run in this process? A probe for icons_fast.has_cuda_ext()
// (implemented in runtime_probe.cu, compiled only with nvcc).
#pragma once
#include <string>

// The architecture list the .cu files were compiled for (ICONS_FAST_CUDA_ARCHS
// at build time, passed by setup.py); "unknown" in hand-made builds.
#ifndef ICONS_FAST_CUDA_ARCH_LIST
#define ICONS_FAST_CUDA_ARCH_LIST "unknown"
#endif

namespace icons_fast {

#ifdef ICONS_FAST_WITH_CUDA
// "" when a tiny kernel of this build runs on the current device; otherwise one
// line saying why not (no device, a driver older than the runtime linked in,
// no kernel image for this GPU's architecture), with the versions involved.
std::string cuda_runtime_status();

// "sm_XY" of the current device (for messages); "sm_?" when it cannot be read.
std::string current_device_arch();
#endif

}  // namespace icons_fast
