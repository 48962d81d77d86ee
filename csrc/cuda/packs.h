// Packed (vectorized) access to a slice [begin, end) of one or more rows.
//
// A pack is 16 bytes of consecutive elements (4 floats or 2 doubles), loaded
// or stored with one 128-bit instruction when its address is 16-byte aligned.
// A slice is cut into three ranges:
//   [begin, head_end)     elements before the first aligned pack
//   [head_end, body_end)  whole aligned packs
//   [body_end, end)       the elements after the last whole pack
// Packs are used only when every row pointer a kernel touches has the same
// address modulo 16 at `begin`, so that one cut aligns them all. Row t of
// several [T, P] buffers fresh from the allocator always qualifies, whatever P.
// A row shared by all tasks (theta of prox_sgd_step_) is aligned like row t
// only when t*P is a multiple of the pack width; it is left out of the cut and
// read with load_any. Views that start at different storage offsets
// may never be aligned alike: such slices are visited element by element.
//
// Plain C++ when not compiled by nvcc, so that the cut and the visiting order
// are tested on the host (tests/native/packs_test.cpp).
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define IMAML_EXT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define IMAML_EXT_HOST_DEVICE inline
#endif

namespace imaml_ext::cuda {

constexpr int kPackBytes = 16;

// Elements per pack: 4 for float, 2 for double.
template <typename scalar_t>
IMAML_EXT_HOST_DEVICE constexpr int pack_width() {
  return kPackBytes / static_cast<int>(sizeof(scalar_t));
}

// N consecutive elements, aligned to their total size, so that a pack of 16
// bytes is read and written as one vector.
template <typename scalar_t, int N>
struct alignas(sizeof(scalar_t) * N) Pack {
  scalar_t v[N];
};

// The number of elements one visit covers (1 or the pack width).
template <int N>
using Width = std::integral_constant<int, N>;

IMAML_EXT_HOST_DEVICE unsigned misalignment(const void* ptr) {
  return static_cast<unsigned>(reinterpret_cast<std::uintptr_t>(ptr) % kPackBytes);
}

// A GPU faults on a misaligned vector access; the host emulation of the
// kernels (tests/native/cuda_emulation.h) defines this hook to do the same.
#if defined(IMAML_EXT_EMULATED_ALIGNMENT_FAULT)
#define IMAML_EXT_CHECK_PACK_ALIGNMENT(ptr, bytes) IMAML_EXT_EMULATED_ALIGNMENT_FAULT(ptr, bytes)
#else
#define IMAML_EXT_CHECK_PACK_ALIGNMENT(ptr, bytes)
#endif

template <int N, typename scalar_t>
IMAML_EXT_HOST_DEVICE Pack<scalar_t, N> load(const scalar_t* ptr) {
  IMAML_EXT_CHECK_PACK_ALIGNMENT(ptr, sizeof(Pack<scalar_t, N>));
  return *reinterpret_cast<const Pack<scalar_t, N>*>(ptr);
}

// N elements from a row that is not part of the cut: one packed load where
// ptr happens to be aligned, else one element at a time.
template <int N, typename scalar_t>
IMAML_EXT_HOST_DEVICE Pack<scalar_t, N> load_any(const scalar_t* ptr) {
  if constexpr (N > 1) {
    if (misalignment(ptr) != 0) {
      Pack<scalar_t, N> pack;
      for (int k = 0; k < N; ++k) pack.v[k] = ptr[k];
      return pack;
    }
  }
  return load<N>(ptr);
}

template <int N, typename scalar_t>
IMAML_EXT_HOST_DEVICE void store(scalar_t* ptr, const Pack<scalar_t, N>& pack) {
  IMAML_EXT_CHECK_PACK_ALIGNMENT(ptr, sizeof(Pack<scalar_t, N>));
  *reinterpret_cast<Pack<scalar_t, N>*>(ptr) = pack;
}

// The cut of a slice for packs of W elements.
template <int W>
struct PackedSlice {
  int64_t begin, head_end, body_end, end;
};

// The cut of [begin, end) for rows whose element i is row[i] in each of the
// given row pointers (all of element type scalar_t, const or not).
template <typename scalar_t, typename... Rows>
IMAML_EXT_HOST_DEVICE PackedSlice<pack_width<scalar_t>()> packed_slice(
    int64_t begin, int64_t end, const scalar_t* first, Rows... rest) {
  constexpr int64_t W = pack_width<scalar_t>();
  const unsigned mis = misalignment(first + begin);
  const bool shared = ((misalignment(rest + begin) == mis) && ...);
  if (!shared || mis % sizeof(scalar_t) != 0 || end - begin < W) {
    return {begin, end, end, end};
  }
  const int64_t head = mis == 0 ? 0 : (kPackBytes - mis) / static_cast<int64_t>(sizeof(scalar_t));
  const int64_t head_end = begin + head < end ? begin + head : end;
  const int64_t body_end = head_end + (end - head_end) / W * W;
  return {begin, head_end, body_end, end};
}

// Calls f(i, Width<1>{}) for every element of the head and the tail and
// f(i, Width<W>{}) for every pack of the body (i: its first element). Thread
// `tid` of `nthreads` takes every nthreads-th element or pack of each range,
// so that consecutive threads touch consecutive memory.
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <int W, typename F>
IMAML_EXT_HOST_DEVICE void for_each_pack(const PackedSlice<W>& s, int64_t tid,
                                         int64_t nthreads, F&& f) {
  for (int64_t i = s.begin + tid; i < s.head_end; i += nthreads) f(i, Width<1>{});
  for (int64_t i = s.head_end + tid * W; i < s.body_end; i += nthreads * W) f(i, Width<W>{});
  for (int64_t i = s.body_end + tid; i < s.end; i += nthreads) f(i, Width<1>{});
}

}  // namespace imaml_ext::cuda
