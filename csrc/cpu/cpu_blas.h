// Row-major GEMM on raw pointers for the fused CPU kernels' block products.
//
// The kernels issue thousands of small GEMMs per call (64 x 128 x d blocks at
// T = 1024). Through at::mm_out each one costs a dispatcher round trip plus
// the narrow/transpose views that describe its operands, which measured as
// ~15% of a fwd+bwd at T = 1024; this calls the BLAS that ATen itself links
// (sgemm_/dgemm_, MKL in the x86 wheels) directly, and falls back to ATen on
// builds that do not export it.
#pragma once

#include <cstdint>

namespace barrier_ops::cpu {

enum class Trans : bool { kNo = false, kYes = true };

// C[m x n] = alpha * op(A) op(B) + beta * C, all row-major with leading
// dimensions lda/ldb/ldc (elements). op(A) is m x k, op(B) is k x n. beta = 0
// ignores C's previous contents (NaN included).
void gemm(Trans trans_a, Trans trans_b, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
          int64_t ldc);
void gemm(Trans trans_a, Trans trans_b, int64_t m, int64_t n, int64_t k, double alpha,
          const double* a, int64_t lda, const double* b, int64_t ldb, double beta, double* c,
          int64_t ldc);

// True when gemm goes straight to the BLAS; false on the ATen fallback (no
// exported BLAS, or BARRIER_OPS_CPU_GEMM=aten, which the tests use to cover
// the fallback).
bool gemm_uses_blas();

// While alive, BLAS calls made by this thread run on this thread only. The
// block GEMMs run inside at::parallel_for tasks; under torch's default
// settings MKL otherwise opens a nested parallel region per call, which costs
// more than the small GEMM itself (measured here: 2 threads slower than 1,
// 3-5x slower with a passive OpenMP wait policy).
class BlasOnCallingThread {
 public:
  BlasOnCallingThread();
  ~BlasOnCallingThread();
  BlasOnCallingThread(const BlasOnCallingThread&) = delete;
  BlasOnCallingThread& operator=(const BlasOnCallingThread&) = delete;

 private:
  int previous_;
};

}  // namespace barrier_ops::cpu
