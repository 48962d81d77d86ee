// Host side of the CUDA kernels' launches: the number of slices per row
// (see block_reduce.cuh) from the kernels' occupancy, the grid size check,
// scratch pointers, and the launcher that runs a kernel on the current stream
// and checks the launch.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "block_reduce.cuh"

namespace imaml_ext::cuda {

// Shortest slice worth a block of its own.
constexpr int64_t kMinSlice = 4096;

// query() for this key and device, computed on the first call and kept:
// device attributes and occupancy never change while the process runs.
template <typename Query>
int64_t cached_per_device(const void* key, c10::DeviceIndex device, const Query& query) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, c10::DeviceIndex>, int64_t> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  auto [it, inserted] = cache.try_emplace({key, device}, 0);
  if (inserted) it->second = query();
  return it->second;
}

// Multiprocessors of a device, asked once per device.
inline int64_t multiprocessor_count(c10::DeviceIndex device) {
  return cached_per_device(nullptr, device, [&] {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    return static_cast<int64_t>(sms);
  });
}

// Blocks of kThreads threads of `kernel` that one multiprocessor of `device`
// (the current device) holds at once, as its registers and shared memory
// allow, from the occupancy API, asked once per kernel and device.
inline int64_t resident_blocks_per_sm(const void* kernel, c10::DeviceIndex device) {
  return cached_per_device(kernel, device, [&] {
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, 0));
    return static_cast<int64_t>(std::max(blocks, 1));
  });
}

// Blocks that `kernels` (an op's launch sequence, which shares one slicing)
// keep resident on `device` at once: the least occupied kernel's count.
template <typename... Kernels>
int64_t resident_blocks(c10::DeviceIndex device, Kernels... kernels) {
  const int64_t per_sm =
      std::min({resident_blocks_per_sm(reinterpret_cast<const void*>(kernels), device)...});
  return per_sm * multiprocessor_count(device);
}

// Slices per row: as many as fill one wave of `resident` blocks (T * nb <=
// resident, so no partial second wave leaves a slow tail), but no slice
// shorter than kMinSlice. A result of 1 (one block per row) lets an op finish
// a row inside a single kernel.
inline int64_t slices_per_row(int64_t T, int64_t P, int64_t resident) {
  const int64_t by_size = std::max<int64_t>(1, (P + kMinSlice - 1) / kMinSlice);
  const int64_t by_grid = std::max<int64_t>(1, resident / std::max<int64_t>(T, 1));
  return std::min(by_size, by_grid);
}

// Checks that a launch over T rows of nb slices (T * nb blocks) fits a grid;
// the launch sequences (*_kernels.cuh) rely on it.
inline void check_grid_size(int64_t T, int64_t nb) {
  TORCH_CHECK(
      T * nb <= std::numeric_limits<int>::max(),
      "imaml_ext: too many tasks for one launch (T = ", std::to_string(T), ")");
}

// Where an op over the rows of a [T, P] tensor runs: T rows of nb slices
// each (T * nb blocks), sized for the op's kernels, with the tensor's device
// current for as long as the RowGrid lives. T == 0 needs no launch (nb = 0).
struct RowGrid {
  template <typename... Kernels>
  RowGrid(const at::Tensor& rows, Kernels... kernels)
      : guard(rows.device()),
        T(rows.size(0)),
        P(rows.size(1)),
        nb(T > 0 ? slices_per_row(T, P, resident_blocks(rows.device().index(), kernels...))
                 : 0) {
    check_grid_size(T, nb);
  }

  const c10::cuda::CUDAGuard guard;
  const int64_t T;
  const int64_t P;
  const int64_t nb;
};

// t's data, or null for an undefined tensor (scratch that a launch does not
// need).
template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// Runs kernel<<<blocks, kThreads, 0, stream>>>(args...) and checks the
// launch. The ops' launch sequences (the *_kernels.cuh headers) take it as a
// parameter, so that the host emulation in tests/native runs the same
// sequences.
struct StreamLauncher {
  cudaStream_t stream;

  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), unsigned blocks, Args... args) const {
    kernel<<<blocks, kThreads, 0, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace imaml_ext::cuda
