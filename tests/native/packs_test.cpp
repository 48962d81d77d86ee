// Host test of csrc/cuda/packs.h: over many row lengths, slicings, storage
// offsets and thread counts, every element of a slice is visited exactly once,
// every pack visit is 16-byte aligned in every row, packs are used whenever
// the rows share their alignment, a row left out of the cut is read right
// whatever its alignment, and packed loads and stores move the right
// values. Prints one summary line; exits non-zero on the first failure.
#include <cstdint>
#include <cstdio>
#include <vector>

#include "../../csrc/cuda/packs.h"
#include "test_support.h"

using imaml_ext::cuda::for_each_pack;
using imaml_ext::cuda::load;
using imaml_ext::cuda::load_any;
using imaml_ext::cuda::misalignment;
using imaml_ext::cuda::pack_width;
using imaml_ext::cuda::packed_slice;
using imaml_ext::cuda::PackedSlice;
using imaml_ext::cuda::store;

namespace {

int64_t g_cases = 0, g_packs = 0;

// y[i] = 2 x[i] + z[i] and a sum of x[i] over [begin, end), visited by
// `nthreads` simulated threads, the cut made on x and y only; checks
// coverage, alignment and values.
template <typename T>
void check_slice(const T* x, T* y, const T* z, int64_t begin, int64_t end, int nthreads) {
  constexpr int W = pack_width<T>();
  const PackedSlice<W> s = packed_slice(begin, end, x, static_cast<const T*>(y));
  CHECK(s.begin == begin && s.end == end && begin <= s.head_end &&
            s.head_end <= s.body_end && s.body_end <= end && (s.body_end - s.head_end) % W == 0,
        "cut [%lld %lld %lld %lld]", (long long)s.begin, (long long)s.head_end,
        (long long)s.body_end, (long long)s.end);
  const bool shared = misalignment(x + begin) == misalignment(y + begin);
  if (shared && end - begin >= W) {
    // The head is shorter than a pack and the tail too: no pack is missed.
    CHECK(s.head_end - begin < W && end - s.body_end < W, "packs missed, len %lld",
          (long long)(end - begin));
  } else {
    CHECK(s.head_end == end, "packs on rows that do not share alignment");
  }
  std::vector<int> visits(end - begin, 0);
  T sum = 0;
  for (int tid = 0; tid < nthreads; ++tid) {
    int64_t last = -1;
    for_each_pack(s, tid, nthreads, [&](int64_t i, auto width) {
      constexpr int N = decltype(width)::value;
      CHECK(i >= begin && i + N <= end, "visit [%lld, +%d) outside the slice", (long long)i, N);
      CHECK(i > last, "visits of one thread out of order");
      last = i;
      if (N > 1) {
        CHECK(misalignment(x + i) == 0 && misalignment(y + i) == 0, "unaligned pack at %lld",
              (long long)i);
        ++g_packs;
      }
      auto xv = load<N>(x + i);
      const auto zv = load_any<N>(z + i);
      for (int k = 0; k < N; ++k) {
        ++visits[i - begin + k];
        sum += xv.v[k];
        xv.v[k] = 2 * xv.v[k] + zv.v[k];
      }
      store<N>(y + i, xv);
    });
  }
  T want = 0;
  for (int64_t i = begin; i < end; ++i) {
    CHECK(visits[i - begin] == 1, "element %lld visited %d times", (long long)i,
          visits[i - begin]);
    CHECK(y[i] == 2 * x[i] + z[i], "wrong value stored at %lld", (long long)i);
    want += x[i];
  }
  // Small integers: every order of summation is exact.
  CHECK(sum == want, "sum %g, want %g", (double)sum, (double)want);
  ++g_cases;
}

template <typename T>
void check_rows() {
  const int W = pack_width<T>();
  for (int64_t P : {0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 33, 100, 1001, 4099}) {
    for (int64_t T_rows : {1, 3}) {
      for (int off_x = 0; off_x < W; ++off_x) {
        for (int off_y = 0; off_y < W; ++off_y) {
          // z: one row of P shared by all rows t, like theta of prox_sgd_step_.
          const int off_z = (off_x + off_y) % W;
          Buffer<T> xb(T_rows * P, off_x), yb(T_rows * P, off_y), zb(P, off_z);
          for (int64_t i = 0; i < T_rows * P; ++i) {
            xb.data[i] = static_cast<T>((i * 7) % 13);
            yb.data[i] = -1;
          }
          for (int64_t i = 0; i < P; ++i) zb.data[i] = static_cast<T>(i % 5);
          // Row t cut into nb slices the way the kernels cut it.
          for (int64_t nb : {1, 2, 3, 7}) {
            const int64_t len = (P + nb - 1) / nb;
            for (int64_t t = 0; t < T_rows; ++t) {
              for (int64_t sl = 0; sl < nb; ++sl) {
                const int64_t begin = sl * len < P ? sl * len : P;
                const int64_t end = begin + len < P ? begin + len : P;
                for (int nthreads : {1, 3, 32}) {
                  check_slice(xb.data + t * P, yb.data + t * P, zb.data, begin, end, nthreads);
                }
              }
            }
          }
        }
      }
    }
  }
}

}  // namespace

int main() {
  check_rows<float>();
  check_rows<double>();
  CHECK(g_packs > 0, "no pack was ever used");
  std::printf("packs_test: %lld slices checked, %lld packs visited\n", (long long)g_cases,
              (long long)g_packs);
  return 0;
}
