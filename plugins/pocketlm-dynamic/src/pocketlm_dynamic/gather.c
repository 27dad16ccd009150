#include <math.h>
#include <stddef.h>
/* y[0:out] = sum over i with |x[i]| > t of x[i] * wt[i, 0:out]; wt is [in, out] row-major.
   Only the rows of the surviving inputs are read. Columns are split between threads. Each pass
   over a thread's slice of y adds eight surviving rows: y is loaded and stored once per eight
   rows read instead of once per row, which is what bounded a one-row loop (measured in
   docs/bench/dynamic.md). */
void gather_matvec(const float *x, const float *wt, float *y, long in, long out, float t, int threads) {
    long kept[in > 0 ? in : 1];
    long n = 0;
    for (long i = 0; i < in; i++) if (fabsf(x[i]) > t) kept[n++] = i;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long b = 0; b < threads; b++) {
        long lo = out * b / threads, hi = out * (b + 1) / threads, width = hi - lo;
        float *restrict yb = y + lo;
        for (long j = 0; j < width; j++) yb[j] = 0.0f;
        long k = 0;
        for (; k + 8 <= n; k += 8) {
            const float *restrict r[8];
            float c[8];
            for (int u = 0; u < 8; u++) {
                c[u] = x[kept[k + u]];
                r[u] = wt + kept[k + u] * out + lo;
            }
            for (long j = 0; j < width; j++)
                yb[j] += c[0] * r[0][j] + c[1] * r[1][j] + c[2] * r[2][j] + c[3] * r[3][j]
                       + c[4] * r[4][j] + c[5] * r[5][j] + c[6] * r[6][j] + c[7] * r[7][j];
        }
        for (; k < n; k++) {  /* the last surviving rows, fewer than eight */
            const float xi = x[kept[k]];
            const float *restrict row = wt + kept[k] * out + lo;
            for (long j = 0; j < width; j++) yb[j] += xi * row[j];
        }
    }
}
