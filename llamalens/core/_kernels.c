/* One pass over a logits row for stats.block_stats: exp, the two float64 sums and the top-N candidates together.

   numpy needs six passes over a row for the same numbers (subtract, exp, sum, multiply, sum, compare) and a
   seventh to list the candidates; at 262,144 logits a row takes ~1.2 ms there, here ~0.3 ms with AVX2 + FMA
   (8 floats at a time) and less with AVX-512F (16 at a time, where the CPU has it; the same exp values).
   Built by setup.py as an optional extension and loaded with ctypes (llamalens/kernels.py); without it, or on
   a CPU without AVX2 and FMA, stats.py runs its numpy passes.

   ll_row_pass(x, n, m, floor, sums, cand, block, bsums):
       d_i = x_i - m (float32, as numpy's subtract), e_i = exp(d_i) (ll_exp below, float32)
       sums[0] = sum e_i, sums[1] = sum e_i * d_i            (float64: each float32 term exact, 4 lanes)
       cand    = the indices i with x_i >= floor, in order  (returns how many; the caller gives room for n)
       bsums   = (when not NULL) sum e_i over each block of `block` entries, the last one shorter:
                 sampler.dist_select's running sum (kernels.exp_block_sums, with floor +inf: no candidates)
   Terms with d_i below -87.33 (exp would be subnormal, or d_i is -inf) count as 0: at most 2^-126 each against a
   sum of at least 1 (the maximum's own term).

   ll_block_stats(x, args): a decode step's [rows, n] block (args: its shape and the outputs' addresses, one kept
       array), row by row so that each row is read
       from memory once (its max pass brings it into cache for the rest): the max, the floor (the k-th largest of
       every stride-th logit: quickselect), the row pass, and the row's k largest candidates sorted by (logit
       descending, id ascending), found by insertion into a k-entry list (most candidates fail the first compare).
       One call per step instead of a max, a partition and a row pass per row from Python.

   ll_fill_ids(row, ids, k, out): the llama_token_data of k ids sorted by id, the sampler prefilter's array.

   ll_pick_ids(row, ids, k, buf, apply, chain, dist, ...): a prefiltered pick in one call: ll_fill_ids, the chain
       and its kept-apart dist through llama.cpp's llama_sampler_apply (its address from Python), the pick's
       log-probability among the survivors (ll_survivor_lp) and its rank from the row's top list. A one-row step
       made ten calls into numpy and ctypes for this, each 10-25 us in the cold cache after a decode.

   ll_survivor_lp(d, n, sel): log p of d[sel] under the softmax of n llama_token_data logits, float64 (libm's exp,
       numpy's pairwise summation order): stats.sampled_logprob.

   ll_half_sum(x, n, c): sum of exp((x_i - c) / 2) over a row, float64 (core/confidence.py's Renyi divergence).

   ll_exp_f32(d, n, out): ll_exp of each d_i (dist_select's terms of one block; the tests).

   ll_exp, for d <= 0 (all these callers give it; it does not clamp d > 88): exp(d) = 2^k * exp(r),
   k = round(d / ln 2), r = d - k ln 2 (two-part ln 2, FMA), exp(r) by the degree-6 polynomial of Cephes'
   expf on |r| <= ln 2 / 2. Measured over every float32 in [-87.33, 0]: within 1.26 ulp of the exact value
   (tests/test_settings_stats.py checks a sample against 2 ulp).
*/
#include <stdint.h>
#include <stdlib.h>
#include <math.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define LL_TARGET __attribute__((target("avx2,fma")))

/* ll_exp for 8 (AVX2) and 16 (AVX-512F) floats from one text: the same operations, so the same values */
#define LL_EXP(NAME, TARGET, VEC, IVEC, P, ROUND, CAST)                                                        \
    TARGET static inline VEC NAME(VEC d) {                                                                   \
        VEC k = ROUND(P##_mul_ps(d, P##_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); \
        VEC r = P##_fnmadd_ps(k, P##_set1_ps(0.693359375f), d);                                              \
        r = P##_fnmadd_ps(k, P##_set1_ps(-2.12194440e-4f), r);                                               \
        VEC p = P##_set1_ps(1.9875691500e-4f);                                                               \
        p = P##_fmadd_ps(p, r, P##_set1_ps(1.3981999507e-3f));                                               \
        p = P##_fmadd_ps(p, r, P##_set1_ps(8.3334519073e-3f));                                               \
        p = P##_fmadd_ps(p, r, P##_set1_ps(4.1665795894e-2f));                                               \
        p = P##_fmadd_ps(p, r, P##_set1_ps(1.6666665459e-1f));                                               \
        p = P##_fmadd_ps(p, r, P##_set1_ps(5.0000001201e-1f));                                               \
        p = P##_fmadd_ps(p, P##_mul_ps(r, r), P##_add_ps(r, P##_set1_ps(1.0f)));                             \
        IVEC e = P##_slli_epi32(P##_add_epi32(P##_cvtps_epi32(k), P##_set1_epi32(127)), 23);                 \
        return P##_mul_ps(p, CAST(e));                                                                       \
    }

#define LL_TARGET512 __attribute__((target("avx512f,fma")))
LL_EXP(ll_exp, LL_TARGET, __m256, __m256i, _mm256, _mm256_round_ps, _mm256_castsi256_ps)
LL_EXP(ll_exp16, LL_TARGET512, __m512, __m512i, _mm512, _mm512_roundscale_ps, _mm512_castsi512_ps)

LL_TARGET static int64_t row_pass_avx2(const float *x, int64_t n, float m, float floor, double *sums, int32_t *cand,
                                       int64_t base) {
    const __m256 vm = _mm256_set1_ps(m), vf = _mm256_set1_ps(floor), lo = _mm256_set1_ps(-87.33654f);
    __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd(), t0 = _mm256_setzero_pd(), t1 = _mm256_setzero_pd();
    int64_t nc = 0, i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        __m256 d = _mm256_sub_ps(v, vm);
        __m256 keep = _mm256_cmp_ps(d, lo, _CMP_GE_OQ);  /* false for -inf and nan */
        __m256 dc = _mm256_and_ps(d, keep);               /* 0 where dropped: e * d stays finite */
        __m256 e = _mm256_and_ps(ll_exp(dc), keep);
        __m256d elo = _mm256_cvtps_pd(_mm256_castps256_ps128(e)), ehi = _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1));
        __m256d dlo = _mm256_cvtps_pd(_mm256_castps256_ps128(dc)), dhi = _mm256_cvtps_pd(_mm256_extractf128_ps(dc, 1));
        s0 = _mm256_add_pd(s0, elo);
        s1 = _mm256_add_pd(s1, ehi);
        t0 = _mm256_fmadd_pd(elo, dlo, t0);
        t1 = _mm256_fmadd_pd(ehi, dhi, t1);
        int mask = _mm256_movemask_ps(_mm256_cmp_ps(v, vf, _CMP_GE_OQ));
        while (mask) {
            int b = __builtin_ctz(mask);
            cand[nc++] = (int32_t)(base + i + b);
            mask &= mask - 1;
        }
    }
    double s[4], t[4];
    _mm256_storeu_pd(s, _mm256_add_pd(s0, s1));
    _mm256_storeu_pd(t, _mm256_add_pd(t0, t1));
    double sum = (s[0] + s[1]) + (s[2] + s[3]), dot = (t[0] + t[1]) + (t[2] + t[3]);
    if (i < n) {  /* the tail through the same vector code, padded with -inf */
        float buf[8];
        for (int j = 0; j < 8; j++) buf[j] = i + j < n ? x[i + j] : -INFINITY;
        __m256 v = _mm256_loadu_ps(buf);
        __m256 d = _mm256_sub_ps(v, vm);
        __m256 keep = _mm256_cmp_ps(d, lo, _CMP_GE_OQ);
        __m256 dc = _mm256_and_ps(d, keep);
        __m256 e = _mm256_and_ps(ll_exp(dc), keep);
        float eb[8], db[8];
        _mm256_storeu_ps(eb, e);
        _mm256_storeu_ps(db, dc);
        for (int j = 0; i + j < n; j++) {
            sum += (double)eb[j];
            dot += (double)eb[j] * (double)db[j];
            if (buf[j] >= floor) cand[nc++] = (int32_t)(base + i + j);
        }
    }
    sums[0] = sum;
    sums[1] = dot;
    return nc;
}

LL_TARGET static void exp_avx2(const float *d, int64_t n, float *out) {
    const __m256 lo = _mm256_set1_ps(-87.33654f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(d + i);
        __m256 keep = _mm256_cmp_ps(v, lo, _CMP_GE_OQ);
        _mm256_storeu_ps(out + i, _mm256_and_ps(ll_exp(_mm256_and_ps(v, keep)), keep));
    }
    for (; i < n; i++) {
        float buf[8] = {d[i], 0, 0, 0, 0, 0, 0, 0}, res[8];
        __m256 v = _mm256_loadu_ps(buf);
        __m256 keep = _mm256_cmp_ps(v, lo, _CMP_GE_OQ);
        _mm256_storeu_ps(res, _mm256_and_ps(ll_exp(_mm256_and_ps(v, keep)), keep));
        out[i] = res[0];
    }
}

LL_TARGET512 static int64_t row_pass_avx512(const float *x, int64_t n, float m, float floor, double *sums,
                                            int32_t *cand, int64_t base) {
    const __m512 vm = _mm512_set1_ps(m), vf = _mm512_set1_ps(floor), lo = _mm512_set1_ps(-87.33654f);
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd(), t0 = _mm512_setzero_pd(), t1 = _mm512_setzero_pd();
    int64_t nc = 0;
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 in = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        __m512 v = _mm512_mask_loadu_ps(ninf, in, x + i);  /* past the end: -inf, which counts as 0 */
        __m512 d = _mm512_sub_ps(v, vm);
        __mmask16 keep = _mm512_cmp_ps_mask(d, lo, _CMP_GE_OQ);
        __m512 dc = _mm512_maskz_mov_ps(keep, d);
        __m512 e = _mm512_maskz_mov_ps(keep, ll_exp16(dc));
        __m512d elo = _mm512_cvtps_pd(_mm512_castps512_ps256(e));
        __m512d ehi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1)));
        __m512d dlo = _mm512_cvtps_pd(_mm512_castps512_ps256(dc));
        __m512d dhi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(dc), 1)));
        s0 = _mm512_add_pd(s0, elo);
        s1 = _mm512_add_pd(s1, ehi);
        t0 = _mm512_fmadd_pd(elo, dlo, t0);
        t1 = _mm512_fmadd_pd(ehi, dhi, t1);
        unsigned mask = _mm512_mask_cmp_ps_mask(in, v, vf, _CMP_GE_OQ);
        while (mask) {
            cand[nc++] = (int32_t)(base + i + __builtin_ctz(mask));
            mask &= mask - 1;
        }
    }
    sums[0] = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
    sums[1] = _mm512_reduce_add_pd(_mm512_add_pd(t0, t1));
    return nc;
}

static int level = -1;  /* 2: AVX-512F, 1: AVX2 + FMA, 0: neither (then Python does not use this library) */

int ll_available(void) {
    if (level < 0) {
        __builtin_cpu_init();
        level = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma") ? 2
                : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
        const char *cap = getenv("LLAMALENS_KERNELS_AVX2");  /* tests: the AVX2 path on an AVX-512 machine */
        if (cap && *cap && *cap != '0' && level > 1) level = 1;
    }
    return level;
}

int64_t ll_row_pass(const float *x, int64_t n, float m, float floor, double *sums, int32_t *cand, int64_t block,
                    double *bsums) {
    if (block <= 0 || !bsums) block = n > 0 ? n : 1;
    int avx512 = ll_available() > 1;
    int64_t nc = 0;
    double s = 0.0, t = 0.0;
    for (int64_t b0 = 0, j = 0; b0 < n; b0 += block, j++) {
        int64_t len = n - b0 < block ? n - b0 : block;
        double part[2];
        nc += avx512 ? row_pass_avx512(x + b0, len, m, floor, part, cand + nc, b0)
                     : row_pass_avx2(x + b0, len, m, floor, part, cand + nc, b0);
        s += part[0];
        t += part[1];
        if (bsums) bsums[j] = part[0];
    }
    sums[0] = s;
    sums[1] = t;
    return nc;
}

/* The value at ascending position `at` of a[0..n) (Hoare's quickselect; reorders a; no NaN in a). */
static float select_at(float *a, int64_t n, int64_t at) {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        float pivot = a[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] < pivot) i++;
            while (a[j] > pivot) j--;
            if (i <= j) {
                float t = a[i];
                a[i] = a[j];
                a[j] = t;
                i++;
                j--;
            }
        }
        if (at <= j) hi = j;
        else if (at >= i) lo = i;
        else return a[at];
    }
    return a[at];
}

/* The row's maximum, or NaN when it holds a NaN (as numpy's max). */
LL_TARGET static float row_max(const float *x, int64_t n) {
    __m256 mx = _mm256_set1_ps(-INFINITY), bad = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        mx = _mm256_max_ps(mx, v);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    float b[8], r = -INFINITY;
    int nan = _mm256_movemask_ps(bad) != 0;
    _mm256_storeu_ps(b, mx);
    for (int j = 0; j < 8; j++) r = b[j] > r ? b[j] : r;
    for (; i < n; i++) {
        nan |= x[i] != x[i];
        r = x[i] > r ? x[i] : r;
    }
    return nan ? NAN : r;
}

/* The k largest of the candidates (indices into x, in increasing order) by (logit descending, id ascending):
   ids into tid, logits into tv; returns how many (k, or fewer candidates). */
static int64_t top_of(const float *x, const int32_t *cand, int64_t nc, int64_t k, int32_t *tid, float *tv) {
    int64_t cnt = 0;
    for (int64_t c = 0; c < nc; c++) {
        float v = x[cand[c]];
        if (cnt == k && !(v > tv[k - 1])) continue;  /* an equal logit with a larger id ranks after */
        int64_t p = cnt < k ? cnt : k - 1;
        while (p > 0 && tv[p - 1] < v) {
            tv[p] = tv[p - 1];
            tid[p] = tid[p - 1];
            p--;
        }
        tv[p] = v;
        tid[p] = cand[c];
        if (cnt < k) cnt++;
    }
    return cnt;
}

/* A decode step's rows at once (stats.block_stats), each row read from memory once and then from cache:
   m[r] = max (NaN with a NaN), floor[r] = the k-th largest of x[r, ::stride] (scratch: room for n / stride + 1),
   the row pass (sums, the block sums, the candidates x >= floor appended to cand, cand_off[r + 1] their end), and
   the k largest candidates sorted (tid, tv: rows x k), and from the sums the row's log-sum-exp lse[r] = m + log s,
   its entropy ent[r] = max(log s - dot / s, 0) and the top list's logprobs top_lp[r] = tv - lse (float64: the same
   operations, so the same values, as stats.py's numpy path). A row whose maximum is not finite gets no candidates,
   floor and lse NaN (the caller takes it the plain way). strict[r]: how many of the top list's head strictly
   decrease (RowStats.top_k_ids' test that the k + 1 largest are all different). Returns the candidates' total. */
static int64_t block_stats(const float *x, int64_t rows, int64_t n, int64_t stride, int64_t k, int64_t block,
                           float *scratch, float *m, float *floor, double *sums, double *bsums, int32_t *cand,
                           int64_t *cand_off, int32_t *tid, float *tv, double *lse, double *ent, double *top_lp,
                           int64_t *strict, int64_t *tid64) {
    int64_t total = 0, nb = block > 0 ? (n + block - 1) / block : 0;
    cand_off[0] = 0;
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * n;
        float mr = row_max(row, n);
        m[r] = mr;
        if (!isfinite(mr)) {
            floor[r] = NAN;
            sums[2 * r] = sums[2 * r + 1] = NAN;
            lse[r] = ent[r] = NAN;
            strict[r] = 0;
            cand_off[r + 1] = total;
            continue;
        }
        int64_t ns = 0;
        for (int64_t i = 0; i < n; i += stride) scratch[ns++] = row[i];
        float fl = select_at(scratch, ns, ns - k);
        floor[r] = fl;
        int64_t nc = ll_row_pass(row, n, mr, fl, sums + 2 * r, cand + total, block, bsums ? bsums + r * nb : NULL);
        top_of(row, cand + total, nc, k, tid + r * k, tv + r * k);
        double log_s = log(sums[2 * r]), h = log_s - sums[2 * r + 1] / sums[2 * r], l = (double)mr + log_s;
        lse[r] = l;
        ent[r] = h < 0.0 ? 0.0 : h;
        for (int64_t j = 0; j < k; j++) {
            top_lp[r * k + j] = (double)tv[r * k + j] - l;
            tid64[r * k + j] = tid[r * k + j];
        }
        int64_t run = 1;  /* the top list's strictly decreasing head: 1 + the entries below a larger one */
        while (run < k && tv[r * k + run - 1] > tv[r * k + run]) run++;
        strict[r] = run;
        total += nc;
        cand_off[r + 1] = total;
    }
    return total;
}

/* ll_block_stats with its arguments in one int64 array (kernels.block_pass keeps it from step to step, one
   argument for ctypes to convert instead of nineteen): a[0..5] = rows, n, stride, k, block, and then the
   addresses of scratch, m, floor, sums, bsums, cand, cand_off, tid, tv, lse, ent, top_lp, strict and tid64
   (the top list's ids again as int64, RowStats.top_ids' type). */
int64_t ll_block_stats(const float *x, const int64_t *a) {
#define LL_ARG(T, i) ((T *)(intptr_t)a[i])
    return block_stats(x, a[0], a[1], a[2], a[3], a[4], LL_ARG(float, 5), LL_ARG(float, 6), LL_ARG(float, 7),
                       LL_ARG(double, 8), LL_ARG(double, 9), LL_ARG(int32_t, 10), LL_ARG(int64_t, 11),
                       LL_ARG(int32_t, 12), LL_ARG(float, 13), LL_ARG(double, 14), LL_ARG(double, 15),
                       LL_ARG(double, 16), LL_ARG(int64_t, 17), LL_ARG(int64_t, 18));
#undef LL_ARG
}

/* llama_token_data {id, logit, p = 0} of the given ids (any order) written to out in increasing id order: the
   sampler prefilter's top k (sampler.Candidates.fill_ids), one call instead of a sort and three strided writes. */
typedef struct { int32_t id; float logit; float p; } ll_token_data;
void ll_fill_ids(const float *row, const int32_t *ids, int64_t k, ll_token_data *out) {
    for (int64_t i = 0; i < k; i++) {  /* insertion by id: k is at most sampler.PREFILTER_MAX_K */
        int32_t v = ids[i];
        int64_t p = i;
        while (p > 0 && out[p - 1].id > v) {
            out[p] = out[p - 1];
            p--;
        }
        out[p].id = v;
    }
    for (int64_t i = 0; i < k; i++) {
        out[i].logit = row[out[i].id];
        out[i].p = 0.0f;
    }
}

/* numpy's order of a float64 sum (its pairwise summation: up to 128 terms in 8 running sums, above that the two
   halves, cut at a multiple of 8), so that a sum here is the value np.sum gives for the same terms */
static double pairwise_sum(const double *a, int64_t n) {
    if (n < 8) {
        double s = 0.0;
        for (int64_t i = 0; i < n; i++) s += a[i];
        return s;
    }
    if (n <= 128) {
        double r[8];
        for (int j = 0; j < 8; j++) r[j] = a[j];
        int64_t i = 8;
        for (; i < n - n % 8; i += 8)
            for (int j = 0; j < 8; j++) r[j] += a[i + j];
        double s = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++) s += a[i];
        return s;
    }
    int64_t h = n / 2;
    h -= h % 8;
    return pairwise_sum(a, h) + pairwise_sum(a + h, n - h);
}

/* log p of survivor `sel` under the softmax of the survivors' logits d[0..n) (after temperature), n <= LL_EXACT:
   float64 throughout, as stats.sampled_logprob's numpy path computes it (the max, exp(l - max) with libm's exp,
   numpy's summation order, max + log(sum)); NaN when a logit is NaN or n is out of range. numpy's own float64
   exp is libm's on an AVX2 machine and its AVX-512 loop on an AVX-512 one, which differs from libm's in the last
   bit for some inputs: there the two paths may differ by a few 1e-16 nats. */
#define LL_EXACT 4096
double ll_survivor_lp(const ll_token_data *d, int64_t n, int64_t sel) {
    if (n <= 0 || n > LL_EXACT || sel < 0 || sel >= n) return NAN;
    double m = -INFINITY, e[LL_EXACT];
    for (int64_t i = 0; i < n; i++) {
        double v = (double)d[i].logit;
        if (v != v) return NAN;
        if (v > m) m = v;
    }
    for (int64_t i = 0; i < n; i++) e[i] = exp((double)d[i].logit - m);
    return (double)d[sel].logit - (m + log(pairwise_sum(e, n)));
}

/* llama.cpp's llama_token_data_array and llama_sampler_apply, as the vendored llama.h declares them */
typedef struct { ll_token_data *data; size_t size; int64_t selected; _Bool sorted; } ll_token_data_array;
typedef void (*ll_apply_fn)(void *smpl, ll_token_data_array *cur);
typedef struct { int64_t survivors; int64_t selected; double lp; double logit; int64_t rank; } ll_pick_result;

/* A prefiltered pick in one call (sampler.Sampler.choose with the prefilter's ids): ll_fill_ids into buf, the chain
   applied to those k entries, then the kept-apart dist (when not NULL), as Sampler._run and _native_dist do; the
   survivors are what the chain leaves (its data and size before dist, as Sampler._survivors reads them), the pick
   dist's (or the chain's own) selected index, negative counted from the end as numpy's index would. With `want_lp`
   the pick's ll_survivor_lp. The chosen token's raw logit row[token], and its rank in the row from the row's top
   list tv[0..ntv) (its ntv largest logits, descending: RowStats' _top_logits) when the token is at or above the
   list's last entry, 1 + how many entries are larger (as RowStats.for_token ranks it), else 0 (not known here).
   Returns the chosen token id; -1 when the survivors are out of range (nothing left, or more than LL_EXACT). */
int64_t ll_pick_ids(const float *row, const int32_t *ids, int64_t k, ll_token_data *buf, ll_apply_fn apply,
                    void *chain, void *dist, int want_lp, const float *tv, int64_t ntv, ll_pick_result *out) {
    ll_fill_ids(row, ids, k, buf);
    ll_token_data_array cur = {buf, (size_t)k, -1, 0};
    apply(chain, &cur);
    ll_token_data *data = cur.data;
    int64_t size = (int64_t)cur.size;
    if (dist) apply(dist, &cur);
    int64_t sel = cur.selected < 0 ? cur.selected + size : cur.selected;
    out->survivors = size;
    out->selected = sel;
    if (size <= 0 || size > LL_EXACT || sel < 0 || sel >= size) return -1;
    out->lp = want_lp ? ll_survivor_lp(data, size, sel) : 0.0;
    int32_t token = data[sel].id;
    float c = row[token];
    out->logit = (double)c;
    out->rank = 0;
    if (tv && ntv > 0 && c >= tv[ntv - 1]) {
        int64_t above = 0;
        while (above < ntv && tv[above] > c) above++;  /* tv descends: the larger ones come first */
        out->rank = above + 1;
    }
    return token;
}

/* ll_half_sum(x, n, c): sum over the row of exp((x_i - c) / 2), float64 sums of ll_exp's float32 values; with c
   the row's log-sum-exp (rounded to float32) each term is sqrt(p_i), the sum the Bhattacharyya coefficient of the
   row's distribution with the uniform one times sqrt(n) (core/confidence.py: the Renyi divergence of order 1/2 and
   the Fisher-Rao distance to uniform). Terms below exp(-87.33) count as 0, as in the row pass: at most 2^-126 each
   against a sum of at least the largest term, about 1 when c >= every x_i. */
LL_TARGET static double half_sum_avx2(const float *x, int64_t n, float c) {
    const __m256 vc = _mm256_set1_ps(c), half = _mm256_set1_ps(0.5f), lo = _mm256_set1_ps(-87.33654f);
    __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 d = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), vc), half);
        __m256 keep = _mm256_cmp_ps(d, lo, _CMP_GE_OQ);
        __m256 e = _mm256_and_ps(ll_exp(_mm256_and_ps(d, keep)), keep);
        s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
        s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
    }
    double s[4];
    _mm256_storeu_pd(s, _mm256_add_pd(s0, s1));
    double sum = (s[0] + s[1]) + (s[2] + s[3]);
    if (i < n) {  /* the tail through the same vector code, padded with -inf */
        float buf[8], eb[8];
        for (int j = 0; j < 8; j++) buf[j] = i + j < n ? x[i + j] : -INFINITY;
        __m256 d = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(buf), vc), half);
        __m256 keep = _mm256_cmp_ps(d, lo, _CMP_GE_OQ);
        _mm256_storeu_ps(eb, _mm256_and_ps(ll_exp(_mm256_and_ps(d, keep)), keep));
        for (int j = 0; i + j < n; j++) sum += (double)eb[j];
    }
    return sum;
}

LL_TARGET512 static double half_sum_avx512(const float *x, int64_t n, float c) {
    const __m512 vc = _mm512_set1_ps(c), half = _mm512_set1_ps(0.5f), lo = _mm512_set1_ps(-87.33654f);
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 in = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        __m512 d = _mm512_mul_ps(_mm512_sub_ps(_mm512_mask_loadu_ps(ninf, in, x + i), vc), half);
        __mmask16 keep = _mm512_cmp_ps_mask(d, lo, _CMP_GE_OQ);
        __m512 e = _mm512_maskz_mov_ps(keep, ll_exp16(_mm512_maskz_mov_ps(keep, d)));
        s0 = _mm512_add_pd(s0, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
        s1 = _mm512_add_pd(s1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1))));
    }
    return _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
}

double ll_half_sum(const float *x, int64_t n, float c) {
    return ll_available() > 1 ? half_sum_avx512(x, n, c) : half_sum_avx2(x, n, c);
}

void ll_exp_f32(const float *d, int64_t n, float *out) {  /* the same exp: tests, and sampler.dist_select */
    exp_avx2(d, n, out);
}
#else
int ll_available(void) { return 0; }
int64_t ll_row_pass(const float *x, int64_t n, float m, float floor, double *sums, int32_t *cand, int64_t block,
                    double *bsums) {
    (void)x; (void)n; (void)m; (void)floor; (void)sums; (void)cand; (void)block; (void)bsums;
    return -1;
}
void ll_exp_f32(const float *d, int64_t n, float *out) { (void)d; (void)n; (void)out; }
void ll_fill_ids(const float *row, const int32_t *ids, int64_t k, void *out) { (void)row; (void)ids; (void)k; (void)out; }
double ll_survivor_lp(const void *d, int64_t n, int64_t sel) { (void)d; (void)n; (void)sel; return NAN; }
int64_t ll_pick_ids(const float *row, const int32_t *ids, int64_t k, void *buf, void *apply, void *chain, void *dist,
                    int want_lp, const float *tv, int64_t ntv, void *out) {
    (void)row; (void)ids; (void)k; (void)buf; (void)apply; (void)chain; (void)dist; (void)want_lp; (void)tv;
    (void)ntv; (void)out;
    return -1;
}
int64_t ll_block_stats(const float *x, const int64_t *a) { (void)x; (void)a; return -1; }
double ll_half_sum(const float *x, int64_t n, float c) { (void)x; (void)n; (void)c; return NAN; }
#endif
