// A CPU allocator whose freed blocks malloc hands out again for the same size
// (imaml_ext/cpu_malloc.py says when it is installed, and why).
//
// c10's default CPU allocator takes every block from posix_memalign.  glibc
// (2.36 measured) serves a memalign request of n bytes by a malloc of
// n + alignment + a few bytes, aligns inside it and gives the slack back, so
// the block it finally holds is n bytes: when it is freed between other
// blocks, a later request of the same n does not fit the hole, the heap grows
// and the kernel page-faults and zeroes the new pages.  A meta-batch of the
// batched path repeats the same large sizes (a [T, n, C, H, W] activation of
// hundreds of MB) round after round, and paid that in every other round.
// Here every block is a plain malloc of n + alignment + one pointer, aligned
// by hand, with the malloc'd address stored in the pointer just before the
// data: freed, it is a hole of exactly the size the next request asks for.
#include <c10/core/CPUAllocator.h>
#include <c10/core/alignment.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <limits>

namespace {

constexpr std::size_t kSlack = c10::gAlignment + sizeof(void*);
// Above c10's default CPU allocator (registered with priority 0).
constexpr uint8_t kPriority = 1;

void exact_fit_free(void* data) {
  if (data == nullptr) {
    return;
  }
  c10::profiledCPUMemoryReporter().Delete(data);
  std::free(static_cast<void**>(data)[-1]);
}

struct ExactFitAllocator final : c10::Allocator {
  c10::DataPtr allocate(std::size_t nbytes) override {
    const c10::Device cpu(c10::DeviceType::CPU);
    if (nbytes == 0) {
      return {nullptr, nullptr, &exact_fit_free, cpu};
    }
    TORCH_CHECK(nbytes <= std::numeric_limits<std::size_t>::max() - kSlack,
                "imaml_ext CPU allocator: cannot allocate ", nbytes, " bytes");
    void* raw = std::malloc(nbytes + kSlack);
    if (raw == nullptr) {
      c10::profiledCPUMemoryReporter().OutOfMemory(nbytes);
      TORCH_CHECK_WITH(OutOfMemoryError, false,
                       "imaml_ext CPU allocator: not enough memory: you tried to allocate ",
                       nbytes, " bytes.");
    }
    const auto address = reinterpret_cast<std::uintptr_t>(raw) + sizeof(void*);
    void* data = reinterpret_cast<void*>((address + c10::gAlignment - 1) &
                                         ~static_cast<std::uintptr_t>(c10::gAlignment - 1));
    static_cast<void**>(data)[-1] = raw;
    c10::profiledCPUMemoryReporter().New(data, nbytes);
    return {data, data, &exact_fit_free, cpu};
  }

  c10::DeleterFnPtr raw_deleter() const override {
    return &exact_fit_free;
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

ExactFitAllocator exact_fit;
c10::Allocator* replaced = nullptr;

}  // namespace

// on > 0: make the exact-fit allocator PyTorch's CPU allocator; on == 0: put
// back the one it replaced; on < 0: change nothing.  Returns whether it is the
// CPU allocator now (it is not where another allocator was registered with a
// higher priority).  Blocks keep the deleter of the allocator that made them,
// so switching is safe at any time.
extern "C" int imaml_ext_exact_fit_cpu_allocator(int on) {
  c10::Allocator* current = c10::GetCPUAllocator();
  if (on > 0 && current != &exact_fit) {
    replaced = current;
    c10::SetCPUAllocator(&exact_fit, kPriority);
  } else if (on == 0 && current == &exact_fit && replaced != nullptr) {
    c10::SetCPUAllocator(replaced, kPriority);
  }
  return c10::GetCPUAllocator() == &exact_fit ? 1 : 0;
}
