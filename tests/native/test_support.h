// Shared pieces of the native host tests: a CHECK that reports and exits, and
// buffers whose data starts a chosen number of elements past a 64-byte
// boundary, with a canary after them.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CHECK(cond, ...)                                                \
  do {                                                                  \
    if (!(cond)) {                                                      \
      std::fprintf(stderr, "FAILED %s (line %d): ", #cond, __LINE__);   \
      std::fprintf(stderr, __VA_ARGS__);                                \
      std::fprintf(stderr, "\n");                                       \
      std::exit(1);                                                     \
    }                                                                   \
  } while (0)

// n elements starting `offset` elements past a 64-byte boundary, followed by
// a canary. Every byte starts as 0xff (NaN for floating types), the way a
// fresh GPU allocation holds garbage; intact() tells whether the canary bytes
// after the n elements are untouched.
template <typename T>
struct Buffer {
  static constexpr size_t kCanaryBytes = 64;
  std::vector<unsigned char> bytes;
  T* data;
  int64_t n;
  Buffer(int64_t n_, int offset)
      : bytes(sizeof(T) * (n_ + offset) + 64 + kCanaryBytes, 0xff), n(n_) {
    auto addr = reinterpret_cast<std::uintptr_t>(bytes.data());
    data = reinterpret_cast<T*>((addr + 63) / 64 * 64) + offset;
  }
  bool intact() const {
    const auto* canary = reinterpret_cast<const unsigned char*>(data + n);
    for (size_t i = 0; i < kCanaryBytes; ++i) {
      if (canary[i] != 0xff) return false;
    }
    return true;
  }
};
