/* The fused CPU kernels of langmerge's task-vector methods (docs/methods.md, "Kernels").
 *
 * Linear, task arithmetic, TIES and TIES-SV over one block of a tensor, in float32
 * or bfloat16, giving the bits of the reference torch kernel: every bfloat16
 * operation computes in float32 and rounds to nearest-even, a sum over the
 * model axis accumulates in float32 in model order from +0 and rounds once,
 * and masks multiply (trimmed and outvoted entries are signed zeros).
 * Plus the pieces of exact k-th magnitude selection (key histograms, tie
 * counts), the loss diagnostic of `langmerge analyze`, and a NaN/Inf count.
 *
 * Built at install time by setuptools (optional: without a compiler the
 * reference kernel is planned instead). Loaded with ctypes, so the GIL is
 * released during every call. Each call runs on `threads` threads of its own
 * (pthreads started and joined inside the call): no process-wide state.
 * Compiled with -ffp-contract=off: an implicit fused multiply-add would change bits (the one
 * explicit fmaf, in linear, is torch's own).
 */

#include <Python.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LM_ABI 5
#define BINS 65536
#define TASK 262144 /* elements per parallel work item (fused_cpu.CHUNK) */
#define TILE 512    /* elements per vector tile inside a work item */

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define LM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LM_CLONES
#endif
#define LM_INLINE static inline __attribute__((always_inline))

/* ------------------------------------------------------------------ threads */

typedef void (*task_fn)(void *ctx, int64_t task);

typedef struct {
    task_fn fn;
    void *ctx;
    int64_t ntasks;
    atomic_llong next;
} pool_t;

static void *worker(void *arg) {
    pool_t *p = (pool_t *)arg;
    for (;;) {
        int64_t t = atomic_fetch_add(&p->next, 1);
        if (t >= p->ntasks) break;
        p->fn(p->ctx, t);
    }
    return NULL;
}

/* Run fn(ctx, 0..ntasks-1) on up to `threads` threads (the caller's among them). */
static void parallel_for(int64_t ntasks, int threads, task_fn fn, void *ctx) {
    pool_t pool = {fn, ctx, ntasks, 0};
    int extra = threads - 1;
    if (extra > ntasks - 1) extra = (int)(ntasks - 1);
    pthread_t ids[64];
    if (extra > 64) extra = 64;
    int started = 0;
    for (; started < extra; started++)
        if (pthread_create(&ids[started], NULL, worker, &pool) != 0) break; /* fewer threads, same result */
    worker(&pool);
    for (int i = 0; i < started; i++) pthread_join(ids[i], NULL);
}

static int64_t ntasks_of(int64_t n) { return n <= 0 ? 0 : (n + TASK - 1) / TASK; }

/* Run fn over the work items of n entries, each writing its count of NaN/Inf outputs to (*bad)[t]
 * (the array is made here, before any item runs); returns their sum. */
static int64_t parallel_count(int64_t n, int threads, task_fn fn, void *ctx, int64_t **bad) {
    int64_t nt = ntasks_of(n);
    *bad = calloc(nt > 0 ? nt : 1, sizeof(int64_t));
    parallel_for(nt, threads, fn, ctx);
    int64_t total = 0;
    for (int64_t t = 0; t < nt; t++) total += (*bad)[t];
    free(*bad);
    *bad = NULL;
    return total;
}

/* ------------------------------------------------------------------ numerics */

LM_INLINE float as_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
LM_INLINE uint32_t as_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* Element j of a float32 (bf = 0) or bfloat16 (bf = 1) array, as float32. */
LM_INLINE float load(const void *p, int64_t j, const int bf) {
    if (bf) return as_float(((uint32_t)((const uint16_t *)p)[j]) << 16);
    return ((const float *)p)[j];
}

/* Round to the compute dtype: bfloat16 nearest-even (NaN kept), float32 as is. */
LM_INLINE float rnd(float v, const int bf) {
    if (!bf) return v;
    uint32_t u = as_bits(v);
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    return as_float((u & 0x7FFFFFFFu) > 0x7F800000u ? u : r);
}

LM_INLINE uint32_t key_of(float v) { return as_bits(v) & 0x7FFFFFFFu; }

/* round(x - base) at j, or x itself without a base. */
LM_INLINE float delta(const void *base, const void *x, int64_t j, const int bf) {
    if (!base) return load(x, j, bf);
    return rnd(load(x, j, bf) - load(base, j, bf), bf);
}

LM_INLINE void store(void *out, int64_t j, uint32_t bits, const int bf) {
    if (bf) ((uint16_t *)out)[j] = (uint16_t)(bits >> 16);
    else ((uint32_t *)out)[j] = bits;
}

/* Normalize, scale by lambda, add to the base, store; over one tile, each step a loop of its own
 * (no branch inside a loop, so each vectorizes). Returns how many outputs are NaN or Inf. */
LM_INLINE int64_t finish_tile(const float *b, float *mixed, const float *divisor, int len, int normalize, float lam,
                              void *out, int64_t s, const int bf) {
    for (int k = 0; k < len; k++) mixed[k] = rnd(mixed[k], bf);
    if (normalize)
        for (int k = 0; k < len; k++) mixed[k] = rnd(mixed[k] / divisor[k], bf);
    if (lam != 1.0f)
        for (int k = 0; k < len; k++) mixed[k] = rnd(mixed[k] * lam, bf);
    int64_t bad = 0;
    for (int k = 0; k < len; k++) {
        uint32_t r = as_bits(rnd(b[k] + mixed[k], bf));
        bad += (r & 0x7F800000u) == 0x7F800000u;
        store(out, s + k, r, bf);
    }
    return bad;
}

LM_INLINE int nonfinite(uint32_t bits) { return (bits & 0x7F800000u) == 0x7F800000u; }

/* ------------------------------------------------------------------ histogram */

typedef struct {
    const void *base, *x;
    int64_t n, span; /* elements per task: n split evenly over the threads */
    int level;
    uint32_t prefix;
    int64_t *hist;
    pthread_mutex_t lock;
} hist_ctx;

/* Counts are integers, so any split of the work gives the same histogram: one task per thread,
 * one local histogram each (allocating and merging one per small task would cost a quarter of the time). */
static int64_t span_of(int64_t n, int threads) {
    int64_t tasks = threads < 1 ? 1 : threads;
    if (tasks > ntasks_of(n)) tasks = ntasks_of(n);
    int64_t span = tasks <= 0 ? 1 : (n + tasks - 1) / tasks;
    return span < ((int64_t)1 << 31) ? span : ((int64_t)1 << 31);
}

LM_INLINE void hist_task_impl(hist_ctx *c, int64_t t, const int bf) {
    int64_t lo = t * c->span, hi = lo + c->span < c->n ? lo + c->span : c->n;
    /* Two local histograms, for even and odd entries: runs of equal keys (zeros, bfloat16's coarse
     * magnitudes) then do not wait on the previous increment of the same bin. Level 1 bins a key's high
     * 16 bits, which are below 0x8000 (the sign bit is cleared): 2 x 128 KiB, in L2. A span is < 2**31. */
    int bins = c->level == 1 ? BINS / 2 : BINS;
    uint32_t *even = calloc(2 * (size_t)bins, sizeof(uint32_t)), *odd = even + bins;
    uint32_t keys[TILE];
    for (int64_t s = lo; s < hi; s += TILE) {
        int len = (int)(hi - s < TILE ? hi - s : TILE);
        for (int k = 0; k < len; k++) keys[k] = key_of(delta(c->base, c->x, s + k, bf));
        if (c->level == 1) {
            int k = 0;
            for (; k + 1 < len; k += 2) { even[keys[k] >> 16]++; odd[keys[k + 1] >> 16]++; }
            if (k < len) even[keys[k] >> 16]++;
        } else {
            for (int k = 0; k < len; k++)
                if ((keys[k] >> 16) == c->prefix) even[keys[k] & 0xFFFFu]++;
        }
    }
    pthread_mutex_lock(&c->lock);
    for (int i = 0; i < bins; i++) c->hist[i] += (int64_t)even[i] + odd[i];
    pthread_mutex_unlock(&c->lock);
    free(even);
}

LM_CLONES static void hist_task_bf(void *ctx, int64_t t) { hist_task_impl(ctx, t, 1); }
LM_CLONES static void hist_task_f32(void *ctx, int64_t t) { hist_task_impl(ctx, t, 0); }

/* Add to hist[65536] the counts of magnitude keys of round(x - base) (of x
 * when base is NULL): level 1 bins the key's high 16 bits; level 2 bins the
 * low 16 bits of the keys whose high bits equal prefix. */
void lm_histogram(int bf, const void *base, const void *x, int64_t n, int level, uint32_t prefix,
                  int64_t *hist, int threads) {
    if (n <= 0) return;
    int64_t span = span_of(n, threads);
    hist_ctx c = {base, x, n, span, level, prefix, hist, PTHREAD_MUTEX_INITIALIZER};
    parallel_for((n + span - 1) / span, threads, bf ? hist_task_bf : hist_task_f32, &c);
}

/* ------------------------------------------------------------------ ties at the threshold */

typedef struct {
    const void *base, *x;
    int64_t n;
    uint32_t key;
    int64_t *counts; /* per task */
} count_ctx;

LM_INLINE int64_t count_range(const void *base, const void *x, int64_t lo, int64_t hi, uint32_t key, const int bf) {
    int64_t count = 0;
    for (int64_t j = lo; j < hi; j++) count += key_of(delta(base, x, j, bf)) == key;
    return count;
}

LM_INLINE void count_task_impl(count_ctx *c, int64_t t, const int bf) {
    int64_t lo = t * TASK, hi = lo + TASK < c->n ? lo + TASK : c->n;
    c->counts[t] = count_range(c->base, c->x, lo, hi, c->key, bf);
}

LM_CLONES static void count_task_bf(void *ctx, int64_t t) { count_task_impl(ctx, t, 1); }
LM_CLONES static void count_task_f32(void *ctx, int64_t t) { count_task_impl(ctx, t, 0); }

/* Per work item, how many entries of round(x - base) have magnitude key `key`; returns their total. */
static int64_t count_per_task(int bf, const void *base, const void *x, int64_t n, uint32_t key, int threads,
                              int64_t *counts) {
    count_ctx c = {base, x, n, key, counts};
    parallel_for(ntasks_of(n), threads, bf ? count_task_bf : count_task_f32, &c);
    int64_t total = 0;
    for (int64_t t = 0; t < ntasks_of(n); t++) total += counts[t];
    return total;
}

/* The tie scan's step over one block: returns how many entries of round(x - base) have magnitude key
 * `key`; when that is more than `need` (the ties still to keep), *index is the block index of the need-th
 * of them from 0 (the first not kept), else -1. The work items are counted in parallel; only the one
 * holding that entry is scanned again. */
int64_t lm_tie_scan(int bf, const void *base, const void *x, int64_t n, uint32_t key, int64_t need, int64_t *index,
                    int threads) {
    int64_t nt = ntasks_of(n);
    int64_t *counts = calloc(nt > 0 ? nt : 1, sizeof(int64_t));
    int64_t total = count_per_task(bf, base, x, n, key, threads, counts);
    *index = -1;
    for (int64_t t = 0; t < nt && total > need; t++) {
        if (need >= counts[t]) { need -= counts[t]; continue; }
        int64_t lo = t * TASK, hi = lo + TASK < n ? lo + TASK : n;
        for (int64_t j = lo; j < hi; j++) {
            float d = bf ? delta(base, x, j, 1) : delta(base, x, j, 0);
            if (key_of(d) == key && need-- == 0) { *index = j; break; }
        }
        break;
    }
    free(counts);
    return total;
}

/* ------------------------------------------------------------------ linear */

typedef struct {
    const void *const *xs;
    int m;
    int64_t n;
    const float *weights;
    float divisor;
    int normalize, fused_madd;
    void *out;
    int64_t *bad;
} linear_ctx;

LM_INLINE void linear_task_impl(linear_ctx *c, int64_t t, const int bf) {
    int64_t lo = t * TASK, hi = lo + TASK < c->n ? lo + TASK : c->n;
    float acc[TILE];
    int64_t bad = 0;
    for (int64_t s = lo; s < hi; s += TILE) {
        int len = (int)(hi - s < TILE ? hi - s : TILE);
        for (int k = 0; k < len; k++) acc[k] = 0.0f;
        for (int i = 0; i < c->m; i++) {
            const void *x = c->xs[i];
            float w = c->weights[i];
            if (c->fused_madd)
                for (int k = 0; k < len; k++) acc[k] = fmaf(load(x, s + k, bf), w, acc[k]);
            else
                for (int k = 0; k < len; k++) acc[k] = acc[k] + load(x, s + k, bf) * w;
        }
        if (c->normalize)
            for (int k = 0; k < len; k++) acc[k] = acc[k] / c->divisor;
        for (int k = 0; k < len; k++) {
            uint32_t r = as_bits(rnd(acc[k], bf));
            bad += (r & 0x7F800000u) == 0x7F800000u;
            store(c->out, s + k, r, bf);
        }
    }
    c->bad[t] = bad;
}

LM_CLONES static void linear_task_bf(void *ctx, int64_t t) { linear_task_impl(ctx, t, 1); }
LM_CLONES static void linear_task_f32(void *ctx, int64_t t) { linear_task_impl(ctx, t, 0); }

/* linear over n entries: a float32 accumulator from +0, one `acc += x_i * w_i` per model in order
 * (fused_madd: as one fused multiply-add, which is what torch's addcmul_ computes on the machines where
 * fused_cpu finds it so), divided by `divisor` with normalize, rounded once; returns the NaN/Inf count. */
int64_t lm_merge_linear(int bf, const void *const *xs, int m, int64_t n, const float *weights, float divisor,
                        int normalize, int fused_madd, void *out, int threads) {
    linear_ctx c = {xs, m, n, weights, divisor, normalize, fused_madd, out, NULL};
    return parallel_count(n, threads, bf ? linear_task_bf : linear_task_f32, &c, &c.bad);
}

/* ------------------------------------------------------------------ task arithmetic */

typedef struct {
    const void *base;
    const void *const *xs;
    int m;
    int64_t n;
    const float *weights;
    float divisor;
    int normalize;
    float lam;
    void *out;
    int64_t *bad; /* per task */
} sum_ctx;

LM_INLINE void sum_task_impl(sum_ctx *c, int64_t t, const int bf) {
    int64_t lo = t * TASK, hi = lo + TASK < c->n ? lo + TASK : c->n;
    float b[TILE], mixed[TILE], divisor[TILE];
    for (int k = 0; k < TILE; k++) divisor[k] = c->divisor;
    int64_t bad = 0;
    for (int64_t s = lo; s < hi; s += TILE) {
        int len = (int)(hi - s < TILE ? hi - s : TILE);
        for (int k = 0; k < len; k++) { b[k] = load(c->base, s + k, bf); mixed[k] = 0.0f; }
        for (int i = 0; i < c->m; i++) {
            const void *x = c->xs[i];
            float w = c->weights[i];
            for (int k = 0; k < len; k++) mixed[k] += rnd(w * rnd(load(x, s + k, bf) - b[k], bf), bf);
        }
        bad += finish_tile(b, mixed, divisor, len, c->normalize, c->lam, c->out, s, bf);
    }
    c->bad[t] = bad;
}

LM_CLONES static void sum_task_bf(void *ctx, int64_t t) { sum_task_impl(ctx, t, 1); }
LM_CLONES static void sum_task_f32(void *ctx, int64_t t) { sum_task_impl(ctx, t, 0); }

/* Task arithmetic over n entries; returns how many outputs are NaN or Inf. */
int64_t lm_merge_sum(int bf, const void *base, const void *const *xs, int m, int64_t n, const float *weights,
                     float divisor, int normalize, float lam, void *out, int threads) {
    sum_ctx c = {base, xs, m, n, weights, divisor, normalize, lam, out, NULL};
    return parallel_count(n, threads, bf ? sum_task_bf : sum_task_f32, &c, &c.bad);
}

/* ------------------------------------------------------------------ TIES / TIES-SV */

typedef struct {
    const void *base;
    const void *const *xs;
    int m;
    int64_t n, offset;
    const uint8_t *trim;
    const uint32_t *thresholds;
    const int64_t *cutoffs;
    const float *weights, *scales;
    int round_vote, normalize;
    float lam;
    void *out;
    int64_t *bad;
} ties_ctx;

/* Model i's weighted trimmed task values over one tile: v = round(w * trimmed). Kept:
 * keys above the threshold, and keys equal to it at flat indices below the cutoff. */
LM_INLINE void weighted_trimmed(const ties_ctx *c, int i, int64_t s, int len, const float *b, float *v, const int bf) {
    const void *x = c->xs[i];
    float w = c->weights[i];
    if (c->trim[i]) {
        uint32_t thr = c->thresholds[i];
        int64_t rel = c->cutoffs[i] - c->offset - s; /* tile-relative, clamped so that 32-bit lanes compare it */
        int32_t cut = rel < 0 ? 0 : rel > TILE ? TILE : (int32_t)rel;
        for (int k = 0; k < len; k++) {
            float d = rnd(load(x, s + k, bf) - b[k], bf);
            uint32_t key = key_of(d);
            float keep = (float)((key > thr) | ((key == thr) & (k < cut)));
            v[k] = rnd(w * (d * keep), bf);
        }
    } else {
        for (int k = 0; k < len; k++) v[k] = rnd(w * rnd(load(x, s + k, bf) - b[k], bf), bf);
    }
}

LM_INLINE void ties_task_impl(ties_ctx *c, int64_t t, const int bf) {
    int64_t lo = t * TASK, hi = lo + TASK < c->n ? lo + TASK : c->n;
    float b[TILE], mass[TILE], mixed[TILE], divisor[TILE];
    float *v = malloc(sizeof(float) * TILE * (c->m > 0 ? c->m : 1));
    int64_t bad = 0;
    for (int64_t s = lo; s < hi; s += TILE) {
        int len = (int)(hi - s < TILE ? hi - s : TILE);
        for (int k = 0; k < len; k++) { b[k] = load(c->base, s + k, bf); mass[k] = 0.0f; mixed[k] = 0.0f; divisor[k] = 0.0f; }
        for (int i = 0; i < c->m; i++) {
            float *vi = v + (size_t)i * TILE;
            float scale = c->scales[i];
            weighted_trimmed(c, i, s, len, b, vi, bf);
            for (int k = 0; k < len; k++) mass[k] += vi[k] * scale;
        }
        /* TIES rounds its vote to the compute dtype (a torch sum); TIES-SV's scaled vote stays float32 */
        if (c->round_vote)
            for (int k = 0; k < len; k++) mass[k] = rnd(mass[k], bf);
        for (int i = 0; i < c->m; i++) {
            const float *vi = v + (size_t)i * TILE;
            float w = c->weights[i];
            for (int k = 0; k < len; k++) {
                /* masks multiply: an outvoted or trimmed entry adds a signed zero */
                float agree = (float)((vi[k] != 0.0f) & ((vi[k] > 0.0f) == (mass[k] >= 0.0f)));
                mixed[k] += vi[k] * agree;
                divisor[k] += w * agree;
            }
        }
        for (int k = 0; k < len; k++) {
            float d = rnd(divisor[k], bf);
            divisor[k] = d == 0.0f ? 1.0f : d;
        }
        bad += finish_tile(b, mixed, divisor, len, c->normalize, c->lam, c->out, s, bf);
    }
    free(v);
    c->bad[t] = bad;
}

LM_CLONES static void ties_task_bf(void *ctx, int64_t t) { ties_task_impl(ctx, t, 1); }
LM_CLONES static void ties_task_f32(void *ctx, int64_t t) { ties_task_impl(ctx, t, 0); }

/* TIES / TIES-SV over n entries whose first has flat index `offset`; returns the count of NaN/Inf outputs.
 * scales: per-model vote multipliers (1 for TIES); cutoffs: absolute flat indices. */
int64_t lm_merge_ties(int bf, const void *base, const void *const *xs, int m, int64_t n, int64_t offset,
                      const uint8_t *trim, const uint32_t *thresholds, const int64_t *cutoffs, const float *weights,
                      const float *scales, int round_vote, int normalize, float lam, void *out, int threads) {
    ties_ctx c = {base, xs, m, n, offset, trim, thresholds, cutoffs, weights, scales, round_vote, normalize, lam, out,
                  NULL};
    return parallel_count(n, threads, bf ? ties_task_bf : ties_task_f32, &c, &c.bad);
}

/* ------------------------------------------------------------------ exact L1 sums */

typedef struct {
    const void *x;
    int64_t n, span;
    uint64_t *sums; /* 256, shared */
    pthread_mutex_t lock;
} l1_ctx;

LM_INLINE void l1_task_impl(l1_ctx *c, int64_t t, const int bf) {
    int64_t lo = t * c->span, hi = lo + c->span < c->n ? lo + c->span : c->n;
    uint64_t local[256] = {0}; /* a span is < 2**31 entries of < 2**24: no overflow */
    for (int64_t j = lo; j < hi; j++) {
        uint32_t u = as_bits(load(c->x, j, bf)) & 0x7FFFFFFFu;
        uint32_t e = u >> 23;
        local[e ? e : 1] += (u & 0x7FFFFFu) | (e ? 0x800000u : 0u);
    }
    pthread_mutex_lock(&c->lock);
    for (int e = 0; e < 256; e++) c->sums[e] += local[e];
    pthread_mutex_unlock(&c->lock);
}

LM_CLONES static void l1_task_bf(void *ctx, int64_t t) { l1_task_impl(ctx, t, 1); }
LM_CLONES static void l1_task_f32(void *ctx, int64_t t) { l1_task_impl(ctx, t, 0); }

/* The exact sum of |x| as integer mantissa sums per float32 exponent (exponent field 0 counted as 1):
 * sums[e] += the mantissas (hidden bit included) of the entries with exponent e. */
void lm_l1_sums(int bf, const void *x, int64_t n, uint64_t *sums, int threads) {
    if (n <= 0) return;
    int64_t span = span_of(n, threads);
    l1_ctx c = {x, n, span, sums, PTHREAD_MUTEX_INITIALIZER};
    parallel_for((n + span - 1) / span, threads, bf ? l1_task_bf : l1_task_f32, &c);
}

/* ------------------------------------------------------------------ NaN / Inf */

typedef struct {
    const void *x;
    int64_t n;
    int64_t *bad;
} finite_ctx;

LM_INLINE void finite_task_impl(finite_ctx *c, int64_t t, const int bf) {
    int64_t lo = t * TASK, hi = lo + TASK < c->n ? lo + TASK : c->n;
    int64_t bad = 0;
    for (int64_t j = lo; j < hi; j++) bad += nonfinite(as_bits(load(c->x, j, bf)));
    c->bad[t] = bad;
}

LM_CLONES static void finite_task_bf(void *ctx, int64_t t) { finite_task_impl(ctx, t, 1); }
LM_CLONES static void finite_task_f32(void *ctx, int64_t t) { finite_task_impl(ctx, t, 0); }

int64_t lm_count_nonfinite(int bf, const void *x, int64_t n, int threads) {
    finite_ctx c = {x, n, NULL};
    return parallel_count(n, threads, bf ? finite_task_bf : finite_task_f32, &c, &c.bad);
}

/* ------------------------------------------------------------------ the loss diagnostic */

typedef struct {
    const void *base;
    const void *const *xs;
    int m;
    int64_t n, offset;
    const uint8_t *trim;
    const uint32_t *thresholds;
    const int64_t *cutoffs;
    const float *weights;
    int votes;
    const float *scales; /* votes x m */
    const uint8_t *round_vote;
    int npairs;
    const int32_t *pair_a, *pair_b;
    /* per task partials, summed in task order afterwards (deterministic whatever the thread count) */
    int64_t *kept, *both, *conflicts, *lost;
    double *kept_mass, *squared, *lost_mass;
} tally_ctx;

LM_INLINE int sign_of(float v) { return (v > 0.0f) - (v < 0.0f); }

LM_INLINE void tally_task_impl(tally_ctx *c, int64_t t, const int bf) {
    int64_t lo = t * TASK, hi = lo + TASK < c->n ? lo + TASK : c->n;
    int m = c->m, votes = c->votes, np = c->npairs;
    int mm = m > 0 ? m : 1, nq = np > 0 ? np : 1, vm = votes * m > 0 ? votes * m : 1;
    /* The task's sums in a buffer of its own, copied out once: summing straight into the shared partial
     * arrays, whose tasks sit side by side in a cache line, made two threads six times slower than one. */
    void *buf = calloc(1, sizeof(int64_t) * (mm + 2 * nq + vm) + sizeof(double) * (2 * mm + vm) +
                              sizeof(float) * TILE * (2 * mm + 3));
    int64_t *restrict kept = buf;
    int64_t *restrict both = kept + mm, *restrict conflicts = both + nq, *restrict lost = conflicts + nq;
    double *restrict kept_mass = (double *)(lost + vm), *restrict squared = kept_mass + mm;
    double *restrict lost_mass = squared + mm;
    float *restrict tv = (float *)(lost_mass + vm); /* m x TILE: trimmed task vectors */
    float *restrict v = tv + mm * TILE;            /* m x TILE: weighted */
    float *restrict bt = v + mm * TILE, *restrict mass = bt + TILE;
    float *restrict dt = mass + TILE; /* one model's entries before trimming; then its lost masses */
    /* Tile by tile, one model (pair, vote) at a time with its sums in registers: each sum still adds the
     * entries in index order, so the results are those of an entry-by-entry loop (4x sooner with 2 threads). */
    for (int64_t t0 = lo; t0 < hi; t0 += TILE) {
        int len = hi - t0 < TILE ? (int)(hi - t0) : TILE;
        for (int k = 0; k < len; k++) bt[k] = load(c->base, t0 + k, bf);
        for (int i = 0; i < m; i++) {
            float *restrict tvi = tv + i * TILE, *restrict vi = v + i * TILE;
            const void *x = c->xs[i];
            const float w = c->weights[i];
            const uint32_t thr = c->thresholds[i];
            const int64_t cut = c->cutoffs[i] - c->offset - t0; /* key == thr is kept below this k */
            const int trim = c->trim[i];
            int64_t nonzero = 0;
            /* the entries first (a loop that vectorizes), then the float64 sums in index order (one that cannot) */
            for (int k = 0; k < len; k++) {
                float d = rnd(load(x, t0 + k, bf) - bt[k], bf);
                dt[k] = d;
                if (trim) {
                    uint32_t key = key_of(d);
                    d = d * (float)((key > thr) | ((key == thr) & (k < cut)));
                }
                tvi[k] = d;
                vi[k] = rnd(w * d, bf);
                nonzero += d != 0.0f;
            }
            double sq = squared[i], km = kept_mass[i];
            for (int k = 0; k < len; k++) {
                sq += (double)dt[k] * (double)dt[k];
                km += tvi[k] < 0 ? -tvi[k] : tvi[k];
            }
            squared[i] = sq, kept_mass[i] = km, kept[i] += nonzero;
        }
        for (int q = 0; q < np; q++) {
            const float *ta = tv + c->pair_a[q] * TILE, *te = tv + c->pair_b[q] * TILE;
            const float *va = v + c->pair_a[q] * TILE, *ve = v + c->pair_b[q] * TILE;
            int64_t nb = 0, nc = 0;
            for (int k = 0; k < len; k++) {
                int kb = (ta[k] != 0.0f) & (te[k] != 0.0f);
                nb += kb;
                nc += kb & (sign_of(va[k]) != sign_of(ve[k]));
            }
            both[q] += nb, conflicts[q] += nc;
        }
        for (int s = 0; s < votes; s++) {
            for (int k = 0; k < len; k++) mass[k] = 0.0f;
            for (int i = 0; i < m; i++) { /* the vote's sum in model order, as the merge adds it */
                const float sc = c->scales[s * m + i], *vi = v + i * TILE;
                for (int k = 0; k < len; k++) mass[k] += vi[k] * sc;
            }
            if (c->round_vote[s])
                for (int k = 0; k < len; k++) mass[k] = rnd(mass[k], bf);
            for (int i = 0; i < m; i++) {
                const float *tvi = tv + i * TILE, *vi = v + i * TILE;
                int64_t nl = 0;
                for (int k = 0; k < len; k++) {
                    int up = mass[k] >= 0.0f;
                    int here = (tvi[k] != 0.0f) & !((vi[k] != 0.0f) & ((vi[k] > 0.0f) == up));
                    nl += here;
                    dt[k] = here ? (tvi[k] < 0 ? -tvi[k] : tvi[k]) : 0.0f;
                }
                double lm = lost_mass[s * m + i];
                for (int k = 0; k < len; k++) lm += dt[k];
                lost[s * m + i] += nl, lost_mass[s * m + i] = lm;
            }
        }
    }
    for (int i = 0; i < m; i++) {
        c->kept[t * m + i] = kept[i];
        c->kept_mass[t * m + i] = kept_mass[i];
        c->squared[t * m + i] = squared[i];
    }
    for (int q = 0; q < np; q++) {
        c->both[t * np + q] = both[q];
        c->conflicts[t * np + q] = conflicts[q];
    }
    for (int k = 0; k < votes * m; k++) {
        c->lost[t * votes * m + k] = lost[k];
        c->lost_mass[t * votes * m + k] = lost_mass[k];
    }
    free(buf);
}

LM_CLONES static void tally_task_bf(void *ctx, int64_t t) { tally_task_impl(ctx, t, 1); }
LM_CLONES static void tally_task_f32(void *ctx, int64_t t) { tally_task_impl(ctx, t, 0); }

/* Add one block's diagnostic to the totals (kept, kept_mass, squared: m; both, conflicts: npairs;
 * lost, lost_mass: votes x m). Entries are the merge's: same trimmed values, weighted values and votes. */
void lm_tally(int bf, const void *base, const void *const *xs, int m, int64_t n, int64_t offset, const uint8_t *trim,
              const uint32_t *thresholds, const int64_t *cutoffs, const float *weights, int votes, const float *scales,
              const uint8_t *round_vote, int npairs, const int32_t *pair_a, const int32_t *pair_b, int64_t *kept,
              double *kept_mass, double *squared, int64_t *both, int64_t *conflicts, int64_t *lost, double *lost_mass,
              int threads) {
    int64_t nt = ntasks_of(n);
    if (nt == 0) return;
    tally_ctx c = {base, xs, m, n, offset, trim, thresholds, cutoffs, weights, votes, scales, round_vote, npairs,
                   pair_a, pair_b,
                   calloc(nt * m, sizeof(int64_t)), calloc(nt * (npairs > 0 ? npairs : 1), sizeof(int64_t)),
                   calloc(nt * (npairs > 0 ? npairs : 1), sizeof(int64_t)), calloc(nt * votes * m, sizeof(int64_t)),
                   calloc(nt * m, sizeof(double)), calloc(nt * m, sizeof(double)), calloc(nt * votes * m, sizeof(double))};
    parallel_for(nt, threads, bf ? tally_task_bf : tally_task_f32, &c);
    for (int64_t t = 0; t < nt; t++) {
        for (int i = 0; i < m; i++) {
            kept[i] += c.kept[t * m + i];
            kept_mass[i] += c.kept_mass[t * m + i];
            squared[i] += c.squared[t * m + i];
        }
        for (int q = 0; q < npairs; q++) {
            both[q] += c.both[t * npairs + q];
            conflicts[q] += c.conflicts[t * npairs + q];
        }
        for (int k = 0; k < votes * m; k++) {
            lost[k] += c.lost[t * votes * m + k];
            lost_mass[k] += c.lost_mass[t * votes * m + k];
        }
    }
    free(c.kept), free(c.both), free(c.conflicts), free(c.lost), free(c.kept_mass), free(c.squared), free(c.lost_mass);
}

int lm_abi(void) { return LM_ABI; }

/* ------------------------------------------------------------------ module */

/* A module, so setuptools builds and installs it like any extension; fused_cpu opens it with ctypes. */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, .m_name = "_fused", .m_doc = "langmerge's fused CPU kernels (opened with ctypes)", .m_size = -1};

PyMODINIT_FUNC PyInit__fused(void) { return PyModule_Create(&module); }
