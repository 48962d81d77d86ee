// Declares the imaml_ext operators. The kernels are registered per device
// (CPU in csrc/*.cpp, CUDA in csrc/cuda/*.cu) with TORCH_LIBRARY_IMPL.
//
// Shapes: T tasks, P parameters per task; [T, P] buffers are contiguous.
#include <torch/library.h>

TORCH_LIBRARY(imaml_ext, m) {
  // One conjugate-gradient iteration on (a*I + b*H_t) x_t = rhs_t for every
  // task t with state[t] == 0. x, r, p, Hp: [T, P]; rs, threshold_sq: [T];
  // state: [T] int32 (0 running, 1 converged, 2 stopped on p'Ap <= 0,
  // 3 stopped on non-finite p'Ap).
  m.def(
      "cg_step_(Tensor(a!) x, Tensor(b!) r, Tensor(c!) p, Tensor Hp, "
      "Tensor(d!) rs, Tensor(e!) state, Tensor threshold_sq, float a, "
      "float b) -> ()");
  // phi <- phi - lr * (scale_t * g + lam * (phi - theta)), scale_t clipping
  // ||g_t|| to max_norm when max_norm > 0. phi, g: [T, P]; theta: [P].
  m.def(
      "prox_sgd_step_(Tensor(a!) phi, Tensor g, Tensor theta, float lr, "
      "float lam, float max_norm) -> ()");
  // lr_grad_t -= <g_t, adj_t>, then adj <- adj - lr * Ha.
  // adj, Ha, g: [T, P]; lr_grad: [T].
  m.def(
      "adjoint_sgd_step_(Tensor(a!) adj, Tensor Ha, Tensor g, "
      "Tensor(b!) lr_grad, float lr) -> ()");
  // [T, P] x [T, P] -> [T]: per-task inner products.
  m.def("batched_dot(Tensor x, Tensor y) -> Tensor");
  // [T, P] -> [T]: per-task squared Euclidean norms.
  m.def("batched_sq_norm(Tensor x) -> Tensor");
}
