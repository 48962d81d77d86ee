// Host emulation of the part of the CUDA execution model that imaml_ext's
// kernels use (csrc/cuda/*_kernels.cuh), so that tests run those kernels and
// their launch sequences on a machine without a GPU.
//
// Blocks of a launch run one after another. The threads of a block run as
// cooperative fibers (ucontext) that switch only at __syncthreads() and at warp
// shuffles; between two such points they run one after another, in thread
// order or, with `reversed`, in reverse thread order (and then blocks last to
// first too). A thread that reads what another writes without a barrier
// between them sees the write in one of the two orders and not in the other,
// so running both orders exposes the missing barrier, as does a block that
// depends on another block of the same launch. __syncthreads() must be
// reached by every thread of the block and a shuffle by every lane of the
// warp (as the full-mask shuffles of the kernels require): a barrier that some
// thread misses, e.g. because it returned early, is reported as a deadlock. A
// misaligned packed load or store faults, as on the hardware.
//
// Not modelled: __shared__ variables become function statics, zero at first
// and kept from block to block, where a GPU leaves them undefined at the start
// of each block; shuffle masks other than the full warp; memory ordering
// without barriers beyond the two orders above. Include this before the kernel
// headers; not for nvcc.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

using std::isfinite;
using std::sqrt;

// A misaligned access of `bytes` bytes faults, as on a GPU (see packs.h).
#define IMAML_EXT_EMULATED_ALIGNMENT_FAULT(ptr, bytes) \
  cuda_emulation::check_alignment(ptr, bytes, __FILE__, __LINE__)

struct EmulatedDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline EmulatedDim3 threadIdx, blockIdx, blockDim, gridDim;

namespace cuda_emulation {

constexpr int kWarpSize = 32;

inline void check_alignment(const void* ptr, size_t bytes, const char* file, int line) {
  if (reinterpret_cast<std::uintptr_t>(ptr) % bytes != 0) {
    std::fprintf(stderr, "cuda_emulation: misaligned %zu-byte access at %p (%s:%d)\n", bytes,
                 ptr, file, line);
    std::exit(4);
  }
}
constexpr size_t kStackBytes = 64 * 1024;

enum class Wait { kNone, kBlock, kWarp, kDone };

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  Wait wait = Wait::kNone;
};

// The threads of the block that is running, and the barrier bookkeeping.
struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  std::function<void()> body;
  int threads = 0, returned = 0, at_block_barrier = 0;
  std::vector<int> at_warp_barrier;
  // Two slots per thread, used by alternate shuffles: a lane that has moved on
  // to the next shuffle cannot overwrite a value another lane has yet to read.
  std::vector<uint64_t> shuffle_slots[2];
  std::vector<int> shuffle_parity;  // per thread
};

inline Block* g_block = nullptr;

inline int warp_size(const Block& b, int warp) {
  const int rest = b.threads - warp * kWarpSize;
  return rest < kWarpSize ? rest : kWarpSize;
}

// Waits at the block barrier (kBlock) or at this thread's warp barrier
// (kWarp); the last thread to arrive releases the others.
inline void arrive(Wait kind) {
  Block& b = *g_block;
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / kWarpSize;
  int& arrived = kind == Wait::kBlock ? b.at_block_barrier : b.at_warp_barrier[warp];
  const int expected = kind == Wait::kBlock ? b.threads : warp_size(b, warp);
  if (++arrived < expected) {
    b.fibers[tid].wait = kind;
    swapcontext(&b.fibers[tid].context, &b.scheduler);
    return;
  }
  arrived = 0;
  for (int i = 0; i < b.threads; ++i) {
    if (b.fibers[i].wait == kind && (kind == Wait::kBlock || i / kWarpSize == warp)) {
      b.fibers[i].wait = Wait::kNone;
    }
  }
}

inline void fiber_main() {
  g_block->body();
  Block& b = *g_block;
  b.fibers[threadIdx.x].wait = Wait::kDone;
  ++b.returned;
  // Returning resumes the scheduler (uc_link).
}

// Runs `body` as block `block` of `grid` blocks of `threads` threads.
inline void run_block(Block& b, unsigned block, unsigned grid, int threads, bool reversed,
                      std::function<void()> body) {
  b.fibers.resize(threads);
  b.body = std::move(body);
  b.threads = threads;
  b.returned = 0;
  b.at_block_barrier = 0;
  b.at_warp_barrier.assign((threads + kWarpSize - 1) / kWarpSize, 0);
  b.shuffle_slots[0].assign(threads, 0);
  b.shuffle_slots[1].assign(threads, 0);
  b.shuffle_parity.assign(threads, 0);
  blockIdx.x = block;
  gridDim.x = grid;
  blockDim.x = static_cast<unsigned>(threads);
  g_block = &b;
  for (Fiber& f : b.fibers) {
    f.stack.resize(kStackBytes);
    f.wait = Wait::kNone;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.data();
    f.context.uc_stack.ss_size = f.stack.size();
    f.context.uc_link = &b.scheduler;
    makecontext(&f.context, fiber_main, 0);
  }
  // Round robin over the runnable threads until all have returned.
  while (b.returned < threads) {
    bool ran = false;
    for (int j = 0; j < threads; ++j) {
      const int i = reversed ? threads - 1 - j : j;
      if (b.fibers[i].wait != Wait::kNone) continue;
      ran = true;
      threadIdx.x = static_cast<unsigned>(i);
      swapcontext(&b.scheduler, &b.fibers[i].context);
    }
    if (!ran) {
      std::fprintf(stderr,
                   "cuda_emulation: deadlock in block %u: %d of %d threads returned, %d wait "
                   "at __syncthreads, the rest at a warp shuffle\n",
                   block, b.returned, threads, b.at_block_barrier);
      std::exit(3);
    }
  }
  g_block = nullptr;
}

// Calls kernel(args...) as a launch of `blocks` blocks of Threads threads;
// the interface of StreamLauncher in csrc/cuda/common.cuh.
template <int Threads>
struct Launcher {
  int64_t* launches = nullptr;  // counts launches when set
  bool reversed = false;        // blocks last to first, threads last to first

  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), unsigned blocks, Args... args) const {
    static Block b;  // the fibers' stacks are reused from launch to launch
    for (unsigned i = 0; i < blocks; ++i) {
      const unsigned k = reversed ? blocks - 1 - i : i;
      run_block(b, k, blocks, Threads, reversed, [&] { kernel(args...); });
    }
    if (launches != nullptr) ++*launches;
  }
};

}  // namespace cuda_emulation

inline void __syncthreads() { cuda_emulation::arrive(cuda_emulation::Wait::kBlock); }

// Value of lane (this lane + delta) of the warp, or this lane's own value
// past the warp's end (as on the hardware). All lanes take part.
template <typename T>
T __shfl_down_sync(unsigned /*mask*/, T v, int delta) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 8 bytes");
  using cuda_emulation::g_block;
  using cuda_emulation::kWarpSize;
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % kWarpSize;
  std::vector<uint64_t>& slots = g_block->shuffle_slots[g_block->shuffle_parity[tid]];
  g_block->shuffle_parity[tid] ^= 1;
  std::memcpy(&slots[tid], &v, sizeof(T));
  cuda_emulation::arrive(cuda_emulation::Wait::kWarp);
  T out = v;
  if (lane + delta < kWarpSize && tid + delta < g_block->threads) {
    std::memcpy(&out, &slots[tid + delta], sizeof(T));
  }
  return out;
}
