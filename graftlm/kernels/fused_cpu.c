/* Element-wise work of a bf16 Llama training step, one pass over memory each: RMSNorm (alone,
 * and after a decoder layer's residual add), SwiGLU and the rotary embedding, forward and
 * backward (graftlm/kernels/fused_cpu.py binds them).
 *
 * Tensors are bf16 (uint16_t bits); every value is widened to fp32 in registers, computed in
 * fp32 (sums of squares and dot products accumulate in fp32) and rounded once to bf16, to
 * nearest even as torch casts. Where transformers' forward rounds an intermediate to bf16
 * (RMSNorm's normalised row before the weight, SiLU's output before the product) the forward
 * rounds there too, so its logits are those of transformers' bf16 forward up to the last bit of
 * the fp32 row sums; the backward works on fp32 values throughout.
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

/* One row of RMSNorm: out = w * bf16(src * rstd), rstd = 1 / sqrt(mean(src^2) + eps). With
 * `residual`, src is first h = bf16(residual + x), written to `h` (torch's bf16 add rounds the
 * sum once, as here), and the sum of squares is taken on the rounded h in the same pass. */
static inline void rms_norm_row(const bf16 *residual, const bf16 *x, bf16 *h, const bf16 *w,
                                bf16 *out, float *rstd, long n, float eps) {
    const bf16 *src = residual ? h : x;
#ifdef VECTOR_KERNELS
    __m512 sum = _mm512_setzero_ps();
    for (long j = 0; j < n; j += 16) {
        __mmask16 m = lanes(n - j);
        __m512 v = v_load_bf16(m, x + j);
        if (residual) {
            v = v_round_bf16(_mm512_add_ps(v_load_bf16(m, residual + j), v));
            v_store_bf16(h + j, m, v);
        }
        sum = _mm512_fmadd_ps(v, v, sum);
    }
    float rv = 1.0f / sqrtf(_mm512_reduce_add_ps(sum) / (float)n + eps);
    *rstd = rv;
    __m512 scale = _mm512_set1_ps(rv);
    for (long j = 0; j < n; j += 16) {
        __mmask16 m = lanes(n - j);
        __m512 normed = v_round_bf16(_mm512_mul_ps(v_load_bf16(m, src + j), scale));
        v_store_bf16(out + j, m, _mm512_mul_ps(v_load_bf16(m, w + j), normed));
    }
#else
    /* the sum of squares reads h back from L1 in the plain norm's own loop: the compiler
     * vectorizes a fused loop with another order of the sum, and the fused forward should be
     * the add and the norm's, bit for bit */
    if (residual) {
#pragma omp simd
        for (long j = 0; j < n; j++) h[j] = narrow(widen(residual[j]) + widen(x[j]));
    }
    float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
    for (long j = 0; j < n; j++) squares += widen(src[j]) * widen(src[j]);
    float r = 1.0f / sqrtf(squares / (float)n + eps);
    *rstd = r;
#pragma omp simd
    for (long j = 0; j < n; j++) out[j] = narrow(widen(w[j]) * round_bf16(widen(src[j]) * r));
#endif
}

/* out = w * bf16(x * rstd), rstd = 1 / sqrt(mean(x^2) + eps) per row of n values */
void graftlm_rms_norm_forward(const bf16 *x, const bf16 *w, bf16 *out, float *rstd, long rows,
                              long n, float eps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long row = 0; row < rows; row++)
        rms_norm_row(NULL, x + row * n, NULL, w, out + row * n, rstd + row, n, eps);
}

/* A decoder layer's residual add and the RMSNorm after it (vLLM's fused_add_rms_norm), one
 * pass: h = bf16(residual + x), out = w * bf16(h * rstd); h is the residual stream the layer
 * passes on, out the next sublayer's input. */
void graftlm_add_rms_norm_forward(const bf16 *residual, const bf16 *x, const bf16 *w, bf16 *h,
                                  bf16 *out, float *rstd, long rows, long n, float eps,
                                  int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long row = 0; row < rows; row++)
        rms_norm_row(residual + row * n, x + row * n, h + row * n, w, out + row * n, rstd + row,
                     n, eps);
}

/* dx = [grad_h +] rstd * (g*w - xhat * mean(g*w*xhat)), xhat = x * rstd, rounded to bf16 once;
 * dw += g * bf16(xhat) summed over rows into dw_partial[thread][n] (fp32, zeroed by the caller).
 * grad_h (the gradient that reaches the residual stream h directly, for the add's fused form;
 * NULL for a plain RMSNorm), dx or dw_partial may be NULL. */
static void rms_norm_backward(const bf16 *grad_h, const bf16 *grad, const bf16 *x, const bf16 *w,
                              const float *rstd, bf16 *dx, float *dw_partial, long rows, long n,
                              int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long row = 0; row < rows; row++) {
        const bf16 *gr = grad + row * n, *xr = x + row * n;
        const bf16 *ghr = grad_h ? grad_h + row * n : NULL;
        float r = rstd[row];
#ifdef VECTOR_KERNELS
        __m512 vr = _mm512_set1_ps(r);
        if (dw_partial) {
            float *dw = dw_partial + (long)thread_index() * n;
            for (long j = 0; j < n; j += 16) {
                __mmask16 m = lanes(n - j);
                __m512 normed = v_round_bf16(_mm512_mul_ps(v_load_bf16(m, xr + j), vr));
                __m512 acc = _mm512_maskz_loadu_ps(m, dw + j);
                acc = _mm512_fmadd_ps(v_load_bf16(m, gr + j), normed, acc);
                _mm512_mask_storeu_ps(dw + j, m, acc);
            }
        }
        if (dx) {
            __m512 sum = _mm512_setzero_ps();
            for (long j = 0; j < n; j += 16) {
                __mmask16 m = lanes(n - j);
                __m512 gw = _mm512_mul_ps(v_load_bf16(m, gr + j), v_load_bf16(m, w + j));
                sum = _mm512_fmadd_ps(gw, v_load_bf16(m, xr + j), sum);
            }
            __m512 dot = _mm512_set1_ps(_mm512_reduce_add_ps(sum) * r * r / (float)n);
            bf16 *dxr = dx + row * n;
            for (long j = 0; j < n; j += 16) {
                __mmask16 m = lanes(n - j);
                __m512 gw = _mm512_mul_ps(v_load_bf16(m, gr + j), v_load_bf16(m, w + j));
                __m512 centred = _mm512_fnmadd_ps(v_load_bf16(m, xr + j), dot, gw);
                __m512 d = _mm512_mul_ps(vr, centred);
                if (ghr) d = _mm512_add_ps(v_load_bf16(m, ghr + j), d);
                v_store_bf16(dxr + j, m, d);
            }
        }
        continue;
#endif
        if (dw_partial) {
            float *dw = dw_partial + (long)thread_index() * n;
#pragma omp simd
            for (long j = 0; j < n; j++) dw[j] += widen(gr[j]) * round_bf16(widen(xr[j]) * r);
        }
        if (dx) {
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (long j = 0; j < n; j++) dot += widen(gr[j]) * widen(w[j]) * widen(xr[j]);
            dot *= r * r / (float)n; /* mean(g*w*xhat) * rstd, folded into the xhat term */
            bf16 *dxr = dx + row * n;
            if (ghr) {
#pragma omp simd
                for (long j = 0; j < n; j++)
                    dxr[j] = narrow(widen(ghr[j]) +
                                    r * (widen(gr[j]) * widen(w[j]) - widen(xr[j]) * dot));
            } else {
#pragma omp simd
                for (long j = 0; j < n; j++)
                    dxr[j] = narrow(r * (widen(gr[j]) * widen(w[j]) - widen(xr[j]) * dot));
            }
        }
    }
}

void graftlm_rms_norm_backward(const bf16 *grad, const bf16 *x, const bf16 *w, const float *rstd,
                               bf16 *dx, float *dw_partial, long rows, long n, int threads) {
    rms_norm_backward(NULL, grad, x, w, rstd, dx, dw_partial, rows, n, threads);
}

/* The backward of graftlm_add_rms_norm_forward: the gradient of residual and of x (the same
 * tensor, d_res = dx = grad_h + RMSNorm's backward of grad_out at h), in one pass per row;
 * grad_h may be NULL (nothing reached h but through the norm). */
void graftlm_add_rms_norm_backward(const bf16 *grad_h, const bf16 *grad_out, const bf16 *h,
                                   const bf16 *w, const float *rstd, bf16 *dx,
                                   float *dw_partial, long rows, long n, int threads) {
    rms_norm_backward(grad_h, grad_out, h, w, rstd, dx, dw_partial, rows, n, threads);
}

/* element-wise kernels run in blocks of this many values, one block a task for the threads */
#define BLOCK 4096

/* out = bf16(silu(gate)) * up over n values */
void graftlm_swiglu_forward(const bf16 *gate, const bf16 *up, bf16 *out, long n, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long start = 0; start < n; start += BLOCK) {
        long end = start + BLOCK < n ? start + BLOCK : n;
#ifdef VECTOR_KERNELS
        for (long i = start; i < end; i += 16) {
            __mmask16 m = lanes(end - i);
            __m512 g = v_load_bf16(m, gate + i);
            __m512 silu = v_round_bf16(_mm512_mul_ps(g, v_sigmoid(g)));
            v_store_bf16(out + i, m, _mm512_mul_ps(silu, v_load_bf16(m, up + i)));
        }
        continue;
#endif
#pragma omp simd
        for (long i = start; i < end; i++) {
            float g = widen(gate[i]);
            out[i] = narrow(round_bf16(g * sigmoid(g)) * widen(up[i]));
        }
    }
}

/* d gate = grad * up * silu'(gate), d up = grad * silu(gate);
 * silu'(g) = sigmoid(g) + silu(g) * (1 - sigmoid(g)) */
void graftlm_swiglu_backward(const bf16 *grad, const bf16 *gate, const bf16 *up, bf16 *dgate,
                             bf16 *dup, long n, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long start = 0; start < n; start += BLOCK) {
        long end = start + BLOCK < n ? start + BLOCK : n;
#ifdef VECTOR_KERNELS
        for (long i = start; i < end; i += 16) {
            __mmask16 m = lanes(end - i);
            __m512 g = v_load_bf16(m, gate + i), d = v_load_bf16(m, grad + i);
            __m512 sg = v_sigmoid(g), silu = _mm512_mul_ps(g, sg);
            v_store_bf16(dup + i, m, _mm512_mul_ps(d, silu));
            __m512 slope = _mm512_fmadd_ps(silu, _mm512_sub_ps(_mm512_set1_ps(1.0f), sg), sg);
            __m512 du = _mm512_mul_ps(d, v_load_bf16(m, up + i));
            v_store_bf16(dgate + i, m, _mm512_mul_ps(du, slope));
        }
        continue;
#endif
#pragma omp simd
        for (long i = start; i < end; i++) {
            float g = widen(gate[i]), d = widen(grad[i]);
            float s = sigmoid(g), silu = g * s;
            dup[i] = narrow(d * silu);
            dgate[i] = narrow(d * widen(up[i]) * (s + silu * (1.0f - s)));
        }
    }
}

/* The rotary embedding of x [B, H, S, D] (any strides over B, H, S; D contiguous) with cos and
 * sin [B or 1, S, D] (stride 0 over B when shared); out has its own strides.
 * forward:  out = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1)
 * backward (x is the gradient of the output): out = x * cos + (x2 * sin2, -x1 * sin1),
 * the transpose of the forward's map. */
void graftlm_rotary(const bf16 *x, const bf16 *cos, const bf16 *sin, bf16 *out, long batch,
                    long heads, long seq, long dim, const long *x_strides,
                    const long *out_strides, const long *cs_strides, int backward, int threads) {
    long half = dim / 2;
#pragma omp parallel for collapse(2) num_threads(threads) schedule(static)
    for (long b = 0; b < batch; b++) {
        for (long s = 0; s < seq; s++) {
            const bf16 *c = cos + b * cs_strides[0] + s * cs_strides[1];
            const bf16 *sn = sin + b * cs_strides[0] + s * cs_strides[1];
            for (long h = 0; h < heads; h++) {
                const bf16 *xr = x + b * x_strides[0] + h * x_strides[1] + s * x_strides[2];
                bf16 *o = out + b * out_strides[0] + h * out_strides[1] + s * out_strides[2];
                if (backward) {
#pragma omp simd
                    for (long j = 0; j < half; j++) {
                        float x1 = widen(xr[j]), x2 = widen(xr[j + half]);
                        o[j] = narrow(x1 * widen(c[j]) + x2 * widen(sn[j + half]));
                        o[j + half] = narrow(x2 * widen(c[j + half]) - x1 * widen(sn[j]));
                    }
                } else {
#pragma omp simd
                    for (long j = 0; j < half; j++) {
                        float x1 = widen(xr[j]), x2 = widen(xr[j + half]);
                        o[j] = narrow(x1 * widen(c[j]) - x2 * widen(sn[j]));
                        o[j + half] = narrow(x2 * widen(c[j + half]) + x1 * widen(sn[j + half]));
                    }
                }
            }
        }
    }
}

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

/* Cross-entropy of bf16 logits [rows][vocab] against targets, and its gradient in place:
 * loss[row] = logsumexp(logits[row]) - logits[row][target], then logits[row] becomes
 * softmax(logits[row]) - onehot(target), in bf16. Sums and exponentials are fp32; a row
 * (vocab x 2 bytes) stays in the cache across the three passes, so memory sees one. */
void graftlm_cross_entropy(bf16 *logits, const int64_t *targets, float *loss, long rows,
                           long vocab, int threads) {
#ifdef VECTOR_KERNELS
    /* the row's exponentials are kept in fp32 between the sum and the write (one exp a value,
     * not two); a row of them (vocab x 4 bytes) stays in the cache */
#pragma omp parallel num_threads(threads)
    {
        float *kept = malloc((size_t)vocab * sizeof(float)); /* NULL: computed twice instead */
#pragma omp for schedule(static)
        for (long row = 0; row < rows; row++) {
            bf16 *z = logits + row * vocab;
            __m512 vtop = _mm512_set1_ps(-INFINITY);
            for (long j = 0; j < vocab; j += 16) {
                __mmask16 m = lanes(vocab - j);
                vtop = _mm512_mask_max_ps(vtop, m, vtop, v_load_bf16(m, z + j));
            }
            float top = _mm512_reduce_max_ps(vtop);
            __m512 shift = _mm512_set1_ps(top), vsum = _mm512_setzero_ps();
            for (long j = 0; j < vocab; j += 16) {
                __mmask16 m = lanes(vocab - j);
                __m512 e = v_exp(_mm512_sub_ps(v_load_bf16(m, z + j), shift));
                e = _mm512_maskz_mov_ps(m, e); /* lanes past the row add nothing */
                if (kept) _mm512_mask_storeu_ps(kept + j, m, e);
                vsum = _mm512_add_ps(vsum, e);
            }
            float total = _mm512_reduce_add_ps(vsum);
            long target = (long)targets[row];
            loss[row] = top + logf(total) - widen(z[target]);
            __m512 inverse = _mm512_set1_ps(1.0f / total);
            for (long j = 0; j < vocab; j += 16) {
                __mmask16 m = lanes(vocab - j);
                __m512 e = kept ? _mm512_maskz_loadu_ps(m, kept + j)
                                : v_exp(_mm512_sub_ps(v_load_bf16(m, z + j), shift));
                v_store_bf16(z + j, m, _mm512_mul_ps(e, inverse));
            }
            z[target] = narrow(widen(z[target]) - 1.0f);
        }
        free(kept);
    }
    return;
#endif
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long row = 0; row < rows; row++) {
        bf16 *z = logits + row * vocab;
        float top = -INFINITY;
#pragma omp simd reduction(max : top)
        for (long j = 0; j < vocab; j++) top = widen(z[j]) > top ? widen(z[j]) : top;
        float total = 0.0f;
#pragma omp simd reduction(+ : total)
        for (long j = 0; j < vocab; j++) total += exp_approx(widen(z[j]) - top);
        long target = (long)targets[row];
        float target_logit = widen(z[target]);
        loss[row] = top + logf(total) - target_logit;
        float inverse = 1.0f / total;
#pragma omp simd
        for (long j = 0; j < vocab; j++) z[j] = narrow(exp_approx(widen(z[j]) - top) * inverse);
        z[target] = narrow(widen(z[target]) - 1.0f);
    }
}
