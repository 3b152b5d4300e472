/* The element-wise kernels of fused_cpu.c for one element type, included once per type:
 * RMSNorm (alone, and after a decoder layer's residual add), SwiGLU, the rotary embedding and
 * the loss's cross-entropy, forward and backward. The including file defines:
 *
 *   T          the element type of the tensors (bf16 or float)
 *   LOAD(v)    an element widened to fp32
 *   STORE(f)   an fp32 value rounded to an element
 *   ROUND(f)   an fp32 value rounded to the element type and back (where torch's forward
 *              rounds an intermediate; a no-op in fp32)
 *   NAME(f)    the name of function f for this type
 *   BF16_VECTORS  1 for the bf16 kernels on a CPU with AVX-512 BF16 (intrinsics), else 0
 *   FLOAT_ELEMENTS  1 for float elements (the cross-entropy keeps its exponentials in place)
 *
 * and this file undefines them at its end.
 * Sums of squares and dot products accumulate in fp32 in every instance. */

/* One row of RMSNorm: out = w * ROUND(src * rstd), rstd = 1 / sqrt(mean(src^2) + eps). With
 * `residual`, src is first h = STORE(residual + x), written to `h` (torch's add rounds the sum
 * once, as here), and the sum of squares is taken on the rounded h in the same pass. */
static inline void NAME(rms_norm_row)(const T *residual, const T *x, T *h, const T *w, T *out,
                                      float *rstd, long n, float eps) {
    const T *src = residual ? h : x;
#if BF16_VECTORS
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
        for (long j = 0; j < n; j++) h[j] = STORE(LOAD(residual[j]) + LOAD(x[j]));
    }
    float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
    for (long j = 0; j < n; j++) squares += LOAD(src[j]) * LOAD(src[j]);
    float r = 1.0f / sqrtf(squares / (float)n + eps);
    *rstd = r;
#pragma omp simd
    for (long j = 0; j < n; j++) out[j] = STORE(LOAD(w[j]) * ROUND(LOAD(src[j]) * r));
#endif
}

/* out = w * ROUND(x * rstd), rstd = 1 / sqrt(mean(x^2) + eps) per row of n values */
void NAME(graftlm_rms_norm_forward)(const T *x, const T *w, T *out, float *rstd, long rows,
                                    long n, float eps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long row = 0; row < rows; row++)
        NAME(rms_norm_row)(NULL, x + row * n, NULL, w, out + row * n, rstd + row, n, eps);
}

/* A decoder layer's residual add and the RMSNorm after it (vLLM's fused_add_rms_norm), one
 * pass: h = STORE(residual + x), out = w * ROUND(h * rstd); h is the residual stream the layer
 * passes on, out the next sublayer's input. */
void NAME(graftlm_add_rms_norm_forward)(const T *residual, const T *x, const T *w, T *h, T *out,
                                        float *rstd, long rows, long n, float eps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long row = 0; row < rows; row++)
        NAME(rms_norm_row)(residual + row * n, x + row * n, h + row * n, w, out + row * n,
                           rstd + row, n, eps);
}

/* dx = [grad_h +] rstd * (g*w - xhat * mean(g*w*xhat)), xhat = x * rstd, rounded once;
 * dw += g * ROUND(xhat) summed over rows into dw_partial[thread][n] (fp32, zeroed by the
 * caller). grad_h (the gradient that reaches the residual stream h directly, for the add's
 * fused form; NULL for a plain RMSNorm), dx or dw_partial may be NULL. No multiply-add is
 * contracted here: grad_h + rstd * (...) is then the norm's dx plus grad_h, as autograd adds
 * them where the add is not fused (a checkpointed layer's replay), bit for bit in fp32. */
NO_FP_CONTRACT_FUNCTION
static void NAME(rms_norm_backward)(const T *grad_h, const T *grad, const T *x, const T *w,
                                    const float *rstd, T *dx, float *dw_partial, long rows,
                                    long n, int threads) {
    NO_FP_CONTRACT_BLOCK
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long row = 0; row < rows; row++) {
        const T *gr = grad + row * n, *xr = x + row * n;
        const T *ghr = grad_h ? grad_h + row * n : NULL;
        float r = rstd[row];
#if BF16_VECTORS
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
            T *dxr = dx + row * n;
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
            for (long j = 0; j < n; j++) dw[j] += LOAD(gr[j]) * ROUND(LOAD(xr[j]) * r);
        }
        if (dx) {
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (long j = 0; j < n; j++) dot += LOAD(gr[j]) * LOAD(w[j]) * LOAD(xr[j]);
            dot *= r * r / (float)n; /* mean(g*w*xhat) * rstd, folded into the xhat term */
            T *dxr = dx + row * n;
            if (ghr) {
#pragma omp simd
                for (long j = 0; j < n; j++)
                    dxr[j] = STORE(LOAD(ghr[j]) +
                                   r * (LOAD(gr[j]) * LOAD(w[j]) - LOAD(xr[j]) * dot));
            } else {
#pragma omp simd
                for (long j = 0; j < n; j++)
                    dxr[j] = STORE(r * (LOAD(gr[j]) * LOAD(w[j]) - LOAD(xr[j]) * dot));
            }
        }
    }
}

void NAME(graftlm_rms_norm_backward)(const T *grad, const T *x, const T *w, const float *rstd,
                                     T *dx, float *dw_partial, long rows, long n, int threads) {
    NAME(rms_norm_backward)(NULL, grad, x, w, rstd, dx, dw_partial, rows, n, threads);
}

/* The backward of graftlm_add_rms_norm_forward: the gradient of residual and of x (the same
 * tensor, d_res = dx = grad_h + RMSNorm's backward of grad_out at h), in one pass per row;
 * grad_h may be NULL (nothing reached h but through the norm). */
void NAME(graftlm_add_rms_norm_backward)(const T *grad_h, const T *grad_out, const T *h,
                                         const T *w, const float *rstd, T *dx,
                                         float *dw_partial, long rows, long n, int threads) {
    NAME(rms_norm_backward)(grad_h, grad_out, h, w, rstd, dx, dw_partial, rows, n, threads);
}

/* out = ROUND(silu(gate)) * up over n values */
void NAME(graftlm_swiglu_forward)(const T *gate, const T *up, T *out, long n, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long start = 0; start < n; start += BLOCK) {
        long end = start + BLOCK < n ? start + BLOCK : n;
#if BF16_VECTORS
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
            float g = LOAD(gate[i]);
            out[i] = STORE(ROUND(g * sigmoid(g)) * LOAD(up[i]));
        }
    }
}

/* d gate = grad * up * silu'(gate), d up = grad * silu(gate);
 * silu'(g) = sigmoid(g) + silu(g) * (1 - sigmoid(g)) */
void NAME(graftlm_swiglu_backward)(const T *grad, const T *gate, const T *up, T *dgate, T *dup,
                                   long n, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long start = 0; start < n; start += BLOCK) {
        long end = start + BLOCK < n ? start + BLOCK : n;
#if BF16_VECTORS
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
            float g = LOAD(gate[i]), d = LOAD(grad[i]);
            float s = sigmoid(g), silu = g * s;
            dup[i] = STORE(d * silu);
            dgate[i] = STORE(d * LOAD(up[i]) * (s + silu * (1.0f - s)));
        }
    }
}

/* The rotary embedding of x [B, H, S, D] (any strides over B, H, S; D contiguous) with cos and
 * sin [B or 1, S, D] (stride 0 over B when shared); out has its own strides.
 * forward:  out = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1)
 * backward (x is the gradient of the output): out = x * cos + (x2 * sin2, -x1 * sin1),
 * the transpose of the forward's map. */
void NAME(graftlm_rotary)(const T *x, const T *cos, const T *sin, T *out, long batch, long heads,
                          long seq, long dim, const long *x_strides, const long *out_strides,
                          const long *cs_strides, int backward, int threads) {
    long half = dim / 2;
#pragma omp parallel for collapse(2) num_threads(threads) schedule(static)
    for (long b = 0; b < batch; b++) {
        for (long s = 0; s < seq; s++) {
            const T *c = cos + b * cs_strides[0] + s * cs_strides[1];
            const T *sn = sin + b * cs_strides[0] + s * cs_strides[1];
            for (long h = 0; h < heads; h++) {
                const T *xr = x + b * x_strides[0] + h * x_strides[1] + s * x_strides[2];
                T *o = out + b * out_strides[0] + h * out_strides[1] + s * out_strides[2];
                if (backward) {
#pragma omp simd
                    for (long j = 0; j < half; j++) {
                        float x1 = LOAD(xr[j]), x2 = LOAD(xr[j + half]);
                        o[j] = STORE(x1 * LOAD(c[j]) + x2 * LOAD(sn[j + half]));
                        o[j + half] = STORE(x2 * LOAD(c[j + half]) - x1 * LOAD(sn[j]));
                    }
                } else {
#pragma omp simd
                    for (long j = 0; j < half; j++) {
                        float x1 = LOAD(xr[j]), x2 = LOAD(xr[j + half]);
                        o[j] = STORE(x1 * LOAD(c[j]) - x2 * LOAD(sn[j]));
                        o[j + half] = STORE(x2 * LOAD(c[j + half]) + x1 * LOAD(sn[j + half]));
                    }
                }
            }
        }
    }
}

/* Cross-entropy of logits [rows][vocab] against targets, and its gradient in place:
 * loss[row] = logsumexp(logits[row]) - logits[row][target], then logits[row] becomes
 * softmax(logits[row]) - onehot(target). Sums and exponentials are fp32; a row stays in the
 * cache across the three passes, so memory sees one. */
void NAME(graftlm_cross_entropy)(T *logits, const int64_t *targets, float *loss, long rows,
                                 long vocab, int threads) {
#if BF16_VECTORS
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
        T *z = logits + row * vocab;
        float top = -INFINITY;
#pragma omp simd reduction(max : top)
        for (long j = 0; j < vocab; j++) top = LOAD(z[j]) > top ? LOAD(z[j]) : top;
        long target = (long)targets[row];
        float target_logit = LOAD(z[target]);
        float total = 0.0f;
#if FLOAT_ELEMENTS
        /* fp32 logits hold their exponentials in place: one exp a value */
#pragma omp simd reduction(+ : total)
        for (long j = 0; j < vocab; j++) {
            z[j] = exp_approx(z[j] - top);
            total += z[j];
        }
        float inverse = 1.0f / total;
#pragma omp simd
        for (long j = 0; j < vocab; j++) z[j] *= inverse;
#else
#pragma omp simd reduction(+ : total)
        for (long j = 0; j < vocab; j++) total += exp_approx(LOAD(z[j]) - top);
        float inverse = 1.0f / total;
#pragma omp simd
        for (long j = 0; j < vocab; j++) z[j] = STORE(exp_approx(LOAD(z[j]) - top) * inverse);
#endif
        loss[row] = top + logf(total) - target_logit;
        z[target] = STORE(LOAD(z[target]) - 1.0f);
    }
}

/* the parameters end with this instance: the next inclusion defines its own */
#undef T
#undef LOAD
#undef STORE
#undef ROUND
#undef NAME
#undef BF16_VECTORS
#undef FLOAT_ELEMENTS
