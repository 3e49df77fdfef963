/*
 * reduce.c - element-wise reduction kernels for the CPU collectives.
 *
 * Kernels combine two arrays (out = a op b) with GCC vector extensions, so one
 * source gives AVX-512, AVX2 and SSE2 code; target_clones compiles each kernel
 * for every one of those and the loader picks the best one the CPU runs
 * (no -march=native needed). The scalar tails compute exactly what the vector
 * lanes do, so results do not depend on alignment or length.
 *
 * fs_reduce combines N inputs in order 0..N-1 block by block through an
 * accumulator on the stack (L1-resident), so `out` may be any one of the inputs.
 * float16 / bfloat16 widen to float32, accumulate, and round once (RNE).
 * Signed integer arithmetic is done in unsigned types (wraps, no UB).
 */
#include <stdint.h>
#include <string.h>

#include "fastspawn.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FS_NO_CLONES)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

#define VBYTES 64 /* one AVX-512 register; narrower ISAs split it */
typedef float vf32 __attribute__((vector_size(VBYTES)));
typedef double vf64 __attribute__((vector_size(VBYTES)));
typedef int8_t vi8 __attribute__((vector_size(VBYTES)));
typedef uint8_t vu8 __attribute__((vector_size(VBYTES)));
typedef int32_t vi32 __attribute__((vector_size(VBYTES)));
typedef uint32_t vu32 __attribute__((vector_size(VBYTES)));
typedef int64_t vi64 __attribute__((vector_size(VBYTES)));
typedef uint64_t vu64 __attribute__((vector_size(VBYTES)));
typedef uint16_t vu16h __attribute__((vector_size(VBYTES / 2))); /* 16 halves */

/* Elements per block of the multi-input loop: 8 KiB of float64 accumulator. */
#define BLK 1024

size_t fs_dtype_size(int dtype)
{
    switch (dtype) {
    case FS_FLOAT64:
    case FS_INT64: return 8;
    case FS_FLOAT32:
    case FS_INT32: return 4;
    case FS_FLOAT16:
    case FS_BFLOAT16: return 2;
    case FS_INT8:
    case FS_UINT8:
    case FS_BOOL: return 1;
    default: return 0;
    }
}

const char *fs_dtype_name(int dtype)
{
    static const char *const names[FS_DTYPE_COUNT] = {
        "float32", "float64", "float16", "bfloat16", "int8", "uint8", "int32", "int64", "bool"};
    return dtype >= 0 && dtype < FS_DTYPE_COUNT ? names[dtype] : "?";
}

const char *fs_redop_name(int op)
{
    static const char *const names[FS_REDOP_COUNT] = {"SUM",     "AVG",  "MIN", "MAX",
                                                      "PRODUCT", "BAND", "BOR", "BXOR"};
    return op >= 0 && op < FS_REDOP_COUNT ? names[op] : "?";
}

static int is_float(int dtype)
{
    return dtype == FS_FLOAT32 || dtype == FS_FLOAT64 || dtype == FS_FLOAT16 ||
           dtype == FS_BFLOAT16;
}

int fs_reduce_supported(int dtype, int op)
{
    if (dtype < 0 || dtype >= FS_DTYPE_COUNT || op < 0 || op >= FS_REDOP_COUNT)
        return 0;
    if (op == FS_AVG)
        return is_float(dtype);
    if (op == FS_BAND || op == FS_BOR || op == FS_BXOR)
        return !is_float(dtype);
    return 1;
}

/* ------------------------------------------------------------------ */
/* Two-input kernels                                                  */
/* ------------------------------------------------------------------ */

/* Vector loop: x, y are loaded as VT, r = EXPR stored; then the scalar tail. */
#define VLOOP(VT, EXPR)                                                                            \
    for (; i + sizeof(VT) / esz <= n; i += sizeof(VT) / esz) {                                     \
        VT x, y, r;                                                                                \
        memcpy(&x, a + i * esz, sizeof x);                                                         \
        memcpy(&y, b + i * esz, sizeof y);                                                         \
        r = (EXPR);                                                                                \
        memcpy(out + i * esz, &r, sizeof r);                                                       \
    }
#define SLOOP(ST, EXPR)                                                                            \
    for (; i < n; i++) {                                                                           \
        ST x, y, r;                                                                                \
        memcpy(&x, a + i * esz, sizeof x);                                                         \
        memcpy(&y, b + i * esz, sizeof y);                                                         \
        r = (ST)(EXPR);                                                                            \
        memcpy(out + i * esz, &r, sizeof r);                                                       \
    }
/* Select x where mask m (all ones) else y, through the same-width integer vector VI. */
#define VSEL(VT, VI, m, x, y) ((VT)((((VI)(x)) & (m)) | (((VI)(y)) & ~(m))))

/* The start of every two-input kernel: byte views of out, a, b and the element size. */
#define KERNEL_PROLOGUE(T)                                                                         \
    unsigned char *out = out_;                                                                     \
    const unsigned char *a = a_, *b = b_;                                                          \
    const size_t esz = sizeof(T);                                                                  \
    size_t i = 0

/* Floating types: SUM, PRODUCT, MIN, MAX (a NaN in either input wins). */
#define DEF_FLOAT_KERNEL(NAME, T, VT, VI)                                                          \
    CLONES static void NAME(void *out_, const void *a_, const void *b_, size_t n, int op)          \
    {                                                                                              \
        KERNEL_PROLOGUE(T);                                                                        \
        switch (op) {                                                                              \
        case FS_SUM:                                                                               \
            VLOOP(VT, x + y);                                                                      \
            SLOOP(T, x + y);                                                                       \
            break;                                                                                 \
        case FS_PRODUCT:                                                                           \
            VLOOP(VT, (x) * (y));                                                                  \
            SLOOP(T, (x) * (y));                                                                   \
            break;                                                                                 \
        case FS_MIN:                                                                               \
            VLOOP(VT, VSEL(VT, VI, (x < y) | (x != x), x, y));                                     \
            SLOOP(T, (x < y || x != x) ? x : y);                                                   \
            break;                                                                                 \
        case FS_MAX:                                                                               \
            VLOOP(VT, VSEL(VT, VI, (x > y) | (x != x), x, y));                                     \
            SLOOP(T, (x > y || x != x) ? x : y);                                                   \
            break;                                                                                 \
        default: break;                                                                            \
        }                                                                                          \
    }

DEF_FLOAT_KERNEL(k_f32, float, vf32, vi32)
DEF_FLOAT_KERNEL(k_f64, double, vf64, vi64)

/* Integer types: arithmetic in the unsigned type UT (wraps), comparisons in T. */
#define DEF_INT_KERNEL(NAME, T, UT, VT, VU)                                                        \
    CLONES static void NAME(void *out_, const void *a_, const void *b_, size_t n, int op)          \
    {                                                                                              \
        KERNEL_PROLOGUE(T);                                                                        \
        switch (op) {                                                                              \
        case FS_SUM:                                                                               \
            VLOOP(VU, x + y);                                                                      \
            SLOOP(UT, x + y);                                                                      \
            break;                                                                                 \
        case FS_PRODUCT:                                                                           \
            VLOOP(VU, (x) * (y));                                                                  \
            SLOOP(UT, (UT)((UT)x * (UT)y));                                                        \
            break;                                                                                 \
        case FS_MIN:                                                                               \
            VLOOP(VT, VSEL(VT, VT, (VT)(x < y), x, y));                                            \
            SLOOP(T, x < y ? x : y);                                                               \
            break;                                                                                 \
        case FS_MAX:                                                                               \
            VLOOP(VT, VSEL(VT, VT, (VT)(x > y), x, y));                                            \
            SLOOP(T, x > y ? x : y);                                                               \
            break;                                                                                 \
        case FS_BAND:                                                                              \
            VLOOP(VU, x &y);                                                                       \
            SLOOP(UT, x &y);                                                                       \
            break;                                                                                 \
        case FS_BOR:                                                                               \
            VLOOP(VU, x | y);                                                                      \
            SLOOP(UT, x | y);                                                                      \
            break;                                                                                 \
        case FS_BXOR:                                                                              \
            VLOOP(VU, x ^ y);                                                                      \
            SLOOP(UT, x ^ y);                                                                      \
            break;                                                                                 \
        default: break;                                                                            \
        }                                                                                          \
    }

DEF_INT_KERNEL(k_i8, int8_t, uint8_t, vi8, vu8)
DEF_INT_KERNEL(k_u8, uint8_t, uint8_t, vu8, vu8)
DEF_INT_KERNEL(k_i32, int32_t, uint32_t, vi32, vu32)
DEF_INT_KERNEL(k_i64, int64_t, uint64_t, vi64, vu64)

/* bool: any nonzero byte is true; results are 0 or 1. SUM/MAX are OR, MIN/PRODUCT AND. */
CLONES static void k_bool(void *out_, const void *a_, const void *b_, size_t n, int op)
{
    unsigned char *out = out_;
    const unsigned char *a = a_, *b = b_;
    const size_t esz = 1;
    const vu8 zero = {0};
    size_t i = 0;
    switch (op) {
    case FS_SUM:
    case FS_MAX:
    case FS_BOR:
        VLOOP(vu8, (vu8)(((x != zero) | (y != zero)) & 1));
        SLOOP(uint8_t, (x != 0) | (y != 0));
        break;
    case FS_MIN:
    case FS_PRODUCT:
    case FS_BAND:
        VLOOP(vu8, (vu8)(((x != zero) & (y != zero)) & 1));
        SLOOP(uint8_t, (x != 0) & (y != 0));
        break;
    case FS_BXOR:
        VLOOP(vu8, (vu8)(((x != zero) ^ (y != zero)) & 1));
        SLOOP(uint8_t, (x != 0) ^ (y != 0));
        break;
    default: break;
    }
}

/* out = a / d (AVG's last step); memcpy loads/stores, so any buffer type is fine. */
#define DEF_DIV(NAME, T, VT)                                                                       \
    CLONES static void NAME(void *out_, const void *a_, size_t n, T d)                             \
    {                                                                                              \
        unsigned char *out = out_;                                                                 \
        const unsigned char *a = a_;                                                               \
        const VT vd = (VT){0} + d;                                                                 \
        const size_t esz = sizeof(T);                                                              \
        size_t i = 0;                                                                              \
        for (; i + sizeof(VT) / esz <= n; i += sizeof(VT) / esz) {                                 \
            VT x;                                                                                  \
            memcpy(&x, a + i * esz, sizeof x);                                                     \
            x = x / vd;                                                                            \
            memcpy(out + i * esz, &x, sizeof x);                                                   \
        }                                                                                          \
        for (; i < n; i++) {                                                                       \
            T x;                                                                                   \
            memcpy(&x, a + i * esz, sizeof x);                                                     \
            x = x / d;                                                                             \
            memcpy(out + i * esz, &x, sizeof x);                                                   \
        }                                                                                          \
    }

DEF_DIV(div_f32, float, vf32)
DEF_DIV(div_f64, double, vf64)

/* ------------------------------------------------------------------ */
/* float16 / bfloat16 <-> float32 (exact widening, round-to-nearest-even) */
/* ------------------------------------------------------------------ */

/* float16 bits (zero-extended) -> float32 bits; exact, after F. Giesen's half_to_float. */
#define H2F_BITS(VU, VI, VF, h, o)                                                                 \
    do {                                                                                           \
        const VU shifted_exp_ = (VU){0} + (0x7c00u << 13);                                         \
        VU o_ = ((h)&0x7fffu) << 13;                                                               \
        VU exp_ = shifted_exp_ & o_;                                                               \
        o_ += (127u - 15u) << 23;                                                                  \
        VU inf_ = o_ + ((128u - 16u) << 23);                                                       \
        VF den_f_;                                                                                 \
        VU den_ = o_ + (1u << 23);                                                                 \
        memcpy(&den_f_, &den_, sizeof den_);                                                       \
        den_f_ -= (VF){0} + 6.103515625e-05f; /* 2^-14: bits 113 << 23 */                          \
        memcpy(&den_, &den_f_, sizeof den_);                                                       \
        VI is_inf_ = (VI)(exp_ == shifted_exp_);                                                   \
        VI is_den_ = (VI)(exp_ == (VU){0});                                                        \
        o_ = VSEL(VU, VI, is_inf_, inf_, o_);                                                      \
        o_ = VSEL(VU, VI, is_den_, den_, o_);                                                      \
        (o) = o_ | (((h)&0x8000u) << 16);                                                          \
    } while (0)

/* float32 bits -> float16 bits (in the low 16 bits), RNE; NaN -> quiet NaN. */
#define F2H_BITS(VU, VI, VF, f, o)                                                                 \
    do {                                                                                           \
        VU sign_ = (f)&0x80000000u;                                                                \
        VU abs_ = (f) ^ sign_;                                                                     \
        const VU f16max_ = (VU){0} + ((127u + 16u) << 23);                                         \
        const VU f32inf_ = (VU){0} + (255u << 23);                                                 \
        const VU magic_ = (VU){0} + (((127u - 15u) + (23u - 10u) + 1u) << 23);                     \
        VU big_ = VSEL(VU, VI, (VI)(abs_ > f32inf_), (VU){0} + 0x7e00u, (VU){0} + 0x7c00u);        \
        VF af_, mf_;                                                                               \
        memcpy(&af_, &abs_, sizeof af_);                                                           \
        memcpy(&mf_, &magic_, sizeof mf_);                                                         \
        af_ += mf_;                                                                                \
        VU den_;                                                                                   \
        memcpy(&den_, &af_, sizeof den_);                                                          \
        den_ -= magic_;                                                                            \
        VU odd_ = (abs_ >> 13) & 1u;                                                               \
        VU nrm_ = ((abs_ - (112u << 23) + 0xfffu + odd_) >> 13);                                   \
        VU r_ = VSEL(VU, VI, (VI)(abs_ < (VU){0} + (113u << 23)), den_, nrm_);                     \
        r_ = VSEL(VU, VI, (VI)(abs_ >= f16max_), big_, r_);                                        \
        (o) = r_ | (sign_ >> 16);                                                                  \
    } while (0)

/* float32 bits -> bfloat16 bits, RNE; NaN -> 0x7fc0. */
#define F2BF_BITS(VU, VI, f, o)                                                                    \
    do {                                                                                           \
        VU rounded_ = ((f) + 0x7fffu + (((f) >> 16) & 1u)) >> 16;                                  \
        VI nan_ = (VI)(((f)&0x7fffffffu) > 0x7f800000u);                                           \
        (o) = VSEL(VU, VI, nan_, (VU){0} + 0x7fc0u, rounded_);                                     \
    } while (0)

typedef uint32_t su32;

CLONES static void half_to_f32(float *out, const uint16_t *in, size_t n, int bf16)
{
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        vu16h h16;
        memcpy(&h16, in + i, sizeof h16);
        vu32 h = __builtin_convertvector(h16, vu32), o;
        if (bf16)
            o = h << 16;
        else
            H2F_BITS(vu32, vi32, vf32, h, o);
        memcpy(out + i, &o, sizeof o);
    }
    for (; i < n; i++) {
        su32 h = in[i], o;
        if (bf16) {
            o = h << 16;
        } else {
            const su32 shifted_exp = 0x7c00u << 13;
            o = (h & 0x7fffu) << 13;
            su32 exp = shifted_exp & o;
            o += (127u - 15u) << 23;
            if (exp == shifted_exp) {
                o += (128u - 16u) << 23;
            } else if (exp == 0) {
                float f;
                o += 1u << 23;
                memcpy(&f, &o, sizeof f);
                f -= 6.103515625e-05f;
                memcpy(&o, &f, sizeof o);
            }
            o |= (h & 0x8000u) << 16;
        }
        memcpy(out + i, &o, sizeof o);
    }
}

CLONES static void f32_to_half(uint16_t *out, const float *in, size_t n, int bf16)
{
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        vu32 f, o;
        memcpy(&f, in + i, sizeof f);
        if (bf16)
            F2BF_BITS(vu32, vi32, f, o);
        else
            F2H_BITS(vu32, vi32, vf32, f, o);
        vu16h o16 = __builtin_convertvector(o, vu16h);
        memcpy(out + i, &o16, sizeof o16);
    }
    for (; i < n; i++) {
        su32 f, o;
        memcpy(&f, in + i, sizeof f);
        if (bf16) {
            if ((f & 0x7fffffffu) > 0x7f800000u)
                o = 0x7fc0u;
            else
                o = (f + 0x7fffu + ((f >> 16) & 1u)) >> 16;
        } else {
            su32 sign = f & 0x80000000u, abs = f ^ sign;
            if (abs >= ((127u + 16u) << 23)) {
                o = abs > (255u << 23) ? 0x7e00u : 0x7c00u;
            } else if (abs < (113u << 23)) {
                const su32 magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
                float af, mf;
                memcpy(&af, &abs, sizeof af);
                memcpy(&mf, &magic, sizeof mf);
                af += mf;
                memcpy(&o, &af, sizeof o);
                o -= magic;
            } else {
                o = (abs - (112u << 23) + 0xfffu + ((abs >> 13) & 1u)) >> 13;
            }
            o |= sign >> 16;
        }
        out[i] = (uint16_t)o;
    }
}

/* ------------------------------------------------------------------ */
/* N-input reduction                                                  */
/* ------------------------------------------------------------------ */

typedef void (*kernel_fn)(void *out, const void *a, const void *b, size_t n, int op);

static kernel_fn kernel_for(int dtype)
{
    switch (dtype) {
    case FS_FLOAT32: return k_f32;
    case FS_FLOAT64: return k_f64;
    case FS_INT8: return k_i8;
    case FS_UINT8: return k_u8;
    case FS_INT32: return k_i32;
    case FS_INT64: return k_i64;
    case FS_BOOL: return k_bool;
    default: return NULL;
    }
}

static void reduce_half(void *out, const void *const *in, int nin, size_t count, int bf16, int op)
{
    _Alignas(64) float acc[BLK];
    _Alignas(64) float tmp[BLK];
    int kop = op == FS_AVG ? FS_SUM : op;
    for (size_t off = 0; off < count; off += BLK) {
        size_t m = count - off < BLK ? count - off : BLK;
        half_to_f32(acc, (const uint16_t *)in[0] + off, m, bf16);
        for (int q = 1; q < nin; q++) {
            half_to_f32(tmp, (const uint16_t *)in[q] + off, m, bf16);
            k_f32(acc, acc, tmp, m, kop);
        }
        if (op == FS_AVG)
            div_f32(acc, acc, m, (float)nin);
        f32_to_half((uint16_t *)out + off, acc, m, bf16);
    }
}

int fs_reduce(void *out, const void *const *in, int nin, size_t count, int dtype, int op,
              fs_error_t *err)
{
    if (!fs_reduce_supported(dtype, op))
        return fs_error_set(err, FS_EINVAL, "reduce op %s is not supported for %s",
                            fs_redop_name(op), fs_dtype_name(dtype));
    if (nin < 1)
        return fs_error_set(err, FS_EINVAL, "fs_reduce needs at least one input");
    size_t esz = fs_dtype_size(dtype);
    if (count == 0)
        return FS_OK;
    if (nin == 1) {
        if (out != in[0])
            memmove(out, in[0], count * esz);
        return FS_OK;
    }
    if (dtype == FS_FLOAT16 || dtype == FS_BFLOAT16) {
        reduce_half(out, in, nin, count, dtype == FS_BFLOAT16, op);
        return FS_OK;
    }
    kernel_fn k = kernel_for(dtype);
    int kop = op == FS_AVG ? FS_SUM : op;
    if (nin == 2 && op != FS_AVG) {
        k(out, in[0], in[1], count, kop);
        return FS_OK;
    }
    _Alignas(64) unsigned char acc[BLK * 8];
    size_t blk = sizeof acc / esz;
    for (size_t off = 0; off < count; off += blk) {
        size_t m = count - off < blk ? count - off : blk;
        size_t boff = off * esz;
        const unsigned char *last = (const unsigned char *)in[nin - 1] + boff;
        unsigned char *dst = (unsigned char *)out + boff;
        k(acc, (const unsigned char *)in[0] + boff, (const unsigned char *)in[1] + boff, m, kop);
        for (int q = 2; q < nin - 1; q++)
            k(acc, acc, (const unsigned char *)in[q] + boff, m, kop);
        if (op == FS_AVG) {
            if (nin > 2)
                k(acc, acc, last, m, kop);
            if (dtype == FS_FLOAT32)
                div_f32(dst, acc, m, (float)nin);
            else
                div_f64(dst, acc, m, (double)nin);
        } else {
            k(dst, acc, last, m, kop);
        }
    }
    return FS_OK;
}

const char *fs_reduce_isa(void)
{
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FS_NO_CLONES)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f"))
        return "avx512f";
    if (__builtin_cpu_supports("avx2"))
        return "avx2";
#endif
    return "default";
}
