/* y = x @ w.T for a few rows of x (decode steps): fp32, AVX2 + FMA, one thread.
 *
 * MKL's sgemm packs the weight for every call, which costs more than the product itself when x
 * has 2-16 rows: on a 2-core EPYC it streams weights at ~5 GB/s for 8 rows against ~17 GB/s
 * the memory gives. Here each weight row is read once, straight from memory with a software
 * prefetch of the next rows, and meets every row of x while it sits in L1.
 *
 * Each output y[m, o] is summed in the same order whatever the number of rows and whatever tile
 * computes it (8 lanes along k, then the lanes, then the k % 8 tail), so a row's result does not
 * depend on the rows it is batched with.
 */
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

static inline float lanes_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 odd = _mm_movehdup_ps(s);
    s = _mm_add_ps(s, odd);
    odd = _mm_movehl_ps(odd, s);
    return _mm_cvtss_f32(_mm_add_ss(s, odd));
}

/* MM rows of x (row stride ldx) against NW consecutive weight rows (row stride K) -> y (row
 * stride ldy). Sizes are compile-time so the accumulators stay in registers; the asm barriers
 * keep each loaded vector in a register instead of re-reading it as an FMA memory operand. */
#define TILE(MM, NW)                                                                          \
    static void tile_##MM##x##NW(const float *x, long K, long ldx, const float *w, float *y,  \
                                 long ldy) {                                                  \
        __m256 acc[MM][NW];                                                                   \
        _Pragma("GCC unroll 8") for (int i = 0; i < MM; i++)                                  \
            _Pragma("GCC unroll 8") for (int j = 0; j < NW; j++) acc[i][j] =                  \
                _mm256_setzero_ps();                                                          \
        long K8 = K & ~7L;                                                                    \
        for (long k = 0; k < K8; k += 8) {                                                    \
            __m256 wv[NW];                                                                    \
            _Pragma("GCC unroll 8") for (int j = 0; j < NW; j++) {                            \
                wv[j] = _mm256_loadu_ps(w + j * K + k);                                       \
                __asm__("" : "+x"(wv[j]));                                                    \
                _mm_prefetch((const char *)(w + (NW + j) * K + k), _MM_HINT_T0);              \
            }                                                                                 \
            _Pragma("GCC unroll 8") for (int i = 0; i < MM; i++) {                            \
                __m256 xv = _mm256_loadu_ps(x + i * ldx + k);                                 \
                __asm__("" : "+x"(xv));                                                       \
                _Pragma("GCC unroll 8") for (int j = 0; j < NW; j++) acc[i][j] =              \
                    _mm256_fmadd_ps(xv, wv[j], acc[i][j]);                                    \
            }                                                                                 \
        }                                                                                     \
        for (int i = 0; i < MM; i++)                                                          \
            for (int j = 0; j < NW; j++) {                                                    \
                float s = lanes_sum(acc[i][j]);                                               \
                for (long k = K8; k < K; k++) s += x[i * ldx + k] * w[j * K + k];             \
                y[i * ldy + j] = s;                                                           \
            }                                                                                 \
    }

/* measured widths: fewer rows of x want more weight rows per tile (independent FMA chains) */
TILE(1, 4) TILE(2, 4) TILE(3, 2) TILE(4, 2) TILE(5, 1) TILE(6, 1) TILE(7, 1) TILE(8, 1)
TILE(1, 1) TILE(2, 1) TILE(3, 1) TILE(4, 1)

typedef void (*tile_fn)(const float *, long, long, const float *, float *, long);

static const tile_fn WIDE[9] = {0, tile_1x4, tile_2x4, tile_3x2, tile_4x2,
                                tile_5x1, tile_6x1, tile_7x1, tile_8x1};
static const int WIDTH[9] = {0, 4, 4, 2, 2, 1, 1, 1, 1};
static const tile_fn NARROW[9] = {0, tile_1x1, tile_2x1, tile_3x1, tile_4x1,
                                  tile_5x1, tile_6x1, tile_7x1, tile_8x1};

/* y[M, N] (contiguous) = x[M, K] (row stride ldx) @ w[N, K].T (contiguous) */
void graftlm_small_batch_linear(const float *x, long M, long K, long ldx, const float *w, long N,
                                float *y) {
    if (M <= 0 || N <= 0) return;
    if (M <= 8) {
        int rows = (int)M, nw = WIDTH[rows];
        long o = 0;
        for (; o + nw <= N; o += nw) WIDE[rows](x, K, ldx, w + o * K, y + o, N);
        for (; o < N; o++) NARROW[rows](x, K, ldx, w + o * K, y + o, N);
        return;
    }
    /* more rows: blocks of 8 meet one weight row at a time while it is in L1 */
    for (long o = 0; o < N; o++)
        for (long m0 = 0; m0 < M; m0 += 8) {
            int rows = M - m0 < 8 ? (int)(M - m0) : 8;
            NARROW[rows](x + m0 * ldx, K, ldx, w + o * K, y + m0 * N + o, N);
        }
}

/* out[out_rows[i0 + i], o : o + 8W] += t[i0 + i, :] @ bt[:, o : o + 8W] for R rows: R x W
 * independent accumulators, so the fused multiply-adds of consecutive k do not wait on each
 * other (one accumulator would chain r of them, latency-bound). */
#define ADD_TILE(R, W)                                                                           \
    static void add_tile_##R##x##W(const float *t, long r, const float *bt, long N, float *out,  \
                                   const long *out_rows, long i0, long o) {                      \
        __m256 acc[R][W];                                                                        \
        for (int i = 0; i < R; i++)                                                              \
            for (int w = 0; w < W; w++)                                                          \
                acc[i][w] = _mm256_loadu_ps(out + out_rows[i0 + i] * N + o + 8 * w);             \
        for (long k = 0; k < r; k++)                                                             \
            for (int w = 0; w < W; w++) {                                                        \
                __m256 b = _mm256_loadu_ps(bt + k * N + o + 8 * w);                              \
                for (int i = 0; i < R; i++)                                                      \
                    acc[i][w] =                                                                  \
                        _mm256_fmadd_ps(_mm256_set1_ps(t[(i0 + i) * r + k]), b, acc[i][w]);      \
            }                                                                                    \
        for (int i = 0; i < R; i++)                                                              \
            for (int w = 0; w < W; w++)                                                          \
                _mm256_storeu_ps(out + out_rows[i0 + i] * N + o + 8 * w, acc[i][w]);             \
    }
ADD_TILE(1, 4)
ADD_TILE(2, 4)
ADD_TILE(3, 2)
ADD_TILE(4, 2)
ADD_TILE(1, 1)
ADD_TILE(2, 1)
ADD_TILE(3, 1)
ADD_TILE(4, 1)

typedef void (*add_tile_fn)(const float *, long, const float *, long, float *, const long *, long,
                            long);
static const add_tile_fn ADD_WIDE[5] = {0, add_tile_1x4, add_tile_2x4, add_tile_3x2, add_tile_4x2};
static const int ADD_WIDTH[5] = {0, 4, 4, 2, 2};
static const add_tile_fn ADD_NARROW[5] = {0, add_tile_1x1, add_tile_2x1, add_tile_3x1,
                                          add_tile_4x1};

/* out[out_rows[i], :] += t[i, :] @ bt for `rows` rows of t [rows, r] and bt [r, N]: vectors
 * run along the outputs (a broadcast of t[i, k] times a row of bt), so there is no per-output
 * lane sum; each output accumulates k = 0..r-1 in order onto its previous value with fused
 * multiply-adds (the vector lanes and the scalar tail alike), whatever the number of rows or
 * the tile that computes it. */
static void add_rows_times(const float *t, long rows, long r, const float *bt, long N, float *out,
                           const long *out_rows) {
    long N8 = N & ~7L;
    for (long i0 = 0; i0 < rows; i0 += 4) {
        int R = rows - i0 < 4 ? (int)(rows - i0) : 4;
        long step = 8L * ADD_WIDTH[R], o = 0;
        for (; o + step <= N8; o += step) ADD_WIDE[R](t, r, bt, N, out, out_rows, i0, o);
        for (; o < N8; o += 8) ADD_NARROW[R](t, r, bt, N, out, out_rows, i0, o);
    }
    for (long o = N8; o < N; o++)
        for (long i = 0; i < rows; i++) {
            float *y = out + out_rows[i] * N + o;
            float acc = *y;
            for (long k = 0; k < r; k++) acc = __builtin_fmaf(t[i * r + k], bt[k * N + o], acc);
            *y = acc;
        }
}

/* y[m] += (scale * x[m] @ a.T) @ bt for every row m: graftlm_add_lora with no slots. x is read
 * in place (row stride ldx) and the small buffers live on the stack: nothing to group or copy.
 * Returns 0, or 1 when out of memory (nothing is changed then). */
static int add_lora_every_row(const float *x, long M, long K, long ldx, const float *a, long r,
                              const float *bt, long N, float scale, float *y) {
    if (M <= 0 || N <= 0 || r <= 0) return 0;
    float small[16 * 64];
    long identity[16];
    float *t = M * r <= 16 * 64 ? small : malloc(sizeof(float) * (size_t)(M * r));
    long *rows = M <= 16 ? identity : malloc(sizeof(long) * (size_t)M);
    if (!t || !rows) {
        if (t != small) free(t);
        if (rows != identity) free(rows);
        return 1;
    }
    for (long m = 0; m < M; m++) rows[m] = m;
    graftlm_small_batch_linear(x, M, K, ldx, a, r, t);
    for (long i = 0; i < M * r; i++) t[i] *= scale;
    add_rows_times(t, M, r, bt, N, y, rows);
    if (t != small) free(t);
    if (rows != identity) free(rows);
    return 0;
}

/* LoRA updates of a few rows: y[m] += (scales[s] * x[m] @ a[s].T) @ bt[s] with s = slots[m]
 * (rows with s < 0 are left alone; slots NULL: every row uses slot 0). a is [slots, r, K] and bt
 * is B transposed, [slots, r, N], both contiguous (a bank padded to rank r holds zeros there); y
 * is [M, N] contiguous. Rows sharing a slot are multiplied together, so A and B are read once
 * per slot, and a row's update is computed the same way whatever else is in the batch. Returns
 * 0, or 1 when out of memory (nothing is changed then). */
int graftlm_add_lora(const float *x, long M, long K, long ldx, const float *a, long r,
                     const float *bt, long N, const long *slots, const float *scales, float *y) {
    if (!slots) return add_lora_every_row(x, M, K, ldx, a, r, bt, N, scales[0], y);
    float *xs = malloc(sizeof(float) * (size_t)(M * K + M * r));
    long *rows = malloc(sizeof(long) * (size_t)M);
    char *done = calloc((size_t)M, 1);
    if (!xs || !rows || !done) {
        free(xs);
        free(rows);
        free(done);
        return 1;
    }
    float *t = xs + M * K;
    for (long first = 0; first < M; first++) {
        long slot = slots ? slots[first] : 0;
        if (done[first] || slot < 0) continue;
        long count = 0;
        for (long m = first; m < M; m++)
            if (!done[m] && (slots ? slots[m] : 0) == slot) {
                done[m] = 1;
                rows[count] = m;
                memcpy(xs + count * K, x + m * ldx, sizeof(float) * (size_t)K);
                count++;
            }
        graftlm_small_batch_linear(xs, count, K, K, a + slot * r * K, r, t);
        float scale = scales[slot];
        for (long i = 0; i < count * r; i++) t[i] *= scale;
        add_rows_times(t, count, r, bt + slot * r * N, N, y, rows);
    }
    free(done);
    free(rows);
    free(xs);
    return 0;
}

/* A layer with one LoRA adapter at a decode step, in one call:
 * y[M, N] (contiguous) = x @ w.T (+ bias) + (scale * x @ a.T) @ bt, a [r, K], bt [r, N].
 * The same operations in the same order as graftlm_small_batch_linear, the bias add and
 * graftlm_add_lora with every row on slot 0, so the result equals those calls bit for bit; one
 * call instead of three saves the interpreter's per-call cost in every layer of every step.
 * Returns 0, or 1 when out of memory (y is then unspecified). */
int graftlm_lora_linear(const float *x, long M, long K, long ldx, const float *w, long N,
                        const float *bias, const float *a, long r, const float *bt, float scale,
                        float *y) {
    graftlm_small_batch_linear(x, M, K, ldx, w, N, y);
    if (bias)
        for (long m = 0; m < M; m++)
            for (long o = 0; o < N; o++) y[m * N + o] += bias[o];
    return add_lora_every_row(x, M, K, ldx, a, r, bt, N, scale, y);
}
