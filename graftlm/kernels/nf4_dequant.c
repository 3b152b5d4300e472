/* NF4 dequantization: out[i] = levels[code[i]] * absmax[i / blocksize], AVX2, fp32 or bf16 out;
 * with per-block offsets (a 4-bit affine grid, graftlm/quant/q4_grid.py), that product plus
 * offsets[i / blocksize], rounded once more in fp32 (a plain add after the multiply).
 *
 * Codes are packed two per byte, element 2k in the high nibble of byte k. Every product is the
 * fp32 product of the level and its block's scale (a plain multiply: nothing here may fuse it
 * into an FMA, and the file is compiled with -ffp-contract=off), written as fp32 or rounded once
 * to bf16, to nearest even, exactly as torch casts fp32 to bf16; so the output is bit-identical
 * to graftlm.quant.nf4's torch path. Double-quantized block scales are decoded here as there,
 * with the same two roundings: (dynamic_code[code] * group_scale) + offset.
 *
 * The 16 levels live in two registers; a code picks its level with two 8-lane permutes and a
 * blend on its bit 3. Each step decodes 8 bytes into 16 values, which never straddle a block
 * (block sizes are multiples of 32 and blocks start at even elements). Blocks are split across
 * `threads` OpenMP threads where the library is built with -fopenmp (graftlm/kernels/
 * nf4_dequant.py does that only where torch runs on GNU OpenMP, so the library shares torch's
 * libgomp and its thread pool); elsewhere the pragma is ignored and one thread does it all.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    const float *absmax;         /* fp32 block scales, or NULL: decoded from the fields below */
    const uint8_t *absmax_codes; /* 8-bit codes into dynamic_code, one per block */
    const float *dynamic_code;   /* the 256 levels of the 8-bit map */
    const float *group_scales;   /* one per 256 blocks */
    const float *offset;         /* one value, added after the scaling */
} scales_t;

static inline uint16_t bf16_bits(float value) {
    uint32_t u;
    memcpy(&u, &value, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN, as c10::BFloat16 */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline __m256 lookup(__m256i codes, __m256 low_levels, __m256 high_levels) {
    __m256 low = _mm256_permutevar8x32_ps(low_levels, codes);
    __m256 high = _mm256_permutevar8x32_ps(high_levels, codes);
    return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28)));
}

/* bf16 bits of 8 finite fp32 values in the low half of each 32-bit lane (nearest even) */
static inline __m256i round_bf16(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff));
    return _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
}

/* 16 values from 8 bytes, in order: the high nibble of each byte, then its low nibble */
static inline void decode16(const uint8_t *bytes8, __m256 low_levels, __m256 high_levels,
                            __m256 scales, const __m256 *shift, __m256 *first, __m256 *second) {
    __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)bytes8));
    __m256 high = lookup(_mm256_srli_epi32(bytes, 4), low_levels, high_levels);
    __m256 low = lookup(_mm256_and_si256(bytes, _mm256_set1_epi32(15)), low_levels, high_levels);
    __m256 even = _mm256_unpacklo_ps(high, low); /* h0 l0 h1 l1 | h4 l4 h5 l5 */
    __m256 odd = _mm256_unpackhi_ps(high, low);  /* h2 l2 h3 l3 | h6 l6 h7 l7 */
    *first = _mm256_mul_ps(_mm256_permute2f128_ps(even, odd, 0x20), scales);
    *second = _mm256_mul_ps(_mm256_permute2f128_ps(even, odd, 0x31), scales);
    if (shift) { /* NULL for NF4: adding 0.0 would turn a -0.0 product into +0.0 */
        *first = _mm256_add_ps(*first, *shift);
        *second = _mm256_add_ps(*second, *shift);
    }
}

static inline float value_at(const uint8_t *packed, const float *levels, long i, float scale,
                             const float *shift) {
    uint8_t byte = packed[i / 2];
    float value = levels[(i & 1) ? (byte & 15) : (byte >> 4)] * scale;
    return shift ? value + *shift : value;
}

static inline float block_scale(const scales_t *s, long b) {
    if (s->absmax) return s->absmax[b];
    float scaled = s->dynamic_code[s->absmax_codes[b]] * s->group_scales[b >> 8];
    return scaled + *s->offset;
}

/* values [start, end) of one block, all with the same scale (and offset, where `offset` is
 * not NULL) */
static void dequantize_block(const uint8_t *packed, const float *levels, float scale,
                             const float *offset, long start, long end, int bf16, void *out) {
    const __m256 low_levels = _mm256_loadu_ps(levels);
    const __m256 high_levels = _mm256_loadu_ps(levels + 8);
    const __m256 scales = _mm256_set1_ps(scale);
    const __m256 shift_value = _mm256_set1_ps(offset ? *offset : 0.0f);
    const __m256 *shift = offset ? &shift_value : NULL;
    float *out32 = (float *)out;
    uint16_t *out16 = (uint16_t *)out;
    __m256 first, second;
    long i = start;
    if (!bf16) {
        for (; i + 16 <= end; i += 16) {
            decode16(packed + i / 2, low_levels, high_levels, scales, shift, &first, &second);
            _mm256_storeu_ps(out32 + i, first);
            _mm256_storeu_ps(out32 + i + 8, second);
        }
        for (; i < end; i++) out32[i] = value_at(packed, levels, i, scale, offset);
        return;
    }
    if (isfinite(scale) && (!offset || isfinite(*offset))) { /* finite values: no NaN to round */
        for (; i + 16 <= end; i += 16) {
            decode16(packed + i / 2, low_levels, high_levels, scales, shift, &first, &second);
            __m256i bits = _mm256_packus_epi32(round_bf16(first), round_bf16(second));
            _mm256_storeu_si256((__m256i *)(out16 + i), _mm256_permute4x64_epi64(bits, 0xD8));
        }
    }
    for (; i < end; i++) out16[i] = bf16_bits(value_at(packed, levels, i, scale, offset));
}

/* Dequantize n values (blocksize a multiple of 16) into out: fp32, or bf16 bits if bf16 != 0.
 * Block scales: `absmax` (fp32), or where it is NULL decoded from `absmax_codes`,
 * `dynamic_code`, `group_scales` and `*offset`. levels: the 16 fp32 levels (NF4's, or 0..15).
 * block_offsets: NULL, or one fp32 value per block added after the scaling. */
void graftlm_nf4_dequantize(const uint8_t *packed, const float *absmax,
                            const uint8_t *absmax_codes, const float *dynamic_code,
                            const float *group_scales, const float *offset,
                            const float *block_offsets, const float *levels, long n,
                            long blocksize, int bf16, void *out, int threads) {
    scales_t scales = {absmax, absmax_codes, dynamic_code, group_scales, offset};
    long blocks = (n + blocksize - 1) / blocksize;
    if (threads < 1) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long b = 0; b < blocks; b++) {
        long start = b * blocksize;
        long end = start + blocksize < n ? start + blocksize : n;
        const float *shift = block_offsets ? block_offsets + b : NULL;
        dequantize_block(packed, levels, block_scale(&scales, b), shift, start, end, bf16, out);
    }
}
