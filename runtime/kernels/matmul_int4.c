/* MatMulInt4: 4-bit weights times fp32 activations, an ONNX Runtime custom op (domain ai.llamatrt)
 * for the CPU.
 *
 * Why it exists: ONNX Runtime's MatMulNBits either keeps fp32 activations (accuracy level 0: exact,
 * but its kernel dequantizes every weight to fp32, several times slower than its int8 kernel) or
 * rounds them to int8 per block (level 4: fast, but the rounding alone changes a model's answers,
 * docs/quantization.md). Here each block of 32 activations is written exactly enough in integers:
 * x = s * (65536 a + 256 b + c) with a, b, c int8 and s = max|x| / (127 * 65536), 24 bits, an
 * error of at most max|x| / 2^24 per element, which is fp32's own rounding. The weight codes (0..15)
 * meet the three digits in int8 dot products (the same instructions as MatMulNBits' int8 kernel,
 * three times), whose sums are exact in int32, so the product is fp32's to within its rounding at
 * close to the int8 kernel's speed:
 *
 *   y[m, n] = sum_b ( d[n, b] * s[m, b] * sum_k q[n, k] * (65536 a + 256 b + c)[m, k]  +  o[n, b] * X[m, b] )
 *
 * where a weight is d * q + o (Q4_1's form; MatMulNBits' symmetric blocks are o = -8 d) and X is the
 * fp32 sum of a block's activations.
 *
 * With the attribute activation_bits = 16, two digits: x = s * (256 a + c), s = max|x| / (127 * 256),
 * an error of at most max|x| / 2^16 per element (finer than fp16's 11-bit mantissa for every element
 * within 32x of its block's largest), two int8 dot products instead of three. The exporter writes it
 * where the weights were re-quantized from floats (their own error is orders of magnitude larger;
 * docs/quantization.md has the measurements) and keeps 24 bits (the default, absent the attribute)
 * for a GGUF's blocks, whose products must equal the fp32 reference's.
 *
 * Inputs: A [..., K] float; B uint8 [N, K / block, block / 2] (MatMulNBits' layout: element 2i in
 * the low nibble of byte i); scales float [N * K / block] (row n's blocks together); offsets
 * float [K / block, N] (optional: absent means -8 * scales; the layout llamatrt's artifacts store).
 * block_size a multiple of 32. B, scales and offsets must be constant initializers: they are
 * repacked once, when the session is made, into tiles of 16 output rows.
 * Output: Y [..., N] float; or, with the attribute swiglu = 1, Y [..., N / 2] = silu(P[..., :N / 2]) *
 * P[..., N / 2:] for the product P (a Llama MLP's gate and up projections held as one weight, N / 2 a
 * multiple of 8): the activation is applied as each tile's outputs are made, so the graph needs no
 * Slice, Sigmoid or Mul nodes after it (on a small model's decode step each node costs dispatch time).
 *
 * Only the few ONNX Runtime C API entries this uses are declared below, at their indices in
 * OrtApi (a table that only ever grows); RegisterCustomOps asks for API version 20 (ONNX Runtime
 * 1.20), which has every one of them.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <pthread.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MATMUL_INT4_X86 1
#endif

/* ---- the kernel ------------------------------------------------------------------------------ */

#define GROUP 32                                   /* activations per scale */
#define TILE 16                                    /* output rows per tile */
#define TILE_CODES (TILE * GROUP / 2)              /* bytes of one tile-group's codes: 256 */
#define LAYOUT_HALF 1      /* a tile-group's d (and o) are fp16, else fp32 */
#define LAYOUT_SYMMETRIC 2 /* no o: every block's is -8 d (MatMulNBits' symmetric blocks, Q4_0) */
#define PARTS 3       /* int8 digits of an activation, at most */
#define LIMIT_24 8323072 /* 127 * 65536: three digits, the top one within int8 */
#define LIMIT_16 32512   /* 127 * 256: two digits */
#define PREFETCH_GROUPS 8 /* how far ahead the AVX2 path asks for a tile's codes (2.5 KiB) */
#define WORK_ITEMS_PER_CPU 4

/* A block of 32 activations as s * (65536 * a + 256 * b + c), a, b, c int8 (part[0..2]), or with
 * 16-bit activations s * (256 * a + c) (part[0..1]), and the block's exact sum for the offsets. */
typedef struct {
  int8_t part[PARTS][GROUP];
  float scale;
  float sum;
} Group;

typedef struct {
  int64_t n, k, groups, tiles;
  int gated;      /* swiglu: tile t holds gate rows 8t..8t+7, then up rows N/2 + 8t..N/2 + 8t+7 */
  int layout;     /* LAYOUT_HALF: every d and o is an fp16 value (a GGUF's are); LAYOUT_SYMMETRIC: no o */
  int64_t stride; /* bytes of one tile-group: layout_stride(layout) */
  uint8_t* packed; /* tiles * groups * stride bytes */
} Weights;

/* A tile-group: its codes, then d[16] and (unless symmetric) o[16], fp16 or fp32: 288 to 384 bytes. */
static int64_t layout_stride(int layout) {
  return TILE_CODES + TILE * (layout & LAYOUT_HALF ? 2 : 4) * (layout & LAYOUT_SYMMETRIC ? 1 : 2);
}

/* A weight's d and o go to the tiles as fp16 where that loses nothing (a GGUF's Q4_0/Q4_1 blocks
 * store them in fp16; llamatrt's own quantizers choose fp16 scales), and symmetric blocks keep no o:
 * decoding reads every weight byte once per token, so 288 bytes per 512 weights (Q4_0's 18 per 32)
 * or 320 (Q4_1's 20) instead of 384 is that much less to read. The conversions are written out (rather than
 * _Float16, which older compilers lack); the AVX2 path reads the same bits with F16C. */
static int float_to_half(float value, uint16_t* out) { /* 1 where value is exactly an fp16 value */
  uint16_t sign = signbit(value) ? 0x8000 : 0;
  float a = fabsf(value);
  if (a == 0.0f) {
    *out = sign;
    return 1;
  }
  if (!isfinite(a)) return 0;
  int e;
  float f = frexpf(a, &e); /* a = f * 2^e, f in [0.5, 1) */
  if (e - 1 >= -14) {      /* a normal fp16: (1 + m / 1024) * 2^(e - 1) */
    float m = ldexpf(f, 11);
    if (e - 1 > 15 || m != floorf(m)) return 0;
    *out = (uint16_t)(sign | ((e - 1 + 15) << 10) | ((int)m - 1024));
    return 1;
  }
  float m = ldexpf(a, 24); /* a subnormal one: m * 2^-24 */
  if (m != floorf(m)) return 0;
  *out = (uint16_t)(sign | (int)m);
  return 1;
}

static float half_to_float(uint16_t h) {
  int exponent = (h >> 10) & 31, mantissa = h & 1023;
  float v = exponent == 0    ? ldexpf((float)mantissa, -24)
            : exponent == 31 ? (mantissa ? NAN : INFINITY)
                             : ldexpf((float)(mantissa | 1024), exponent - 25);
  return (h & 0x8000) ? -v : v;
}

static int weights_layout(const float* scales, const float* offsets, int64_t count) {
  uint16_t unused;
  int half = 1;
  for (int64_t i = 0; i < count && half; i++)
    half = float_to_half(scales[i], &unused) && (!offsets || float_to_half(offsets[i], &unused));
  return (half ? LAYOUT_HALF : 0) | (offsets ? 0 : LAYOUT_SYMMETRIC);
}

/* d of a tile-group's row r (r < 16), as packed */
static float scale_at(const uint8_t* p, int layout, int r) {
  return layout & LAYOUT_HALF ? half_to_float(((const uint16_t*)(p + TILE_CODES))[r])
                              : ((const float*)(p + TILE_CODES))[r];
}

/* o of row r: -8 d (exact in fp32) for symmetric blocks */
static float offset_at(const uint8_t* p, int layout, int r) {
  return layout & LAYOUT_SYMMETRIC ? -8.0f * scale_at(p, layout, r) : scale_at(p, layout, TILE + r);
}

/* The weight row a tile's row r holds: rows in order, or (gated) half a tile of gate rows and the
 * matching half of up rows, so that a tile's 16 outputs make 8 of the activation's. */
static int64_t source_row(const Weights* w, int64_t t, int r) {
  if (!w->gated) return t * TILE + r;
  return r < TILE / 2 ? t * (TILE / 2) + r : w->n / 2 + t * (TILE / 2) + (r - TILE / 2);
}

/* A tile-group's codes are four 64-byte rows j = 0..3; byte r*4 + i of row j holds code k = 4j + i
 * of output row r in its low nibble and k = 4(j + 4) + i in its high one, so one 32-byte load and a
 * mask give eight rows' codes for four consecutive k, which a broadcast of four activations meets. */
static void pack_weights(Weights* w, const uint8_t* b, const float* scales, const float* offsets,
                         int64_t block) {
  int64_t per_block = block / GROUP, blocks = w->k / block;
  for (int64_t t = 0; t < w->tiles; t++)
    for (int64_t g = 0; g < w->groups; g++) {
      uint8_t* p = w->packed + (t * w->groups + g) * w->stride;
      for (int r = 0; r < TILE; r++) {
        int64_t row = source_row(w, t, r);
        for (int j = 0; j < 4; j++)
          for (int i = 0; i < 4; i++) {
            uint8_t low = 0, high = 0;
            if (row < w->n) {
              int64_t k0 = g * GROUP + 4 * j + i, k1 = g * GROUP + 4 * (j + 4) + i;
              const uint8_t* codes = b + row * (w->k / 2);
              low = (codes[k0 / 2] >> (4 * (k0 % 2))) & 15;
              high = (codes[k1 / 2] >> (4 * (k1 % 2))) & 15;
            }
            p[j * 64 + r * 4 + i] = (uint8_t)(low | (high << 4));
          }
        float scale = 0.0f, offset = 0.0f;
        if (row < w->n) {
          scale = scales[row * blocks + g / per_block];
          offset = offsets ? offsets[(g / per_block) * w->n + row] : 0.0f;
        }
        int values = w->layout & LAYOUT_SYMMETRIC ? 1 : 2; /* d, then o unless symmetric */
        for (int i = 0; i < values; i++) {
          float value = i ? offset : scale;
          if (w->layout & LAYOUT_HALF) /* exact: weights_layout checked every one */
            float_to_half(value, (uint16_t*)(p + TILE_CODES) + i * TILE + r);
          else
            ((float*)(p + TILE_CODES))[i * TILE + r] = value;
        }
      }
    }
}

/* A weight's tiles (0, or 1 where memory ran out). K is padded to whole blocks, as MatMulNBits pads a
 * last partial block; w->k is then the activations' own width. */
static int make_weights(Weights* w, const uint8_t* b, const float* scales, const float* offsets, int64_t n,
                        int64_t k, int64_t block, int gated) {
  int64_t blocks = (k + block - 1) / block;
  w->n = n;
  w->gated = gated;
  w->k = blocks * block;
  w->groups = w->k / GROUP;
  w->tiles = (n + TILE - 1) / TILE;
  w->layout = weights_layout(scales, offsets, n * blocks);
  w->stride = layout_stride(w->layout);
  size_t bytes = (size_t)(w->tiles * w->groups * w->stride);
  w->packed = (uint8_t*)aligned_alloc(64, (bytes + 63) / 64 * 64);
  if (!w->packed) return 1;
  pack_weights(w, b, scales, offsets, block);
  w->k = k;
  return 0;
}

/* A group's scale, or 0 / NaN where its digits are all zero: all-zero activations, or a NaN / inf
 * (which the group's sum then carries into the product). */
static int group_scale(float amax, int32_t limit, Group* o) {
  if (!(amax > 0.0f) || !isfinite(amax)) {
    memset(o->part, 0, sizeof o->part);
    o->scale = amax > 0.0f ? NAN : 0.0f;
    return 0;
  }
  o->scale = (float)(amax / (double)limit);
  return 1;
}

static inline int32_t digits_limit(int parts) { return parts == 3 ? LIMIT_24 : LIMIT_16; }

/* A group's fp32 sum in the order the AVX2 path adds it (8 lanes, then halves), so that both paths
 * give the same sums. */
static float group_sum(const float* values) {
  float lane[8];
  for (int j = 0; j < 8; j++) lane[j] = ((values[j] + values[8 + j]) + values[16 + j]) + values[24 + j];
  for (int j = 0; j < 4; j++) lane[j] += lane[4 + j];
  return (lane[0] + lane[2]) + (lane[1] + lane[3]);
}

/* 32 activations into their `parts` digits (the portable path) */
static inline void quantize_digits(const float* values, Group* o, const int parts) {
  float amax = 0.0f;
  for (int i = 0; i < GROUP; i++) {
    float a = fabsf(values[i]);
    amax = a > amax ? a : amax;
  }
  o->sum = group_sum(values);
  const long limit = digits_limit(parts);
  if (!group_scale(amax, (int32_t)limit, o)) return;
  double inverse = (double)limit / amax;
  for (int i = 0; i < GROUP; i++) {
    long v = lrint(values[i] * inverse);
    v = v > limit ? limit : (v < -limit ? -limit : v);
    if (parts == 2) {
      long a = (v + 128) >> 8; /* nearest: |a| <= 127 as |v| <= 127 * 256, c in [-128, 127] */
      o->part[0][i] = (int8_t)a;
      o->part[1][i] = (int8_t)(v - 256 * a);
      continue;
    }
    long a = (v + 32768) >> 16; /* nearest: the rest in [-32768, 32767] */
    long rest = v - 65536 * a;
    long b = (rest + 128) >> 8; /* nearest: c in [-128, 127] */
    long c = rest - 256 * b;
    if (b > 127) { /* rest near +32768: carry into a (a < 127 here, since |v| <= LIMIT) */
      a += 1;
      b -= 256;
    }
    o->part[0][i] = (int8_t)a;
    o->part[1][i] = (int8_t)b;
    o->part[2][i] = (int8_t)c;
  }
}

static void quantize_group_24(const float* values, Group* o) { quantize_digits(values, o, 3); }
static void quantize_group_16(const float* values, Group* o) { quantize_digits(values, o, 2); }

typedef void (*QuantizeFn)(const float* values, Group* out);

/* One row of activations into groups (a last partial group is padded with zeros). */
static void quantize_row(QuantizeFn quantize, const float* x, int64_t k, int64_t groups, Group* out) {
  for (int64_t g = 0; g < groups; g++) {
    int64_t count = k - g * GROUP < GROUP ? k - g * GROUP : GROUP;
    if (count == GROUP) {
      quantize(x + g * GROUP, out + g);
      continue;
    }
    float values[GROUP] = {0};
    if (count > 0) memcpy(values, x + g * GROUP, (size_t)count * sizeof(float)); /* blocks past K: padding */
    quantize(values, out + g);
  }
}

/* sum_k q * (65536 a + 256 b + c) from the three int8 dot products: a's is at most 15 * 127 * 32,
 * so b's and c's together are exact in int32 and the total in a float; with two digits,
 * sum_k q * (256 a + c) is exact in int32 and, below 2^24, in a float. */
static float combine(const int32_t* dot, int parts) {
  if (parts == 2) return (float)(dot[0] * 256 + dot[1]);
  return (float)dot[0] * 65536.0f + (float)(dot[1] * 256 + dot[2]);
}

static inline void tile_scalar(const uint8_t* w, int layout, const Group* const* x, int rows, int64_t groups,
                               float* const* y, const int parts) {
  int64_t stride = layout_stride(layout);
  for (int m = 0; m < rows; m++) {
    float acc[TILE] = {0};
    for (int64_t g = 0; g < groups; g++) {
      const uint8_t* p = w + g * stride;
      const Group* xg = x[m] + g;
      for (int r = 0; r < TILE; r++) {
        int32_t dot[PARTS] = {0};
        for (int part = 0; part < parts; part++)
          for (int j = 0; j < 4; j++)
            for (int i = 0; i < 4; i++) {
              uint8_t v = p[j * 64 + r * 4 + i];
              dot[part] += (v & 15) * xg->part[part][4 * j + i] + (v >> 4) * xg->part[part][4 * (j + 4) + i];
            }
        float d = scale_at(p, layout, r), o = offset_at(p, layout, r);
        acc[r] += combine(dot, parts) * (d * xg->scale) + o * xg->sum;
      }
    }
    memcpy(y[m], acc, sizeof acc);
  }
}

static void tile_scalar_24(const uint8_t* w, int layout, const Group* const* x, int rows, int64_t groups,
                           float* const* y) {
  tile_scalar(w, layout, x, rows, groups, y, 3);
}

static void tile_scalar_16(const uint8_t* w, int layout, const Group* const* x, int rows, int64_t groups,
                           float* const* y) {
  tile_scalar(w, layout, x, rows, groups, y, 2);
}

#ifdef MATMUL_INT4_X86
/* maddubs (codes u8 x digits s8 -> pairs in int16) cannot saturate: 2 * 15 * 128 = 3840, and the
 * eight pair-sums a lane adds per group stay below 32767. ROWS rows of activations share each load
 * and unpacking of the codes. */
#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define ALWAYS_INLINE __attribute__((always_inline)) /* made once for each digit count */

static inline AVX2 __m256i digits(const Group* g, int part, int at) {
  int32_t four;
  memcpy(&four, g->part[part] + at, 4);
  return _mm256_set1_epi32(four);
}

/* Half h's 8 rows' d and o of the tile-group whose codes end at `at` (as packed: offset_at). */
static inline AVX2 void group_scales(const uint8_t* at, int layout, int h, __m256* scale, __m256* offset) {
  if (layout & LAYOUT_HALF) {
    *scale = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)at + 8 * h)));
    if (!(layout & LAYOUT_SYMMETRIC))
      *offset = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)at + TILE + 8 * h)));
  } else {
    *scale = _mm256_loadu_ps((const float*)at + 8 * h);
    if (!(layout & LAYOUT_SYMMETRIC)) *offset = _mm256_loadu_ps((const float*)at + TILE + 8 * h);
  }
  if (layout & LAYOUT_SYMMETRIC) *offset = _mm256_mul_ps(*scale, _mm256_set1_ps(-8.0f));
}

/* combine's sums for 8 rows, from each part's int16 pair sums */
static inline AVX2 __m256 group_dot(const __m256i* sum, const int parts) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i low = _mm256_madd_epi16(sum[parts - 1], ones);
  __m256i middle = _mm256_add_epi32(_mm256_slli_epi32(_mm256_madd_epi16(sum[parts - 2], ones), 8), low);
  if (parts == 2) return _mm256_cvtepi32_ps(middle);
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(sum[0], ones)), _mm256_set1_ps(65536.0f),
                         _mm256_cvtepi32_ps(middle));
}

/* The portable quantize_group's digits with 8 lanes at a time: v rounded in double as lrint rounds
 * (to nearest even), then the same shifts and carry; the group's sum in group_sum's order. */
static inline ALWAYS_INLINE AVX2 void quantize_digits_avx2(const float* values, Group* o, const int parts) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 x[4], amax8 = _mm256_setzero_ps(), sum8 = _mm256_setzero_ps();
  for (int i = 0; i < 4; i++) {
    x[i] = _mm256_loadu_ps(values + 8 * i);
    amax8 = _mm256_max_ps(amax8, _mm256_andnot_ps(sign, x[i]));
    sum8 = _mm256_add_ps(sum8, x[i]);
  }
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax8), _mm256_extractf128_ps(amax8, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  __m128 t = _mm_add_ps(_mm256_castps256_ps128(sum8), _mm256_extractf128_ps(sum8, 1));
  t = _mm_add_ps(t, _mm_movehl_ps(t, t));
  t = _mm_add_ss(t, _mm_movehdup_ps(t));
  float amax = _mm_cvtss_f32(m);
  o->sum = _mm_cvtss_f32(t);
  if (isnan(o->sum) && !isnan(amax)) amax = NAN; /* max_ps drops a NaN lane that the sum keeps */
  if (!group_scale(amax, digits_limit(parts), o)) return;
  const __m256d inverse = _mm256_set1_pd((double)digits_limit(parts) / amax);
  const __m256i limit = _mm256_set1_epi32(digits_limit(parts)), half_a = _mm256_set1_epi32(32768),
                half_b = _mm256_set1_epi32(128);
  const __m256i top = _mm256_set1_epi32(127), order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256i digit[PARTS][4];
  for (int i = 0; i < 4; i++) {
    __m128i low = _mm256_cvtpd_epi32(_mm256_mul_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(x[i])), inverse));
    __m128i high = _mm256_cvtpd_epi32(_mm256_mul_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(x[i], 1)), inverse));
    __m256i v = _mm256_set_m128i(high, low);
    v = _mm256_max_epi32(_mm256_min_epi32(v, limit), _mm256_sub_epi32(_mm256_setzero_si256(), limit));
    if (parts == 2) {
      __m256i a = _mm256_srai_epi32(_mm256_add_epi32(v, half_b), 8);
      digit[0][i] = a;
      digit[1][i] = _mm256_sub_epi32(v, _mm256_slli_epi32(a, 8));
      continue;
    }
    __m256i a = _mm256_srai_epi32(_mm256_add_epi32(v, half_a), 16);
    __m256i rest = _mm256_sub_epi32(v, _mm256_slli_epi32(a, 16));
    __m256i b = _mm256_srai_epi32(_mm256_add_epi32(rest, half_b), 8);
    __m256i c = _mm256_sub_epi32(rest, _mm256_slli_epi32(b, 8));
    __m256i carry = _mm256_cmpgt_epi32(b, top); /* -1 where b is 128 */
    digit[0][i] = _mm256_sub_epi32(a, carry);
    digit[1][i] = _mm256_add_epi32(b, _mm256_slli_epi32(carry, 8)); /* b - 256 */
    digit[2][i] = c;
  }
  for (int part = 0; part < parts; part++) { /* 32 int32 -> 32 int8, in order */
    __m256i words = _mm256_packs_epi32(digit[part][0], digit[part][1]);
    __m256i words2 = _mm256_packs_epi32(digit[part][2], digit[part][3]);
    __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(words, words2), order);
    _mm256_storeu_si256((__m256i*)o->part[part], bytes);
  }
}

static AVX2 void quantize_group_avx2_24(const float* values, Group* o) { quantize_digits_avx2(values, o, 3); }
static AVX2 void quantize_group_avx2_16(const float* values, Group* o) { quantize_digits_avx2(values, o, 2); }

/* one part's int16 sums over a half-tile's 8 rows: codes (low, high nibbles) times its digits */
static inline AVX2 __m256i add_products(__m256i sum, __m256i low, __m256i high, __m256i d_low, __m256i d_high) {
  sum = _mm256_add_epi16(sum, _mm256_maddubs_epi16(low, d_low));
  return _mm256_add_epi16(sum, _mm256_maddubs_epi16(high, d_high));
}

/* One row of activations (a decode step's) against the whole tile in one pass: each digit broadcast
 * serves both halves' 8 rows, and each group's codes are read once. */
static inline ALWAYS_INLINE AVX2 void tile_one_row_avx2(const uint8_t* w, int layout, const Group* x, int64_t groups,
                                                        float* y, const int parts) {
  const __m256i mask = _mm256_set1_epi8(15);
  int64_t stride = layout_stride(layout);
  for (int64_t g = 0; g < PREFETCH_GROUPS && g < groups; g++) /* the tile's first groups, all at once */
    for (int64_t line = 0; line < stride; line += 64) _mm_prefetch((const char*)(w + g * stride + line), _MM_HINT_T0);
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t g = 0; g < groups; g++) {
    const uint8_t* p = w + g * stride;
    for (int64_t line = 0; line < stride; line += 64)
      _mm_prefetch((const char*)(p + PREFETCH_GROUPS * stride + line), _MM_HINT_T0);
    const Group* xg = x + g;
    __m256i sum[2][PARTS];
    for (int h = 0; h < 2; h++)
      for (int part = 0; part < parts; part++) sum[h][part] = _mm256_setzero_si256();
    for (int j = 0; j < 4; j++) {
      __m256i v0 = _mm256_loadu_si256((const __m256i*)(p + 64 * j));
      __m256i v1 = _mm256_loadu_si256((const __m256i*)(p + 64 * j + 32));
      __m256i low0 = _mm256_and_si256(v0, mask), high0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), mask);
      __m256i low1 = _mm256_and_si256(v1, mask), high1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), mask);
      for (int part = 0; part < parts; part++) {
        __m256i d_low = digits(xg, part, 4 * j), d_high = digits(xg, part, 4 * j + 16);
        sum[0][part] = add_products(sum[0][part], low0, high0, d_low, d_high);
        sum[1][part] = add_products(sum[1][part], low1, high1, d_low, d_high);
      }
    }
    __m256 x_scale = _mm256_set1_ps(xg->scale), x_sum = _mm256_set1_ps(xg->sum);
    for (int h = 0; h < 2; h++) {
      __m256 scale, offset;
      group_scales(p + TILE_CODES, layout, h, &scale, &offset);
      acc[h] = _mm256_fmadd_ps(offset, x_sum, acc[h]);
      acc[h] = _mm256_fmadd_ps(group_dot(sum[h], parts), _mm256_mul_ps(scale, x_scale), acc[h]);
    }
  }
  _mm256_storeu_ps(y, acc[0]);
  _mm256_storeu_ps(y + 8, acc[1]);
}

/* Two rows of activations: half a tile (8 output rows) at a time, so that few registers are live
 * (each row's two or three sums, the unpacked codes, the float accumulators); the codes are unpacked once
 * for both rows. One row goes to tile_one_row_avx2. */
static inline ALWAYS_INLINE AVX2 void tile_avx2(const uint8_t* w, int layout, const Group* const* x, int rows,
                                                int64_t groups, float* const* y, const int parts) {
  if (rows == 1) {
    tile_one_row_avx2(w, layout, x[0], groups, y[0], parts);
    return;
  }
  const __m256i mask = _mm256_set1_epi8(15);
  int64_t stride = layout_stride(layout);
  for (int64_t g = 0; g < PREFETCH_GROUPS && g < groups; g++) /* the tile's first groups, all at once */
    for (int64_t line = 0; line < stride; line += 64) _mm_prefetch((const char*)(w + g * stride + line), _MM_HINT_T0);
  for (int half = 0; half < 2; half++) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
      const uint8_t* p = w + g * stride + 32 * half;
      if (!half) /* decoding streams every weight from memory once: ask for it ahead of the arithmetic */
        for (int64_t line = 0; line < stride; line += 64)
          _mm_prefetch((const char*)(w + (g + PREFETCH_GROUPS) * stride + line), _MM_HINT_T0);
      const Group* x0 = x[0] + g;
      const Group* x1 = x[rows - 1] + g;
      __m256i sum0[PARTS], sum1[PARTS];
      for (int part = 0; part < parts; part++) sum0[part] = sum1[part] = _mm256_setzero_si256();
      for (int j = 0; j < 4; j++) {
        __m256i v = _mm256_loadu_si256((const __m256i*)(p + 64 * j));
        __m256i low = _mm256_and_si256(v, mask), high = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
        for (int part = 0; part < parts; part++) {
          sum0[part] = add_products(sum0[part], low, high, digits(x0, part, 4 * j), digits(x0, part, 4 * j + 16));
          if (rows == 2)
            sum1[part] = add_products(sum1[part], low, high, digits(x1, part, 4 * j), digits(x1, part, 4 * j + 16));
        }
      }
      __m256 scale, offset;
      group_scales(w + g * stride + TILE_CODES, layout, half, &scale, &offset);
      acc0 = _mm256_fmadd_ps(offset, _mm256_set1_ps(x0->sum), acc0);
      acc0 = _mm256_fmadd_ps(group_dot(sum0, parts), _mm256_mul_ps(scale, _mm256_set1_ps(x0->scale)), acc0);
      if (rows == 2) {
        acc1 = _mm256_fmadd_ps(offset, _mm256_set1_ps(x1->sum), acc1);
        acc1 = _mm256_fmadd_ps(group_dot(sum1, parts), _mm256_mul_ps(scale, _mm256_set1_ps(x1->scale)), acc1);
      }
    }
    _mm256_storeu_ps(y[0] + 8 * half, acc0);
    if (rows == 2) _mm256_storeu_ps(y[1] + 8 * half, acc1);
  }
}

static AVX2 void tile_avx2_24(const uint8_t* w, int layout, const Group* const* x, int rows, int64_t groups,
                              float* const* y) {
  tile_avx2(w, layout, x, rows, groups, y, 3);
}

static AVX2 void tile_avx2_16(const uint8_t* w, int layout, const Group* const* x, int rows, int64_t groups,
                              float* const* y) {
  tile_avx2(w, layout, x, rows, groups, y, 2);
}

/* AVX-512 VNNI: vpdpbusd multiplies codes (u8) by digits (s8) and sums four products straight into
 * int32 (AVX2 needs maddubs, an int16 add and a widening for that), and on 512-bit registers a
 * tile-group's 64-byte code row j holds all 16 output rows' codes for four k: one load, one unpacking
 * and two vpdpbusd a digit serve the whole tile. The same digits, integer sums and float steps in the
 * same order as the AVX2 path: the outputs are bit-identical. (Measured against 256-bit vpdpbusd on
 * the AVX2 path's half tiles: as fast for one row, faster for two; docs/quantization.md.) */
#define VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vnni")))

static inline VNNI __m512i digits_512(const Group* g, int part, int at) {
  int32_t four;
  memcpy(&four, g->part[part] + at, 4);
  return _mm512_set1_epi32(four);
}

static inline VNNI void group_scales_512(const uint8_t* at, int layout, __m512* scale, __m512* offset) {
  if (layout & LAYOUT_HALF) {
    *scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)at));
    if (!(layout & LAYOUT_SYMMETRIC)) *offset = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)at + 1));
  } else {
    *scale = _mm512_loadu_ps((const float*)at);
    if (!(layout & LAYOUT_SYMMETRIC)) *offset = _mm512_loadu_ps((const float*)at + TILE);
  }
  if (layout & LAYOUT_SYMMETRIC) *offset = _mm512_mul_ps(*scale, _mm512_set1_ps(-8.0f));
}

static inline VNNI __m512 group_dot_512(const __m512i* sum, const int parts) {
  __m512i middle = _mm512_add_epi32(_mm512_slli_epi32(sum[parts - 2], 8), sum[parts - 1]);
  if (parts == 2) return _mm512_cvtepi32_ps(middle);
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[0]), _mm512_set1_ps(65536.0f), _mm512_cvtepi32_ps(middle));
}

/* One or two rows of activations against the whole tile in one pass. */
static inline ALWAYS_INLINE VNNI void tile_vnni(const uint8_t* w, int layout, const Group* const* x, int rows,
                                                int64_t groups, float* const* y, const int parts) {
  const __m512i mask = _mm512_set1_epi8(15);
  int64_t stride = layout_stride(layout);
  for (int64_t g = 0; g < PREFETCH_GROUPS && g < groups; g++) /* the tile's first groups, all at once */
    for (int64_t line = 0; line < stride; line += 64) _mm_prefetch((const char*)(w + g * stride + line), _MM_HINT_T0);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; g++) {
    const uint8_t* p = w + g * stride;
    for (int64_t line = 0; line < stride; line += 64)
      _mm_prefetch((const char*)(p + PREFETCH_GROUPS * stride + line), _MM_HINT_T0);
    const Group* x0 = x[0] + g;
    const Group* x1 = x[rows - 1] + g;
    /* low and high nibbles' sums apart: independent chains of vpdpbusd, so that one row keeps two
     * instructions per part in flight */
    __m512i sum0[PARTS], sum1[PARTS], high0[PARTS], high1[PARTS];
    for (int part = 0; part < parts; part++)
      sum0[part] = sum1[part] = high0[part] = high1[part] = _mm512_setzero_si512();
    for (int j = 0; j < 4; j++) {
      __m512i v = _mm512_loadu_si512((const void*)(p + 64 * j));
      __m512i low = _mm512_and_si512(v, mask), high = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
      for (int part = 0; part < parts; part++) {
        sum0[part] = _mm512_dpbusd_epi32(sum0[part], low, digits_512(x0, part, 4 * j));
        high0[part] = _mm512_dpbusd_epi32(high0[part], high, digits_512(x0, part, 4 * j + 16));
        if (rows == 2) {
          sum1[part] = _mm512_dpbusd_epi32(sum1[part], low, digits_512(x1, part, 4 * j));
          high1[part] = _mm512_dpbusd_epi32(high1[part], high, digits_512(x1, part, 4 * j + 16));
        }
      }
    }
    for (int part = 0; part < parts; part++) {
      sum0[part] = _mm512_add_epi32(sum0[part], high0[part]);
      if (rows == 2) sum1[part] = _mm512_add_epi32(sum1[part], high1[part]);
    }
    __m512 scale, offset;
    group_scales_512(p + TILE_CODES, layout, &scale, &offset);
    acc0 = _mm512_fmadd_ps(offset, _mm512_set1_ps(x0->sum), acc0);
    acc0 = _mm512_fmadd_ps(group_dot_512(sum0, parts), _mm512_mul_ps(scale, _mm512_set1_ps(x0->scale)), acc0);
    if (rows == 2) {
      acc1 = _mm512_fmadd_ps(offset, _mm512_set1_ps(x1->sum), acc1);
      acc1 = _mm512_fmadd_ps(group_dot_512(sum1, parts), _mm512_mul_ps(scale, _mm512_set1_ps(x1->scale)), acc1);
    }
  }
  _mm512_storeu_ps(y[0], acc0);
  if (rows == 2) _mm512_storeu_ps(y[1], acc1);
}

static VNNI void tile_vnni_24(const uint8_t* w, int layout, const Group* const* x, int rows, int64_t groups,
                              float* const* y) {
  tile_vnni(w, layout, x, rows, groups, y, 3);
}

static VNNI void tile_vnni_16(const uint8_t* w, int layout, const Group* const* x, int rows, int64_t groups,
                              float* const* y) {
  tile_vnni(w, layout, x, rows, groups, y, 2);
}
#endif

/* silu(gate) * up for 8 outputs: gate in p[0..7], up in p[8..15] */
static void swiglu_scalar(const float* p, float* out) {
  for (int i = 0; i < TILE / 2; i++) out[i] = p[i] / (1.0f + expf(-p[i])) * p[TILE / 2 + i];
}

#ifdef MATMUL_INT4_X86
/* e^x for x in [-88, 88] (clamped), 8 lanes: 2^n * e^r with r = x - n ln 2 in [-ln2/2, ln2/2], e^r by
 * its degree-6 Taylor polynomial (relative error below 2e-7, a couple of fp32 ulps), ln 2 in two
 * parts so that r is exact; the method of Cephes' expf. */
static inline AVX2 __m256 exp_avx2(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.0f)), _mm256_set1_ps(88.0f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static AVX2 void swiglu_avx2(const float* p, float* out) {
  __m256 gate = _mm256_loadu_ps(p), up = _mm256_loadu_ps(p + TILE / 2);
  const __m256 one = _mm256_set1_ps(1.0f);
  __m256 sigmoid = _mm256_div_ps(one, _mm256_add_ps(one, exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), gate))));
  _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_mul_ps(gate, sigmoid), up));
}
#endif

/* rows (1 or 2) rows of activations against one tile: 16 outputs each */
typedef void (*TileFn)(const uint8_t*, int, const Group* const*, int, int64_t, float* const*);

typedef void (*SwigluFn)(const float* tile_outputs, float* out);

typedef struct { /* the CPU's code for the steps, chosen once per session */
  QuantizeFn quantize;
  TileFn tile;
  SwigluFn swiglu;
} Path;

/* Which code runs the steps: the CPU's fastest (PATH_BEST, what sessions get), or, for the tests
 * and benchmarks, one named path. */
enum { PATH_BEST = 0, PATH_PORTABLE = 1, PATH_AVX2 = 2, PATH_VNNI = 3 };

/* The fastest path this CPU runs. */
static int best_path(void) {
  int best = PATH_PORTABLE;
#ifdef MATMUL_INT4_X86
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    best = PATH_AVX2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vnni"))
      best = PATH_VNNI;
  }
#endif
  return best;
}

/* `bits`: 24 or 16 (activation_bits). 0 where this CPU cannot run the path asked for. */
static int choose_path(int requested, int64_t bits, Path* path) {
  int best = best_path();
  if (requested == PATH_BEST) requested = best;
  if (requested < PATH_PORTABLE || requested > best) return 0;
  *path = bits == 16 ? (Path){quantize_group_16, tile_scalar_16, swiglu_scalar}
                     : (Path){quantize_group_24, tile_scalar_24, swiglu_scalar};
#ifdef MATMUL_INT4_X86
  if (requested == PATH_AVX2)
    *path = bits == 16 ? (Path){quantize_group_avx2_16, tile_avx2_16, swiglu_avx2}
                       : (Path){quantize_group_avx2_24, tile_avx2_24, swiglu_avx2};
  if (requested == PATH_VNNI) /* the AVX2 quantizing and activation: only the products differ */
    *path = bits == 16 ? (Path){quantize_group_avx2_16, tile_vnni_16, swiglu_avx2}
                       : (Path){quantize_group_avx2_24, tile_vnni_24, swiglu_avx2};
#endif
  return 1;
}

typedef struct {
  const Weights* w;
  const float* a;
  Group* x;
  float* y;
  int64_t rows;
  Path path;
  int64_t span; /* tiles per work item of the pool */
} Job;

typedef struct { /* what a session's node holds */
  Weights w;
  Path path;
  int64_t span;
} Kernel;

/* Tiles per work item: a thread runs a span of neighbouring tiles, so that its prefetch, which runs
 * ahead of a tile's groups, runs on into its own next tile; about WORK_ITEMS_PER_CPU items a CPU keep
 * the threads evenly loaded (docs/quantization.md has the measured choice). */
static int64_t tile_span(int64_t tiles) {
  long cpus = sysconf(_SC_NPROCESSORS_ONLN);
  int64_t items = WORK_ITEMS_PER_CPU * (cpus > 0 ? cpus : 1);
  return tiles <= items ? 1 : (tiles + items - 1) / items;
}

static void quantize_one(void* data, size_t r) {
  const Job* job = (const Job*)data;
  const Weights* w = job->w;
  quantize_row(job->path.quantize, job->a + (int64_t)r * w->k, w->k, w->groups, job->x + (int64_t)r * w->groups);
}

static void run_tile(void* data, size_t t);

static void run_span(void* data, size_t item) {
  const Job* job = (const Job*)data;
  int64_t first = (int64_t)item * job->span, end = first + job->span;
  for (int64_t t = first; t < job->w->tiles && t < end; t++) run_tile(data, (size_t)t);
}

static void run_tile(void* data, size_t t) {
  const Job* job = (const Job*)data;
  const Weights* w = job->w;
  const uint8_t* tile = w->packed + (int64_t)t * w->groups * w->stride;
  int64_t count = w->n - (int64_t)t * TILE < TILE ? w->n - (int64_t)t * TILE : TILE;
  float out[2][TILE];
  for (int64_t r = 0; r < job->rows; r += 2) {
    int rows = job->rows - r >= 2 ? 2 : 1;
    const Group* x[2] = {job->x + r * w->groups, job->x + (r + rows - 1) * w->groups};
    float* y[2] = {out[0], out[1]};
    job->path.tile(tile, w->layout, x, rows, w->groups, y);
    for (int m = 0; m < rows; m++) {
      if (w->gated) /* whole tiles: N / 2 is a multiple of 8 */
        job->path.swiglu(out[m], job->y + (r + m) * (w->n / 2) + (int64_t)t * (TILE / 2));
      else
        memcpy(job->y + (r + m) * w->n + (int64_t)t * TILE, out[m], (size_t)count * sizeof(float));
    }
  }
}

/* ---- the few ONNX Runtime C API entries used, at their OrtApi indices ------------------------ */

typedef struct OrtStatus OrtStatus;
typedef struct OrtValue OrtValue;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtTensorTypeAndShapeInfo OrtShapeInfo;
typedef struct OrtApi OrtApi;
typedef struct OrtCustomOp OrtCustomOp;
typedef struct OrtShapeInferContext OrtShapeInferContext;

typedef struct {
  const OrtApi* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)(void);
} OrtApiBase;

enum { ORT_INVALID_ARGUMENT = 2, ORT_FAIL = 1 };
enum { TYPE_FLOAT = 1, TYPE_UINT8 = 2 };
enum { REQUIRED = 0, OPTIONAL = 1 };

#define API_SLOT(api, index) (((void* const*)(api))[index])
#define ORT_CALL(type, index) ((type)API_SLOT(g_api, index))

typedef OrtStatus* (*CreateStatusFn)(int code, const char* msg);
typedef OrtStatus* (*CreateCustomOpDomainFn)(const char* domain, OrtCustomOpDomain** out);
typedef OrtStatus* (*CustomOpDomainAddFn)(OrtCustomOpDomain* domain, const OrtCustomOp* op);
typedef OrtStatus* (*AddCustomOpDomainFn)(OrtSessionOptions* options, OrtCustomOpDomain* domain);
typedef OrtStatus* (*GetTensorMutableDataFn)(OrtValue* value, void** out);
typedef OrtStatus* (*GetDimensionsCountFn)(const OrtShapeInfo* info, size_t* out);
typedef OrtStatus* (*GetDimensionsFn)(const OrtShapeInfo* info, int64_t* dims, size_t count);
typedef OrtStatus* (*GetTensorTypeAndShapeFn)(const OrtValue* value, OrtShapeInfo** out);
typedef OrtStatus* (*KernelInfoGetAttributeInt64Fn)(const OrtKernelInfo* info, const char* name, int64_t* out);
typedef OrtStatus* (*GetInputFn)(const OrtKernelContext* context, size_t index, const OrtValue** out);
typedef OrtStatus* (*GetOutputFn)(OrtKernelContext* context, size_t index, const int64_t* dims, size_t count,
                                  OrtValue** out);
typedef void (*ReleaseShapeInfoFn)(OrtShapeInfo* info);
typedef OrtStatus* (*GetConstantInputFn)(const OrtKernelInfo* info, size_t index, int* is_constant,
                                         const OrtValue** out);
typedef OrtStatus* (*ParallelForFn)(const OrtKernelContext* context, void (*fn)(void*, size_t), size_t total,
                                    size_t num_batch, void* data);
typedef OrtStatus* (*KernelInfoGetInputCountFn)(const OrtKernelInfo* info, size_t* out);
typedef void (*ReleaseStatusFn)(OrtStatus* status);

enum {
  CREATE_STATUS = 0,
  CREATE_CUSTOM_OP_DOMAIN = 26,
  CUSTOM_OP_DOMAIN_ADD = 27,
  ADD_CUSTOM_OP_DOMAIN = 28,
  GET_TENSOR_MUTABLE_DATA = 51,
  GET_DIMENSIONS_COUNT = 61,
  GET_DIMENSIONS = 62,
  GET_TENSOR_TYPE_AND_SHAPE = 65,
  KERNEL_INFO_GET_ATTRIBUTE_INT64 = 86,
  RELEASE_STATUS = 93,
  KERNEL_CONTEXT_GET_INPUT = 90,
  KERNEL_CONTEXT_GET_OUTPUT = 91,
  RELEASE_TENSOR_TYPE_AND_SHAPE_INFO = 99,
  KERNEL_INFO_GET_INPUT_COUNT = 230,
  KERNEL_INFO_GET_CONSTANT_INPUT_TENSOR = 249,
  KERNEL_CONTEXT_PARALLEL_FOR = 274,
};
#define API_VERSION 20

/* OrtCustomOp's layout (version 16: the status-returning V2 kernel entries are read). */
struct OrtCustomOp {
  uint32_t version;
  void* (*CreateKernel)(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*);
  const char* (*GetName)(const OrtCustomOp*);
  const char* (*GetExecutionProviderType)(const OrtCustomOp*);
  int (*GetInputType)(const OrtCustomOp*, size_t);
  size_t (*GetInputTypeCount)(const OrtCustomOp*);
  int (*GetOutputType)(const OrtCustomOp*, size_t);
  size_t (*GetOutputTypeCount)(const OrtCustomOp*);
  void (*KernelCompute)(void*, OrtKernelContext*);
  void (*KernelDestroy)(void*);
  int (*GetInputCharacteristic)(const OrtCustomOp*, size_t);
  int (*GetOutputCharacteristic)(const OrtCustomOp*, size_t);
  int (*GetInputMemoryType)(const OrtCustomOp*, size_t);
  int (*GetVariadicInputMinArity)(const OrtCustomOp*);
  int (*GetVariadicInputHomogeneity)(const OrtCustomOp*);
  int (*GetVariadicOutputMinArity)(const OrtCustomOp*);
  int (*GetVariadicOutputHomogeneity)(const OrtCustomOp*);
  OrtStatus* (*CreateKernelV2)(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*, void**);
  OrtStatus* (*KernelComputeV2)(void*, OrtKernelContext*);
  OrtStatus* (*InferOutputShapeFn)(const OrtCustomOp*, OrtShapeInferContext*);
  int (*GetStartVersion)(const OrtCustomOp*);
  int (*GetEndVersion)(const OrtCustomOp*);
  size_t (*GetMayInplace)(int**, int**);
  void (*ReleaseMayInplace)(int*, int*);
  size_t (*GetAliasMap)(int**, int**);
  void (*ReleaseAliasMap)(int*, int*);
};

static const OrtApi* g_api;

#define RETURN_IF_ERROR(expr)       \
  do {                              \
    OrtStatus* status_ = (expr);    \
    if (status_) return status_;    \
  } while (0)

static OrtStatus* fail(const char* message) {
  return ORT_CALL(CreateStatusFn, CREATE_STATUS)(ORT_INVALID_ARGUMENT, message);
}

/* dims (at most 8) and the data of a tensor */
static OrtStatus* tensor_of(const OrtValue* value, int64_t* dims, size_t* rank, void** data) {
  OrtShapeInfo* info = NULL;
  RETURN_IF_ERROR(ORT_CALL(GetTensorTypeAndShapeFn, GET_TENSOR_TYPE_AND_SHAPE)(value, &info));
  OrtStatus* status = ORT_CALL(GetDimensionsCountFn, GET_DIMENSIONS_COUNT)(info, rank);
  if (!status && *rank > 8) status = fail("MatMulInt4: a tensor of more than 8 dimensions");
  if (!status) status = ORT_CALL(GetDimensionsFn, GET_DIMENSIONS)(info, dims, *rank);
  ORT_CALL(ReleaseShapeInfoFn, RELEASE_TENSOR_TYPE_AND_SHAPE_INFO)(info);
  if (!status && data) status = ORT_CALL(GetTensorMutableDataFn, GET_TENSOR_MUTABLE_DATA)((OrtValue*)value, data);
  return status;
}

static OrtStatus* constant_input(const OrtKernelInfo* info, size_t index, const OrtValue** value) {
  int is_constant = 0;
  *value = NULL;
  RETURN_IF_ERROR(
      ORT_CALL(GetConstantInputFn, KERNEL_INFO_GET_CONSTANT_INPUT_TENSOR)(info, index, &is_constant, value));
  if (!is_constant || !*value) return fail("MatMulInt4: B, scales and offsets must be constant initializers");
  return NULL;
}

static int64_t product(const int64_t* dims, size_t rank) {
  int64_t count = 1;
  for (size_t i = 0; i < rank; i++) count *= dims[i];
  return count;
}

static OrtStatus* create_kernel(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info,
                                void** kernel) {
  (void)op;
  (void)api;
  int64_t k = 0, n = 0, block = 0;
  KernelInfoGetAttributeInt64Fn attribute = ORT_CALL(KernelInfoGetAttributeInt64Fn, KERNEL_INFO_GET_ATTRIBUTE_INT64);
  RETURN_IF_ERROR(attribute(info, "K", &k));
  RETURN_IF_ERROR(attribute(info, "N", &n));
  RETURN_IF_ERROR(attribute(info, "block_size", &block));
  int64_t swiglu = 0, bits = 24; /* optional: absent means a plain product, 24-bit activations */
  OrtStatus* absent = attribute(info, "swiglu", &swiglu);
  if (absent) {
    ORT_CALL(ReleaseStatusFn, RELEASE_STATUS)(absent);
    swiglu = 0;
  }
  absent = attribute(info, "activation_bits", &bits);
  if (absent) {
    ORT_CALL(ReleaseStatusFn, RELEASE_STATUS)(absent);
    bits = 24;
  }
  if (k <= 0 || n <= 0 || block <= 0 || block % GROUP != 0)
    return fail("MatMulInt4: K and N must be positive and block_size a multiple of 32");
  if (swiglu != 0 && (swiglu != 1 || n % TILE != 0))
    return fail("MatMulInt4: swiglu must be 0 or 1, and with 1, N a multiple of 16 (gate and up halves)");
  if (bits != 24 && bits != 16) return fail("MatMulInt4: activation_bits must be 24 or 16");
  int64_t blocks = (k + block - 1) / block;
  const OrtValue *b_value, *scales_value, *offsets_value = NULL;
  RETURN_IF_ERROR(constant_input(info, 1, &b_value));
  RETURN_IF_ERROR(constant_input(info, 2, &scales_value));
  size_t inputs = 0;
  RETURN_IF_ERROR(ORT_CALL(KernelInfoGetInputCountFn, KERNEL_INFO_GET_INPUT_COUNT)(info, &inputs));
  if (inputs > 3) { /* offsets given: they too must be an initializer (absent: symmetric blocks) */
    int is_constant = 0;
    OrtStatus* status = ORT_CALL(GetConstantInputFn, KERNEL_INFO_GET_CONSTANT_INPUT_TENSOR)(info, 3, &is_constant,
                                                                                            &offsets_value);
    if (status) ORT_CALL(ReleaseStatusFn, RELEASE_STATUS)(status);
    if (status || !is_constant || !offsets_value)
      return fail("MatMulInt4: B, scales and offsets must be constant initializers");
  }
  int64_t dims[8];
  size_t rank;
  void *b, *scales, *offsets = NULL;
  RETURN_IF_ERROR(tensor_of(b_value, dims, &rank, &b));
  if (rank != 3 || dims[0] != n || dims[1] != blocks || dims[2] != block / 2)
    return fail("MatMulInt4: B must be [N, K / block_size, block_size / 2]");
  RETURN_IF_ERROR(tensor_of(scales_value, dims, &rank, &scales));
  if (product(dims, rank) != n * blocks) return fail("MatMulInt4: scales must hold N * K / block_size values");
  if (offsets_value) {
    RETURN_IF_ERROR(tensor_of(offsets_value, dims, &rank, &offsets));
    if (product(dims, rank) != n * blocks) return fail("MatMulInt4: offsets must hold N * K / block_size values");
  }
  Kernel* kernel_state = (Kernel*)calloc(1, sizeof(Kernel));
  if (!kernel_state || make_weights(&kernel_state->w, (const uint8_t*)b, (const float*)scales,
                                    (const float*)offsets, n, k, block, (int)swiglu)) {
    free(kernel_state);
    return ORT_CALL(CreateStatusFn, CREATE_STATUS)(ORT_FAIL, "MatMulInt4: out of memory");
  }
  choose_path(PATH_BEST, bits, &kernel_state->path); /* once: the CPU does not change under a session */
  kernel_state->span = tile_span(kernel_state->w.tiles);
  *kernel = kernel_state;
  return NULL;
}

static void destroy_kernel(void* kernel) {
  Kernel* state = (Kernel*)kernel;
  if (state) free(state->w.packed);
  free(state);
}

static OrtStatus* compute(void* kernel, OrtKernelContext* context) {
  const Kernel* state = (const Kernel*)kernel;
  const Weights* w = &state->w;
  const OrtValue* a_value = NULL;
  RETURN_IF_ERROR(ORT_CALL(GetInputFn, KERNEL_CONTEXT_GET_INPUT)(context, 0, &a_value));
  int64_t dims[8];
  size_t rank;
  void* a;
  RETURN_IF_ERROR(tensor_of(a_value, dims, &rank, &a));
  if (rank < 1 || dims[rank - 1] != w->k) return fail("MatMulInt4: A's last dimension must be K");
  int64_t rows = product(dims, rank - 1);
  dims[rank - 1] = w->gated ? w->n / 2 : w->n;
  OrtValue* y_value = NULL;
  RETURN_IF_ERROR(ORT_CALL(GetOutputFn, KERNEL_CONTEXT_GET_OUTPUT)(context, 0, dims, rank, &y_value));
  void* y;
  RETURN_IF_ERROR(ORT_CALL(GetTensorMutableDataFn, GET_TENSOR_MUTABLE_DATA)(y_value, &y));
  if (rows == 0) return NULL;
  Group* groups = (Group*)malloc((size_t)(rows * w->groups) * sizeof(Group));
  if (!groups) return ORT_CALL(CreateStatusFn, CREATE_STATUS)(ORT_FAIL, "MatMulInt4: out of memory");
  Job job = {w, (const float*)a, groups, (float*)y, rows, state->path, state->span};
  OrtStatus* status = NULL;
  if (rows == 1) /* a decode step's row: not worth waking the pool for */
    quantize_one(&job, 0);
  else
    status = ORT_CALL(ParallelForFn, KERNEL_CONTEXT_PARALLEL_FOR)(context, quantize_one, (size_t)rows, 0, &job);
  if (!status)
    status = ORT_CALL(ParallelForFn, KERNEL_CONTEXT_PARALLEL_FOR)(context, run_span,
                                                                  (size_t)((w->tiles + job.span - 1) / job.span), 0, &job);
  free(groups);
  return status;
}

static const char* op_name(const OrtCustomOp* op) {
  (void)op;
  return "MatMulInt4";
}
static const char* op_provider(const OrtCustomOp* op) {
  (void)op;
  return "CPUExecutionProvider";
}
static int input_type(const OrtCustomOp* op, size_t index) {
  (void)op;
  return index == 1 ? TYPE_UINT8 : TYPE_FLOAT;
}
static size_t input_count(const OrtCustomOp* op) {
  (void)op;
  return 4;
}
static int output_type(const OrtCustomOp* op, size_t index) {
  (void)op;
  (void)index;
  return TYPE_FLOAT;
}
static size_t output_count(const OrtCustomOp* op) {
  (void)op;
  return 1;
}
static int input_characteristic(const OrtCustomOp* op, size_t index) {
  (void)op;
  return index == 3 ? OPTIONAL : REQUIRED;
}
static int output_characteristic(const OrtCustomOp* op, size_t index) {
  (void)op;
  (void)index;
  return REQUIRED;
}
static int default_memory(const OrtCustomOp* op, size_t index) {
  (void)op;
  (void)index;
  return 0;
}
static int one(const OrtCustomOp* op) {
  (void)op;
  return 1;
}

static OrtCustomOp g_op;
static OrtCustomOpDomain* g_domain;
static OrtStatus* g_domain_status;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static void make_domain(void) {
  g_op.version = 16;
  g_op.GetName = op_name;
  g_op.GetExecutionProviderType = op_provider;
  g_op.GetInputType = input_type;
  g_op.GetInputTypeCount = input_count;
  g_op.GetOutputType = output_type;
  g_op.GetOutputTypeCount = output_count;
  g_op.KernelDestroy = destroy_kernel;
  g_op.GetInputCharacteristic = input_characteristic;
  g_op.GetOutputCharacteristic = output_characteristic;
  g_op.GetInputMemoryType = default_memory;
  g_op.GetVariadicInputMinArity = one;
  g_op.GetVariadicInputHomogeneity = one;
  g_op.GetVariadicOutputMinArity = one;
  g_op.GetVariadicOutputHomogeneity = one;
  g_op.CreateKernelV2 = create_kernel;
  g_op.KernelComputeV2 = compute;
  g_domain_status = ORT_CALL(CreateCustomOpDomainFn, CREATE_CUSTOM_OP_DOMAIN)("ai.llamatrt", &g_domain);
  if (!g_domain_status) g_domain_status = ORT_CALL(CustomOpDomainAddFn, CUSTOM_OP_DOMAIN_ADD)(g_domain, &g_op);
}

/* ONNX Runtime's entry point for a custom-op library (SessionOptions.register_custom_ops_library). */
__attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                    const OrtApiBase* base) {
  const OrtApi* api = base->GetApi(API_VERSION);
  if (!api) return NULL; /* an ONNX Runtime older than 1.20: nothing registered, the graph fails to load */
  g_api = api;
  pthread_once(&g_once, make_domain);
  if (g_domain_status) return g_domain_status;
  return ORT_CALL(AddCustomOpDomainFn, ADD_CUSTOM_OP_DOMAIN)(options, g_domain);
}

/* For the tests and benchmarks (ctypes): the kernel without ONNX Runtime, one thread, on the path
 * asked for (PATH_*; 3 returned where this CPU lacks it); `swiglu` and `activation_bits` as the
 * attributes (y then [rows, n / 2]). */
__attribute__((visibility("default"))) int matmul_int4(const float* a, const uint8_t* b, const float* scales,
                                                        const float* offsets, int64_t rows, int64_t n, int64_t k,
                                                        int64_t block, float* y, int path, int swiglu,
                                                        int activation_bits) {
  if (block % GROUP != 0 || (swiglu && n % TILE != 0) || (activation_bits != 24 && activation_bits != 16)) return 1;
  Path chosen;
  if (!choose_path(path, activation_bits, &chosen)) return 3;
  Weights w;
  if (make_weights(&w, b, scales, offsets, n, k, block, swiglu)) return 2;
  Group* groups = (Group*)malloc((size_t)(rows * w.groups) * sizeof(Group));
  if (!groups) {
    free(w.packed);
    return 2;
  }
  Job job = {&w, a, groups, y, rows, chosen, 1};
  for (int64_t r = 0; r < rows; r++) quantize_one(&job, (size_t)r);
  for (int64_t t = 0; t < w.tiles; t++) run_tile(&job, (size_t)t);
  free(w.packed);
  free(groups);
  return 0;
}

/* The path sessions run on this CPU (PATH_*), for the notes that say which kernel computed a result. */
__attribute__((visibility("default"))) int matmul_int4_path(void) { return best_path(); }

#ifdef MATMUL_INT4_PYTHON_MODULE
/* Built by setup.py as an extension module so that pip compiles and installs it: importing it gives
 * an empty module (base.custom_ops finds the file; ONNX Runtime loads it by path). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_matmul_int4",
                                    "llamatrt's MatMulInt4 ONNX Runtime custom-op library (base.custom_ops).", -1,
                                    NULL, NULL, NULL, NULL, NULL};

__attribute__((visibility("default"))) PyMODINIT_FUNC PyInit__matmul_int4(void) { return PyModule_Create(&module); }
#endif
