#include <math.h>
#include <stddef.h>
/* y[0:out] = sum over i with |x[i]| > t of x[i] * wt[i, 0:out]; wt is [in, out] row-major.
   Only the rows of the surviving inputs are read. Columns are split between threads. */
void gather_matvec(const float *x, const float *wt, float *y, long in, long out, float t, int threads) {
    long kept[in > 0 ? in : 1];
    long n = 0;
    for (long i = 0; i < in; i++) if (fabsf(x[i]) > t) kept[n++] = i;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long b = 0; b < threads; b++) {
        long lo = out * b / threads, hi = out * (b + 1) / threads;
        float *yb = y + lo;
        for (long j = 0; j < hi - lo; j++) yb[j] = 0.0f;
        for (long k = 0; k < n; k++) {
            const float xi = x[kept[k]];
            const float *row = wt + kept[k] * out + lo;
            for (long j = 0; j < hi - lo; j++) yb[j] += xi * row[j];
        }
    }
}
