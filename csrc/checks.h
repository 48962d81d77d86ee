// Argument checks shared by the CPU and CUDA kernels of every op.
//
// Every op works on flat, contiguous [T, P] buffers (T tasks, P parameters) of
// one floating dtype (float32 or float64), plus per-task [T] vectors and, for
// prox_sgd_step_, a [P] vector. All tensors of one call live on one device,
// and a tensor an op writes shares no memory with the op's other arguments
// ([T, P] buffers and per-task vectors alike).
//
// A bad argument raises ValueError in Python (TORCH_CHECK_VALUE), memory
// shared with a written tensor RuntimeError (TORCH_CHECK), as in PyTorch. The
// reference kernels apply the same rules with the same messages
// (imaml_ext/ops.py, _Args); tests/test_ops.py compares the two.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <string>

namespace imaml_ext {

// Formats a shape as "[3, 5]". Messages build numbers with std::to_string
// instead of streaming them into an ostream: on a machine whose setuptools
// compiler (/opt/gcc/bin/g++) differs from the one torch was built with,
// streaming an integer from the extension segfaulted once torch was loaded.
inline std::string shape_str(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    out += (i ? ", " : "") + std::to_string(sizes[i]);
  }
  return out + "]";
}

// Formats a dtype as Python does: "torch.float32".
inline std::string dtype_str(at::ScalarType type) {
  return "torch." + std::string(c10::getDtypeNames(type).first);
}

// Checks the tensors of one call against a reference [T, P] tensor `ref`.
class ArgChecker {
 public:
  ArgChecker(const char* op, const char* ref_name, const at::Tensor& ref)
      : op_(op), ref_name_(ref_name), ref_(ref) {
    TORCH_CHECK_VALUE(
        ref.dim() == 2,
        op_, ": ", ref_name_, " must be a 2-D [T, P] tensor, got shape ",
        shape_str(ref.sizes()),
        " (flatten the parameters of each task into one row)");
    TORCH_CHECK_VALUE(
        ref.scalar_type() == at::kFloat || ref.scalar_type() == at::kDouble,
        op_, ": unsupported dtype ", dtype_str(ref.scalar_type()), " for ", ref_name_,
        "; use float32 or float64");
    common(ref_name_, ref);
  }

  // Another [T, P] tensor: same shape and dtype as the reference.
  void rows(const char* name, const at::Tensor& t) const {
    same_dtype(name, t);
    TORCH_CHECK_VALUE(
        t.sizes() == ref_.sizes(), op_, ": ", name, " has shape ",
        shape_str(t.sizes()), " but ", ref_name_, " has shape ",
        shape_str(ref_.sizes()),
        "; all [T, P] inputs must have the same shape");
    common(name, t);
  }

  // A per-task [T] vector of the floating dtype of the reference.
  void per_task(const char* name, const at::Tensor& t) const {
    same_dtype(name, t);
    task_vector(name, t);
  }

  // A per-task [T] int32 vector.
  void per_task_int32(const char* name, const at::Tensor& t) const {
    TORCH_CHECK_VALUE(
        t.scalar_type() == at::kInt, op_, ": ", name,
        " must be int32 but has dtype ", dtype_str(t.scalar_type()),
        " (create it with dtype=torch.int32)");
    task_vector(name, t);
  }

  // Tensors a and b (one of them written by the op) must not share memory.
  void distinct(const char* a_name, const at::Tensor& a, const char* b_name,
                const at::Tensor& b) const {
    const at::MemOverlapStatus status = at::get_overlap_status(a, b);
    TORCH_CHECK(
        status != at::MemOverlapStatus::Full &&
            status != at::MemOverlapStatus::Partial,
        op_, ": ", a_name, " and ", b_name,
        " share memory; pass distinct tensors (e.g. use .clone())");
  }

  // A [P] vector broadcast over tasks.
  void per_param(const char* name, const at::Tensor& t) const {
    same_dtype(name, t);
    TORCH_CHECK_VALUE(
        t.dim() == 1 && t.size(0) == ref_.size(1), op_, ": ", name,
        " must have shape [P] = ", shape_str({ref_.size(1)}),
        " (broadcast over tasks), got ", shape_str(t.sizes()));
    common(name, t);
  }

 private:
  void same_dtype(const char* name, const at::Tensor& t) const {
    TORCH_CHECK_VALUE(
        t.scalar_type() == ref_.scalar_type(), op_, ": ", name, " has dtype ",
        dtype_str(t.scalar_type()), " but ", ref_name_, " has ",
        dtype_str(ref_.scalar_type()),
        "; all floating inputs must share one dtype (convert with .to(",
        ref_name_, ".dtype))");
  }

  void task_vector(const char* name, const at::Tensor& t) const {
    TORCH_CHECK_VALUE(
        t.dim() == 1 && t.size(0) == ref_.size(0), op_, ": ", name,
        " must have shape [T] = ", shape_str({ref_.size(0)}),
        " (one entry per task of ", ref_name_, "), got ", shape_str(t.sizes()));
    common(name, t);
  }

  void common(const char* name, const at::Tensor& t) const {
    TORCH_CHECK_VALUE(
        t.device() == ref_.device(), op_, ": ", name, " is on ", t.device(),
        " but ", ref_name_, " is on ", ref_.device(),
        "; move all inputs to one device");
    TORCH_CHECK_VALUE(
        t.is_contiguous(), op_, ": ", name,
        " must be contiguous (call .contiguous())");
  }

  const char* op_;
  const char* ref_name_;
  const at::Tensor& ref_;
};

inline void check_cg_step(
    const at::Tensor& x, const at::Tensor& r, const at::Tensor& p,
    const at::Tensor& Hp, const at::Tensor& rs, const at::Tensor& state,
    const at::Tensor& threshold_sq) {
  ArgChecker c("cg_step_", "x", x);
  c.rows("r", r);
  c.rows("p", p);
  c.rows("Hp", Hp);
  c.per_task("rs", rs);
  c.per_task_int32("state", state);
  c.per_task("threshold_sq", threshold_sq);
  c.distinct("x", x, "r", r);
  c.distinct("x", x, "p", p);
  c.distinct("r", r, "p", p);
  c.distinct("Hp", Hp, "x", x);
  c.distinct("Hp", Hp, "r", r);
  c.distinct("Hp", Hp, "p", p);
  // The per-task vectors are __restrict__ in the kernels too: the written ones
  // (rs, state) share memory with no other argument, threshold_sq none with a
  // written [T, P] buffer.
  c.distinct("rs", rs, "x", x);
  c.distinct("rs", rs, "r", r);
  c.distinct("rs", rs, "p", p);
  c.distinct("rs", rs, "Hp", Hp);
  c.distinct("rs", rs, "state", state);
  c.distinct("rs", rs, "threshold_sq", threshold_sq);
  c.distinct("state", state, "x", x);
  c.distinct("state", state, "r", r);
  c.distinct("state", state, "p", p);
  c.distinct("state", state, "Hp", Hp);
  c.distinct("state", state, "threshold_sq", threshold_sq);
  c.distinct("threshold_sq", threshold_sq, "x", x);
  c.distinct("threshold_sq", threshold_sq, "r", r);
  c.distinct("threshold_sq", threshold_sq, "p", p);
}

inline void check_prox_sgd_step(
    const at::Tensor& phi, const at::Tensor& g, const at::Tensor& theta) {
  ArgChecker c("prox_sgd_step_", "phi", phi);
  c.rows("g", g);
  c.per_param("theta", theta);
  c.distinct("phi", phi, "g", g);
  c.distinct("phi", phi, "theta", theta);
}

inline void check_adjoint_sgd_step(
    const at::Tensor& adj, const at::Tensor& Ha, const at::Tensor& g,
    const at::Tensor& lr_grad) {
  ArgChecker c("adjoint_sgd_step_", "adj", adj);
  c.rows("Ha", Ha);
  c.rows("g", g);
  c.per_task("lr_grad", lr_grad);
  c.distinct("adj", adj, "Ha", Ha);
  c.distinct("adj", adj, "g", g);
  c.distinct("lr_grad", lr_grad, "adj", adj);
  c.distinct("lr_grad", lr_grad, "Ha", Ha);
  c.distinct("lr_grad", lr_grad, "g", g);
}

inline void check_batched_dot(const at::Tensor& x, const at::Tensor& y) {
  ArgChecker c("batched_dot", "x", x);
  c.rows("y", y);
}

inline void check_batched_sq_norm(const at::Tensor& x) {
  ArgChecker c("batched_sq_norm", "x", x);
}

}  // namespace imaml_ext
