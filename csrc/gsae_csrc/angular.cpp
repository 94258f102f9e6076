// Batched mean angular distances between layers, for layer grouping (Group-SAE, Eq. 11).
//
//   gsae::angular_distance_sums(Tensor hidden [L, N, d]) -> (Tensor sums [L, L] f64, Tensor count)
//
// sums[i][j] = sum over the N tokens of arccos(cos(x_i, x_j)) / pi; count = N. The mean distance
// matrix is sums / count; sums and counts from many batches (or processes) simply add up.
//
// Per token, the Gram matrix of the L raw vectors is computed in register-blocked 4 x 4 tiles
// straight from the input (fp16 and bf16 rows are first widened into a small fp32 buffer), so
// the input is read once and each element costs one FMA per pair; the norms are the diagonal.
// The tiles use AVX-512 intrinsics when the build targets it, a portable omp-simd loop
// otherwise. The arccos of each Gram row is a vectorised polynomial: a libm call per pair
// used to cost more than all the dot products of the token.
// Nearly parallel pairs (cos > 0.995, i.e. under ~0.1 rad), where arccos of an fp32 dot product
// loses its digits, are recomputed from the chord between the unit vectors,
// theta = 2 asin(|u_i - u_j| / 2), which keeps full relative precision.
//
// Tokens are split into a fixed number of chunks (independent of N and of the thread count),
// each with its own float64 accumulator, added in chunk order at the end: the result is
// deterministic, and the extra memory, O(chunks * L^2 + threads * L * d), does not grow with N.

#include <ATen/ATen.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

namespace gsae {
namespace {

constexpr int64_t kChunks = 64;
constexpr double kPi = 3.14159265358979323846;
constexpr double kRefineCos = 0.995;  // above this, the angle comes from the chord instead

// Dot products of a 4 x 4 block of rows, (a[p], b[q]): 8 row loads feed 16 independent FMA
// chains (16 accumulators and 8 operands fit the 32 vector registers of AVX-512).
#if defined(__AVX512F__)
inline void dots_4x4(const float* const a[4], const float* const b[4], int64_t d,
                     float* out /* [16], row-major p, q */) {
  __m512 s[16];
  for (auto& v : s) v = _mm512_setzero_ps();
  for (int64_t k = 0; k < d; k += 16) {
    // the tail of d (d = 63, ...) is a masked load: zeros add nothing to a dot product
    const __mmask16 m = d - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (d - k)) - 1);
    __m512 x[4], y[4];
    for (int p = 0; p < 4; ++p) x[p] = _mm512_maskz_loadu_ps(m, a[p] + k);
    for (int q = 0; q < 4; ++q) y[q] = _mm512_maskz_loadu_ps(m, b[q] + k);
    for (int p = 0; p < 4; ++p) {
      for (int q = 0; q < 4; ++q) s[4 * p + q] = _mm512_fmadd_ps(x[p], y[q], s[4 * p + q]);
    }
  }
  for (int i = 0; i < 16; ++i) out[i] = _mm512_reduce_add_ps(s[i]);
}
#else
inline void dots_4x4(const float* const a[4], const float* const b[4], int64_t d,
                     float* out /* [16], row-major p, q */) {
  const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3];
  const float *b0 = b[0], *b1 = b[1], *b2 = b[2], *b3 = b[3];
  float s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
  float s20 = 0, s21 = 0, s22 = 0, s23 = 0, s30 = 0, s31 = 0, s32 = 0, s33 = 0;
#pragma omp simd reduction(+ : s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, \
                               s30, s31, s32, s33)
  for (int64_t k = 0; k < d; ++k) {
    const float x0 = a0[k], x1 = a1[k], x2 = a2[k], x3 = a3[k];
    const float y0 = b0[k], y1 = b1[k], y2 = b2[k], y3 = b3[k];
    s00 += x0 * y0; s01 += x0 * y1; s02 += x0 * y2; s03 += x0 * y3;
    s10 += x1 * y0; s11 += x1 * y1; s12 += x1 * y2; s13 += x1 * y3;
    s20 += x2 * y0; s21 += x2 * y1; s22 += x2 * y2; s23 += x2 * y3;
    s30 += x3 * y0; s31 += x3 * y1; s32 += x3 * y2; s33 += x3 * y3;
  }
  const float s[16] = {s00, s01, s02, s03, s10, s11, s12, s13,
                       s20, s21, s22, s23, s30, s31, s32, s33};
  std::copy(s, s + 16, out);
}
#endif

// |a / |a| - b / |b||^2, summed in double: the accurate route for nearly parallel vectors.
inline double squared_chord(const float* a, const float* b, int64_t d, double inv_a,
                            double inv_b) {
  double s = 0.0;
  for (int64_t k = 0; k < d; ++k) {
    const double t = a[k] * inv_a - b[k] * inv_b;
    s += t * t;
  }
  return s;
}

// arccos for |x| <= 1 in single precision, written branch-free so that a loop over a Gram row
// vectorises (a scalar libm call per pair cost more than all the dot products of the token).
// Cephes' asinf polynomial (relative error ~2.5e-7 on [0, 0.5]) with the half-angle identity
// acos(|x|) = 2 asin(sqrt((1 - |x|) / 2)) for |x| > 0.5. NaN in, NaN out.
inline float acos_poly(float x) {
  const float a = std::fabs(x);
  const bool big = a > 0.5f;
  const float z = big ? 0.5f * (1.0f - a) : a * a;
  const float s = big ? std::sqrt(z) : a;
  const float p = (((4.2163199048e-2f * z + 2.4181311049e-2f) * z + 4.5470025998e-2f) * z +
                   7.4953002686e-2f) * z + 1.6666752422e-1f;
  const float asin_s = s + s * z * p;
  const float acos_a = big ? 2.0f * asin_s : static_cast<float>(kPi / 2) - asin_s;
  return x < 0.0f ? static_cast<float>(kPi) - acos_a : acos_a;
}

// Adds the angles between row i and rows i+1..L-1 of one token to acc[i+1..L-1]. inv holds
// 1 / |x_l|, or 0 for a zero vector, which has no direction: its cos is taken as 0 (an angle of
// pi / 2), as torch's cosine_similarity gives. cosine and angle are [L] scratch rows.
inline void add_row_angles(const float* const* row, const float* gram_i, const float* inv,
                           int64_t i, int64_t L, int64_t d, float* cosine, float* angle,
                           double* acc) {
  float cmax = -2.0f;
#pragma omp simd reduction(max : cmax)
  for (int64_t j = i + 1; j < L; ++j) {
    float c = gram_i[j] * inv[i] * inv[j];
    c = c > 1.0f ? 1.0f : (c < -1.0f ? -1.0f : c);  // keeps NaN, which std::clamp need not
    cmax = c > cmax ? c : cmax;
    cosine[j] = c;
    angle[j] = acos_poly(c);
  }
  if (cmax > kRefineCos) {  // rare: nearly parallel pairs, recomputed from the chord
    for (int64_t j = i + 1; j < L; ++j) {
      if (!(cosine[j] > kRefineCos)) continue;
      const double half_chord = std::sqrt(squared_chord(row[i], row[j], d, inv[i], inv[j])) / 2;
      angle[j] = 2.0 * std::asin(std::min(1.0, half_chord));
    }
  }
#pragma omp simd
  for (int64_t j = i + 1; j < L; ++j) acc[j] += angle[j];
}

template <typename scalar_t>
void accumulate(const at::Tensor& hidden, double* chunk_sums) {
  const int64_t L = hidden.size(0), N = hidden.size(1), d = hidden.size(2);
  const scalar_t* base = hidden.const_data_ptr<scalar_t>();
  constexpr bool kWiden = !std::is_same_v<scalar_t, float>;
  const int64_t chunk = (N + kChunks - 1) / kChunks;
  const int64_t Lp = (L + 3) / 4 * 4;  // rows padded to whole 4 x 4 blocks
  at::parallel_for(0, kChunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> wide(kWiden ? L * d : 0);  // fp16/bf16 rows of one token, as fp32
    std::vector<float> zeros(d, 0.f);  // stands in for the padding rows
    std::vector<const float*> row(Lp);
    std::vector<float> gram(Lp * Lp), inv(L), cosine(L), angle(L);
    for (int64_t c = c0; c < c1; ++c) {
      double* acc = chunk_sums + c * L * L;
      const int64_t end = std::min(N, (c + 1) * chunk);
      for (int64_t n = c * chunk; n < end; ++n) {
        for (int64_t l = 0; l < L; ++l) {
          const scalar_t* src = base + (l * N + n) * d;
          if constexpr (kWiden) {
            float* dst = &wide[l * d];
#pragma omp simd
            for (int64_t k = 0; k < d; ++k) dst[k] = static_cast<float>(src[k]);
            row[l] = dst;
          } else {
            row[l] = src;
          }
        }
        for (int64_t l = L; l < Lp; ++l) row[l] = zeros.data();
        for (int64_t bi = 0; bi < Lp; bi += 4) {
          for (int64_t bj = bi; bj < Lp; bj += 4) {
            float block[16];
            dots_4x4(&row[bi], &row[bj], d, block);
            for (int p = 0; p < 4; ++p) {
              std::copy(block + 4 * p, block + 4 * p + 4, &gram[(bi + p) * Lp + bj]);
            }
          }
        }
        for (int64_t l = 0; l < L; ++l) {
          const float g = gram[l * Lp + l];
          inv[l] = g == 0.0f ? 0.0f : 1.0f / std::sqrt(g);
        }
        for (int64_t i = 0; i + 1 < L; ++i) {
          add_row_angles(row.data(), &gram[i * Lp], inv.data(), i, L, d, cosine.data(),
                         angle.data(), acc + i * L);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> angular_distance_sums_cpu(const at::Tensor& hidden) {
  TORCH_CHECK(hidden.device().is_cpu(), "angular_distance_sums: the CPU kernel got a tensor on ",
              hidden.device());
  TORCH_CHECK(hidden.dim() == 3, "angular_distance_sums: hidden must be [L, N, d], got ",
              hidden.dim(), "-D shape ", hidden.sizes());
  TORCH_CHECK(hidden.size(0) >= 1 && hidden.size(2) >= 1,
              "angular_distance_sums: hidden needs L >= 1 and d >= 1, got shape ", hidden.sizes());
  const auto dtype = hidden.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "angular_distance_sums: hidden must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(hidden.is_contiguous(), "angular_distance_sums: hidden must be contiguous");
  const int64_t L = hidden.size(0), N = hidden.size(1);

  std::vector<double> chunk_sums(kChunks * L * L, 0.0);
  if (N > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "angular_distance_sums",
                                    [&] { accumulate<scalar_t>(hidden, chunk_sums.data()); });
  }
  auto sums = at::zeros({L, L}, hidden.options().dtype(at::kDouble));
  double* out = sums.data_ptr<double>();
  for (int64_t c = 0; c < kChunks; ++c) {  // fixed order: deterministic
    for (int64_t i = 0; i < L; ++i) {
      for (int64_t j = i + 1; j < L; ++j) out[i * L + j] += chunk_sums[(c * L + i) * L + j];
    }
  }
  for (int64_t i = 0; i < L; ++i) {
    for (int64_t j = i + 1; j < L; ++j) {
      out[i * L + j] /= kPi;
      out[j * L + i] = out[i * L + j];
    }
  }
  auto count = at::scalar_tensor(N, hidden.options().dtype(at::kLong));
  return {sums, count};
}

std::tuple<at::Tensor, at::Tensor> angular_distance_sums_meta(const at::Tensor& hidden) {
  TORCH_CHECK(hidden.dim() == 3, "angular_distance_sums: hidden must be [L, N, d]");
  const int64_t L = hidden.size(0);
  return {at::empty({L, L}, hidden.options().dtype(at::kDouble)),
          at::empty({}, hidden.options().dtype(at::kLong))};
}

}  // namespace

TORCH_LIBRARY(gsae, m) {
  m.def("angular_distance_sums(Tensor hidden) -> (Tensor sums, Tensor count)");
}

TORCH_LIBRARY_IMPL(gsae, CPU, m) { m.impl("angular_distance_sums", &angular_distance_sums_cpu); }

TORCH_LIBRARY_IMPL(gsae, Meta, m) { m.impl("angular_distance_sums", &angular_distance_sums_meta); }

}  // namespace gsae
