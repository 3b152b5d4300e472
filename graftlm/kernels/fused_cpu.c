/* Element-wise work of a Llama training step, one pass over memory each: RMSNorm (alone, and
 * after a decoder layer's residual add), SwiGLU, the rotary embedding and the loss's
 * cross-entropy, forward and backward, in bf16 and in fp32 (fused_cpu_kernels.h, included once
 * per type); and the causal softmax of causal_attention.py, bf16 only
 * (graftlm/kernels/fused_cpu.py binds them).
 *
 * bf16 tensors (uint16_t bits): every value is widened to fp32 in registers, computed in fp32
 * (sums of squares and dot products accumulate in fp32) and rounded once to bf16, to nearest
 * even as torch casts. Where transformers' forward rounds an intermediate to bf16 (RMSNorm's
 * normalised row before the weight, SiLU's output before the product) the forward rounds there
 * too, so its logits are those of transformers' bf16 forward up to the last bit of the fp32 row
 * sums; the backward works on fp32 values throughout. fp32 tensors: the same formulas with no
 * rounding in between, so results are torch's up to the order of the row sums and the
 * exponential's polynomial (a few ulp), not bit for bit.
 *
 * The loops are plain C written for the compiler to vectorize (-O3, AVX-512 or AVX2, OpenMP
 * SIMD pragmas for the reductions); rows are split across `threads` OpenMP threads where the
 * library is built with -fopenmp (only where it shares torch's libgomp, as nf4_dequant.c).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef uint16_t bf16;

static inline float widen(bf16 b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline bf16 narrow(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7fffffffu) > 0x7f800000u ? (bf16)0x7fc0 : (bf16)rounded; /* NaN stays NaN */
}

static inline float round_bf16(float f) { return widen(narrow(f)); }

/* exp(x) in fp32 arithmetic only, so it vectorizes: 2^n * p(r), x = n ln2 + r, |r| <= ln2/2,
 * Cephes' polynomial (relative error ~2e-7, far below bf16's 4e-3) */
static inline float exp_approx(float x) {
    x = x < -87.0f ? -87.0f : x; /* not fminf/fmaxf: those keep NaN rules that do not vectorize */
    x = x > 88.0f ? 88.0f : x;
    const float shifter = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    float n = (x * 1.44269504088896341f + shifter) - shifter;
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

static inline float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
/* Where the CPU converts to bf16 itself (AVX-512 BF16, built with -mavx512bf16), the kernels
 * that round to bf16 in their inner loops (RMSNorm, SwiGLU, the causal softmax, the
 * cross-entropy) are written with intrinsics: one instruction rounds 16 values to bf16 (to
 * nearest even, as narrow() does; the loops spend ~8 integer operations a value on it), and
 * masked loads and stores do a row's tail, where the compiler's loops fall back to scalar code
 * (the causal rows have every length from 1 to seq). Same formulas, same polynomial as the
 * loops above; one difference: the instruction flushes results below bf16's smallest normal
 * (1.2e-38) to zero, where narrow() keeps the subnormal. */
#include <immintrin.h>
#define VECTOR_KERNELS 1

static inline __mmask16 lanes(long left) {
    return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
}
static inline __m512 v_load_bf16(__mmask16 m, const bf16 *p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
static inline __m256i v_narrow(__m512 f) { return (__m256i)_mm512_cvtneps_pbh(f); }
static inline void v_store_bf16(bf16 *p, __mmask16 m, __m512 f) {
    _mm256_mask_storeu_epi16(p, m, v_narrow(f));
}
static inline __m512 v_round_bf16(__m512 f) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v_narrow(f)), 16));
}
/* exp_approx on 16 lanes; NaN stays NaN (max/min return their second operand for NaN) */
static inline __m512 v_exp(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);
    x = _mm512_min_ps(_mm512_set1_ps(88.0f), x);
    const __m512 shifter = _mm512_set1_ps(12582912.0f);
    __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), shifter),
                             shifter);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
    __m512 q = _mm512_set1_ps(1.9875691500e-4f);
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.3981999507e-3f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(8.3334519073e-3f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(4.1665795894e-2f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.6666665459e-1f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(5.0000001201e-1f));
    __m512 y = _mm512_fmadd_ps(_mm512_mul_ps(q, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    __m512i bits = _mm512_slli_epi32(
        _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(bits));
}
static inline __m512 v_sigmoid(__m512 x) {
    __m512 one = _mm512_set1_ps(1.0f);
    return _mm512_div_ps(one, _mm512_add_ps(one, v_exp(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}
#endif

static inline int thread_index(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* No contraction of a * b + c into one fused multiply-add inside a function (GCC: the
 * attribute before it, clang: the pragma opening its body); elsewhere the compiler's default
 * (contracted, which the exponential's polynomial needs to be fast) */
#if defined(__clang__)
#define NO_FP_CONTRACT_FUNCTION
#define NO_FP_CONTRACT_BLOCK _Pragma("clang fp contract(off)")
#elif defined(__GNUC__)
#define NO_FP_CONTRACT_FUNCTION __attribute__((optimize("fp-contract=off")))
#define NO_FP_CONTRACT_BLOCK
#else
#define NO_FP_CONTRACT_FUNCTION
#define NO_FP_CONTRACT_BLOCK
#endif

/* element-wise kernels run in blocks of this many values, one block a task for the threads */
#define BLOCK 4096

/* the element-wise kernels, bf16: graftlm_rms_norm_forward, ... */
#define T bf16
#define LOAD(v) widen(v)
#define STORE(f) narrow(f)
#define ROUND(f) round_bf16(f)
#define NAME(f) f
#ifdef VECTOR_KERNELS
#define BF16_VECTORS 1
#else
#define BF16_VECTORS 0
#endif
#define FLOAT_ELEMENTS 0
#include "fused_cpu_kernels.h" /* which undefines its parameters */

/* the same kernels in fp32 (a float32 step; the generic loops on every CPU):
 * graftlm_rms_norm_forward_f32, ... */
#define T float
#define LOAD(v) (v)
#define STORE(f) (f)
#define ROUND(f) (f)
#define NAME(f) f##_f32
#define BF16_VECTORS 0
#define FLOAT_ELEMENTS 1
#include "fused_cpu_kernels.h" /* which undefines its parameters */

/* Causal softmax over score matrices [mats][rows][seq] (fp32, from q @ k^T): row r of a matrix
 * is query position r % seq (grouped-query heads stack their rows), and sees keys 0..r % seq.
 * p = exp(scale * s - lse) in bf16, zero above the diagonal; lse = the row's log-sum-exp.
 * The scores are a temporary: each row's exponentials are kept there between two passes. */
void graftlm_causal_softmax(float *scores, bf16 *p, float *lse, long mats, long rows, long seq,
                            float scale, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long row = 0; row < mats * rows; row++) {
        float *s = scores + row * seq;
        bf16 *pr = p + row * seq;
        long visible = row % rows % seq + 1;
#ifdef VECTOR_KERNELS
        __m512 vtop = _mm512_set1_ps(-INFINITY);
        for (long j = 0; j < visible; j += 16)
            vtop = _mm512_mask_max_ps(vtop, lanes(visible - j), vtop,
                                      _mm512_maskz_loadu_ps(lanes(visible - j), s + j));
        float vmax = _mm512_reduce_max_ps(vtop) * scale;
        __m512 vsum = _mm512_setzero_ps(), vscale = _mm512_set1_ps(scale);
        __m512 shift = _mm512_set1_ps(vmax);
        for (long j = 0; j < visible; j += 16) {
            __mmask16 m = lanes(visible - j);
            __m512 e = v_exp(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, s + j), vscale, shift));
            e = _mm512_maskz_mov_ps(m, e);
            _mm512_mask_storeu_ps(s + j, m, e);
            vsum = _mm512_add_ps(vsum, e);
        }
        float vtotal = _mm512_reduce_add_ps(vsum);
        lse[row] = vmax + logf(vtotal);
        __m512 vinverse = _mm512_set1_ps(1.0f / vtotal);
        for (long j = 0; j < visible; j += 16) {
            __mmask16 m = lanes(visible - j);
            v_store_bf16(pr + j, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + j), vinverse));
        }
        memset(pr + visible, 0, (size_t)(seq - visible) * sizeof(bf16));
        continue;
#endif
        float top = -INFINITY;
#pragma omp simd reduction(max : top)
        for (long j = 0; j < visible; j++) top = s[j] > top ? s[j] : top;
        top *= scale;
        float total = 0.0f;
#pragma omp simd reduction(+ : total)
        for (long j = 0; j < visible; j++) {
            s[j] = exp_approx(s[j] * scale - top);
            total += s[j];
        }
        lse[row] = top + logf(total);
        float inverse = 1.0f / total;
#pragma omp simd
        for (long j = 0; j < visible; j++) pr[j] = narrow(s[j] * inverse);
        memset(pr + visible, 0, (size_t)(seq - visible) * sizeof(bf16));
    }
}

/* The backward of graftlm_causal_softmax from the recomputed scores and the saved lse:
 * p = exp(scale * s - lse) (bf16, for d v = p^T g) and d s = scale * p * (dp - delta), where
 * dp = g @ v^T and delta = rowsum(g * out); both zero above the diagonal. */
void graftlm_causal_softmax_backward(const float *scores, const float *lse, const bf16 *dp,
                                     const float *delta, bf16 *p, bf16 *ds, long mats, long rows,
                                     long seq, float scale, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long row = 0; row < mats * rows; row++) {
        const float *s = scores + row * seq;
        const bf16 *dpr = dp + row * seq;
        bf16 *pr = p + row * seq, *dsr = ds + row * seq;
        long visible = row % rows % seq + 1;
        float l = lse[row], d = delta[row];
#ifdef VECTOR_KERNELS
        __m512 vl = _mm512_set1_ps(l), vd = _mm512_set1_ps(d), vscale = _mm512_set1_ps(scale);
        for (long j = 0; j < visible; j += 16) {
            __mmask16 m = lanes(visible - j);
            __m512 weight = v_exp(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, s + j), vscale, vl));
            v_store_bf16(pr + j, m, weight);
            __m512 diff = _mm512_sub_ps(v_load_bf16(m, dpr + j), vd);
            v_store_bf16(dsr + j, m, _mm512_mul_ps(_mm512_mul_ps(vscale, weight), diff));
        }
        memset(pr + visible, 0, (size_t)(seq - visible) * sizeof(bf16));
        memset(dsr + visible, 0, (size_t)(seq - visible) * sizeof(bf16));
        continue;
#endif
#pragma omp simd
        for (long j = 0; j < visible; j++) {
            float weight = exp_approx(s[j] * scale - l);
            pr[j] = narrow(weight);
            dsr[j] = narrow(scale * weight * (widen(dpr[j]) - d));
        }
        memset(pr + visible, 0, (size_t)(seq - visible) * sizeof(bf16));
        memset(dsr + visible, 0, (size_t)(seq - visible) * sizeof(bf16));
    }
}

/* out[row] = sum_j a[row][j] * b[row][j] in fp32 (the attention backward's rowsum(g * out)) */
void graftlm_row_dot(const bf16 *a, const bf16 *b, float *out, long rows, long n, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long row = 0; row < rows; row++) {
        float total = 0.0f;
#pragma omp simd reduction(+ : total)
        for (long j = 0; j < n; j++) total += widen(a[row * n + j]) * widen(b[row * n + j]);
        out[row] = total;
    }
}
