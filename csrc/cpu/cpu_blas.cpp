// Raw-pointer GEMM for the fused CPU kernels (see cpu_blas.h).
#include "cpu_blas.h"

#include <ATen/ATen.h>

#include <climits>
#include <cstdlib>
#include <cstring>

// The Fortran BLAS entry points, with LP64 integers, as ATen declares them
// itself (aten/src/ATen/native/BlasKernel.cpp). Weak, so that the extension
// still loads against a torch that exports no BLAS (macOS Accelerate builds);
// gemm() then uses ATen.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
// MKL's thread-local thread count (mkl_service.h maps mkl_set_num_threads_local
// to this C entry point; the lowercase symbol is the Fortran one and takes an
// int*). Weak: absent when torch links another BLAS.
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
}

namespace barrier_ops::cpu {

namespace {

bool aten_fallback_requested() {
  static const bool requested = [] {
    const char* mode = std::getenv("BARRIER_OPS_CPU_GEMM");
    return mode != nullptr && std::strcmp(mode, "aten") == 0;
  }();
  return requested;
}

int blas_int(int64_t value, const char* what) {
  TORCH_CHECK(value >= 0 && value <= INT_MAX, "barrier_ops: GEMM ", what, " = ", value,
              " does not fit the BLAS's 32-bit integers");
  return static_cast<int>(value);
}

// op(X) of a row-major operand as an ATen view without copying.
template <typename T>
at::Tensor row_major_view(const T* data, Trans trans, int64_t rows, int64_t cols, int64_t ld) {
  const at::ScalarType dtype = c10::CppTypeToScalarType<T>::value;
  const auto options = at::TensorOptions().dtype(dtype);
  void* ptr = const_cast<T*>(data);
  if (trans == Trans::kNo) return at::from_blob(ptr, {rows, cols}, {ld, 1}, options);
  return at::from_blob(ptr, {cols, rows}, {ld, 1}, options).t();
}

template <typename T>
void gemm_aten(Trans trans_a, Trans trans_b, int64_t m, int64_t n, int64_t k, T alpha,
               const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  at::Tensor out = row_major_view(c, Trans::kNo, m, n, ldc);
  at::Tensor lhs = row_major_view(a, trans_a, m, k, lda);
  at::Tensor rhs = row_major_view(b, trans_b, k, n, ldb);
  out.addmm_(lhs, rhs, beta, alpha);
}

// Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: the BLAS
// is called with the operands swapped and the same transpose flags.
template <typename T, typename Blas>
void gemm_blas(Blas blas, Trans trans_a, Trans trans_b, int64_t m, int64_t n, int64_t k, T alpha,
               const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const char ta = trans_a == Trans::kYes ? 'T' : 'N';
  const char tb = trans_b == Trans::kYes ? 'T' : 'N';
  const int mi = blas_int(m, "m"), ni = blas_int(n, "n"), ki = blas_int(k, "k");
  const int ldai = blas_int(lda, "lda"), ldbi = blas_int(ldb, "ldb"),
            ldci = blas_int(ldc, "ldc");
  blas(&tb, &ta, &ni, &mi, &ki, &alpha, b, &ldbi, a, &ldai, &beta, c, &ldci);
}

}  // namespace

bool gemm_uses_blas() {
  return sgemm_ != nullptr && dgemm_ != nullptr && !aten_fallback_requested();
}

namespace {

template <typename T, typename Blas>
void gemm_any(Blas blas, Trans trans_a, Trans trans_b, int64_t m, int64_t n, int64_t k, T alpha,
              const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (gemm_uses_blas()) {
    gemm_blas<T>(blas, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  } else {
    gemm_aten<T>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
}

}  // namespace

void gemm(Trans trans_a, Trans trans_b, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
          int64_t ldc) {
  gemm_any<float>(sgemm_, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void gemm(Trans trans_a, Trans trans_b, int64_t m, int64_t n, int64_t k, double alpha,
          const double* a, int64_t lda, const double* b, int64_t ldb, double beta, double* c,
          int64_t ldc) {
  gemm_any<double>(dgemm_, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

BlasOnCallingThread::BlasOnCallingThread()
    : previous_(MKL_Set_Num_Threads_Local != nullptr ? MKL_Set_Num_Threads_Local(1) : 0) {}

BlasOnCallingThread::~BlasOnCallingThread() {
  if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous_);
}

}  // namespace barrier_ops::cpu
