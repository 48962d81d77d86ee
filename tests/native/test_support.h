// Shared pieces of the native host tests: a CHECK that reports and exits, and
// buffers whose data starts a chosen number of elements past a 64-byte
// boundary.
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

// n elements starting `offset` elements past a 64-byte boundary.
template <typename T>
struct Buffer {
  std::vector<unsigned char> bytes;
  T* data;
  Buffer(int64_t n, int offset) : bytes(sizeof(T) * (n + offset) + 64) {
    auto addr = reinterpret_cast<std::uintptr_t>(bytes.data());
    data = reinterpret_cast<T*>((addr + 63) / 64 * 64) + offset;
  }
};
