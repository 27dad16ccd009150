#include <math.h>
#include <stddef.h>
/* y[0:out] = sum over k < n of c[k] * rows[k][0:out]. Columns are split between threads. Each
   pass over a thread's slice of y adds eight rows: y is loaded and stored once per eight rows
   read instead of once per row, which is what bounded a one-row loop (measured in
   docs/bench/dynamic.md). */
static void accumulate(const float *c, const float *const *rows, long n, float *y, long out, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long b = 0; b < threads; b++) {
        long lo = out * b / threads, hi = out * (b + 1) / threads, width = hi - lo;
        float *restrict yb = y + lo;
        for (long j = 0; j < width; j++) yb[j] = 0.0f;
        long k = 0;
        for (; k + 8 <= n; k += 8) {
            const float *restrict r[8];
            for (int u = 0; u < 8; u++) r[u] = rows[k + u] + lo;
            const float *cc = c + k;
            for (long j = 0; j < width; j++)
                yb[j] += cc[0] * r[0][j] + cc[1] * r[1][j] + cc[2] * r[2][j] + cc[3] * r[3][j]
                       + cc[4] * r[4][j] + cc[5] * r[5][j] + cc[6] * r[6][j] + cc[7] * r[7][j];
        }
        for (; k < n; k++) {  /* the last rows, fewer than eight */
            const float ck = c[k];
            const float *restrict row = rows[k] + lo;
            for (long j = 0; j < width; j++) yb[j] += ck * row[j];
        }
    }
}

/* y[0:out] = sum over i with |x[i]| > t of x[i] * wt[i, 0:out]; wt is [in, out] row-major.
   Only the rows of the surviving inputs are read. */
void gather_matvec(const float *x, const float *wt, float *y, long in, long out, float t, int threads) {
    const float *rows[in > 0 ? in : 1];
    float c[in > 0 ? in : 1];
    long n = 0;
    for (long i = 0; i < in; i++)
        if (fabsf(x[i]) > t) { c[n] = x[i]; rows[n++] = wt + i * out; }
    accumulate(c, rows, n, y, out, threads);
}

/* The same plus the low-rank correction of the skipped inputs: z = sum over i with
   0 < |x[i]| <= t of x[i] * bt[i, 0:rank] (bt is [in, rank]), then y += sum over j of
   z[j] * at[j, 0:out] (at is [rank, out]). The rank rows of at join the surviving rows of wt
   in one pass over y. */
void gather_matvec_low_rank(const float *x, const float *wt, const float *bt, const float *at, float *y,
                            long in, long out, long rank, float t, int threads) {
    const float *rows[in + rank > 0 ? in + rank : 1];
    float c[in + rank > 0 ? in + rank : 1];
    float z[rank > 0 ? rank : 1];
    for (long j = 0; j < rank; j++) z[j] = 0.0f;
    long n = 0;
    for (long i = 0; i < in; i++) {
        const float xi = x[i];
        if (fabsf(xi) > t) { c[n] = xi; rows[n++] = wt + i * out; }
        else if (xi != 0.0f) {
            const float *restrict b = bt + i * rank;
            for (long j = 0; j < rank; j++) z[j] += xi * b[j];
        }
    }
    for (long j = 0; j < rank; j++) { c[n] = z[j]; rows[n++] = at + j * out; }
    accumulate(c, rows, n, y, out, threads);
}
