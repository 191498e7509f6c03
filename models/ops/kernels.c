/* CPU kernels for the sparse products and segment reductions of sparse.py and the dense products of dense.py, built
 * and loaded by native.py (ctypes; no Python API).
 *
 * spmm:  out[r, :] = sum over the row's entries k, in storage order, of w_k * x[col[k], :], where w_k is values[k], or
 *        values[order[k]] when an order is given (a transposed product reads the forward's values in place)
 * sddmm: out[k]    = a[r_k, :] . b[col[k], :]
 *
 * With H heads, rows are H blocks of width / H (a multiple of 8) and every entry has H weights (values [nnz, H]):
 * head h of out[r] sums w_{k,h} x[col[k], block h], and sddmm gives out[k, h] = a[r_k, block h] . b[col[k], block h];
 * each head's sums are exactly those of one head alone, so H heads gather a row once instead of H times.
 *
 * segment sum / max: out[s, :] reduces src[offsets[s] .. offsets[s + 1]) row by row in order, from 0 or -inf, as
 * torch.segment_reduce does (a NaN wins the max from there on until the next NaN), vectorised over the columns.
 * segment apply: out[k, :] = src[k, :] - values[s, :] (or /) for the rows k of segment s.
 * dot scores: out[r, j] = users[r, :] . items[j, :] for full-ranking evaluation, with the maximum of every group of
 *        32 consecutive items (dot_scores, below).
 * pushed spmm: the transposed product out[c, :] = sum over column c's entries of w_k x[r_k, :], computed by walking
 *        the forward's rows (spmm_pushed, below); and a sampled product's two gradients in one such walk
 *        (sddmm_backward_pushed, below).
 *
 * The products are bound by gathering rows of x (or b) from memory, one row per stored entry. MKL's CSR product
 * and torch's sampled product wait for each row in turn; these ask for the row PREFETCH entries ahead, which is
 * most of why they run 2.5-3x faster on Tiktok-sized patterns. The sums are the ones those kernels compute, so
 * results do not change: spmm accumulates every output element over the row's entries in order, multiplying then
 * adding (no fused multiply-add: built with -ffp-contract=off), as MKL's product does; sddmm sums as torch's AVX2
 * map2_reduce_all: eight lanes over the width, then the two halves, the pairs and the neighbours of the eight
 * lanes.
 *
 * Threads (the calling one among them, all from torch's OpenMP runtime: run_threads) take rows (segments) BLOCK at a
 * time from a shared counter; torch's segment_reduce is a single-threaded scalar loop. Indices are int32 (sparse.py
 * stores them so; segment offsets int64), values and features float32, all contiguous.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PREFETCH 16   /* entries ahead: 8-32 measured within a few percent of each other, 0 about 1.8x slower */
#define BLOCK 64      /* rows a thread takes at a time: the threads move through the rows together */

/* The rows of the job, BLOCK at a time, claimed from the shared counter: on a bipartite graph both threads then read
 * the same half of the operand (users' rows read items, items' rows read users), which measured about 20 % faster
 * than one contiguous half of the rows per thread. Each row's sums do not depend on which thread computes them. */
#define FOR_EACH_ROW(job, row)                                                                             \
  for (int64_t start_ = __atomic_fetch_add((job)->next, BLOCK, __ATOMIC_RELAXED); start_ < (job)->end;  \
       start_ = __atomic_fetch_add((job)->next, BLOCK, __ATOMIC_RELAXED))                                  \
    for (int64_t row = start_, stop_ = start_ + BLOCK < (job)->end ? start_ + BLOCK : (job)->end; row < stop_; ++row)

typedef struct {
  const int32_t *rowptr, *col;
  const float *values, *a, *b; /* spmm reads values and b (= x); sddmm reads a and b */
  const int64_t *order;        /* spmm: entry k's weight is values[order[k]]; NULL: values[k] */
  float *out;
  int64_t width, nnz, end;     /* rows 0..end-1, handed out BLOCK at a time through *next */
  int64_t *next;
  int64_t heads;               /* weights per entry; each head owns width / heads contiguous columns */
  const int64_t *offsets;      /* segment reductions: int64 segment bounds (rows are segments) */
  int divide;                  /* segment_apply: divide by the segment's values instead of subtracting them */
} range_job;

static inline void prefetch_row(const float *row, int64_t cache_lines) {
  for (int64_t line = 0; line < cache_lines; ++line) _mm_prefetch((const char *)(row + 16 * line), _MM_HINT_T0);
}

/* Columns [j, j + 8 * vectors) of one output row; vectors <= 8 accumulators stay in registers. */
static inline __attribute__((always_inline)) void spmm_tile(const range_job *job, int64_t row, int64_t j,
                                                            int vectors) {
  __m256 acc[8];
  for (int v = 0; v < vectors; ++v) acc[v] = _mm256_setzero_ps();
  const int64_t width = job->width, cache_lines = (8 * vectors + 15) / 16;
  for (int64_t k = job->rowptr[row]; k < job->rowptr[row + 1]; ++k) {
    if (k + PREFETCH < job->nnz) {
      prefetch_row(job->b + (int64_t)job->col[k + PREFETCH] * width + j, cache_lines);
      if (job->order) _mm_prefetch((const char *)(job->values + job->order[k + PREFETCH] * job->heads), _MM_HINT_T0);
    }
    const float *x = job->b + (int64_t)job->col[k] * width + j;
    const int64_t entry = job->order ? job->order[k] : k;
    if (job->heads == 1) {
      const __m256 weight = _mm256_set1_ps(job->values[entry]);
      for (int v = 0; v < vectors; ++v)
        acc[v] = _mm256_add_ps(acc[v], _mm256_mul_ps(weight, _mm256_loadu_ps(x + 8 * v)));
    } else { /* vector v lies in head (j + 8 v) / head_width */
      const float *weights = job->values + entry * job->heads;
      const int64_t head_width = width / job->heads;
      for (int v = 0; v < vectors; ++v) {
        const __m256 weight = _mm256_set1_ps(weights[(j + 8 * v) / head_width]);
        acc[v] = _mm256_add_ps(acc[v], _mm256_mul_ps(weight, _mm256_loadu_ps(x + 8 * v)));
      }
    }
  }
  float *out = job->out + row * width + j;
  for (int v = 0; v < vectors; ++v) _mm256_storeu_ps(out + 8 * v, acc[v]);
}

static void *spmm_range(void *arg) {
  const range_job *job = arg;
  const int64_t width = job->width, vector_end = width / 8 * 8;
  FOR_EACH_ROW(job, row) {
    int64_t j = 0;
    for (; j + 64 <= vector_end; j += 64) spmm_tile(job, row, j, 8);
    /* a constant count per case, so that each tile's loop over its accumulators is unrolled */
    switch ((vector_end - j) / 8) {
      case 7: spmm_tile(job, row, j, 7); break;
      case 6: spmm_tile(job, row, j, 6); break;
      case 5: spmm_tile(job, row, j, 5); break;
      case 4: spmm_tile(job, row, j, 4); break;
      case 3: spmm_tile(job, row, j, 3); break;
      case 2: spmm_tile(job, row, j, 2); break;
      case 1: spmm_tile(job, row, j, 1); break;
      default: break;
    }
    for (j = vector_end; j < width; ++j) {
      float acc = 0.0f;
      for (int64_t k = job->rowptr[row]; k < job->rowptr[row + 1]; ++k) {
        const float weight = job->order ? job->values[job->order[k]] : job->values[k];
        acc = acc + weight * job->b[(int64_t)job->col[k] * width + j];
      }
      job->out[row * width + j] = acc;
    }
  }
  return 0;
}

/* a . b over width (a multiple of 8) as torch's AVX2 map2_reduce_all sums it: eight lanes over the width, then the
 * two halves, the pairs and the neighbours of the lanes; torch writes 1 * dot + 0 * 0, which turns -0 into +0. */
static inline __attribute__((always_inline)) float lane_dot(const float *a, const float *b, int64_t width) {
  __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(b));
  for (int64_t j = 8; j < width; j += 8)
    acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j)));
  acc = _mm256_add_ps(acc, _mm256_permute2f128_ps(acc, acc, 0x1));
  acc = _mm256_add_ps(acc, _mm256_shuffle_ps(acc, acc, 0x4E));
  acc = _mm256_add_ps(acc, _mm256_shuffle_ps(acc, acc, 0xB1));
  return _mm256_cvtss_f32(acc) + 0.0f;
}

/* out[v] += weight * row[8v .. 8v + 8) for v < vectors <= 8, multiplying then adding (spmm's sum). */
static inline __attribute__((always_inline)) void add_weighted_row(__m256 *out, float weight, const float *row,
                                                                   int64_t vectors) {
  const __m256 w = _mm256_set1_ps(weight);
  for (int64_t v = 0; v < vectors; ++v) out[v] = _mm256_add_ps(out[v], _mm256_mul_ps(w, _mm256_loadu_ps(row + 8 * v)));
}

/* Each head's width is a positive multiple of 8 (native.py checks it: torch reduces other widths differently). */
static void *sddmm_range(void *arg) {
  const range_job *job = arg;
  const int64_t width = job->width, cache_lines = (width + 15) / 16, heads = job->heads, head_width = width / heads;
  FOR_EACH_ROW(job, row) {
    for (int64_t k = job->rowptr[row]; k < job->rowptr[row + 1]; ++k) {
      if (k + PREFETCH < job->nnz) prefetch_row(job->b + (int64_t)job->col[k + PREFETCH] * width, cache_lines);
      for (int64_t head = 0; head < heads; ++head)
        job->out[k * heads + head] = lane_dot(job->a + row * width + head * head_width,
                                              job->b + (int64_t)job->col[k] * width + head * head_width, head_width);
    }
  }
  return 0;
}

/* One segment's columns [j, j + 8): sum (max = 0) or max (max = 1), row after row. */
static inline __attribute__((always_inline)) __m256 segment_vector(const range_job *job, int64_t begin, int64_t end,
                                                                   int64_t j, int max) {
  const int64_t width = job->width;
  __m256 acc = max ? _mm256_set1_ps(-__builtin_inff()) : _mm256_setzero_ps();
  for (int64_t k = begin; k < end; ++k) {
    const __m256 value = _mm256_loadu_ps(job->a + k * width + j);
    if (max) { /* value if it is NaN or above acc, else acc: std::max(acc, value) with torch's NaN rule */
      const __m256 above = _mm256_cmp_ps(acc, value, _CMP_LT_OQ), nan = _mm256_cmp_ps(value, value, _CMP_UNORD_Q);
      acc = _mm256_blendv_ps(acc, value, _mm256_or_ps(above, nan));
    } else {
      acc = _mm256_add_ps(acc, value);
    }
  }
  return acc;
}

static void *segment_range(void *arg, int max) {
  const range_job *job = arg;
  const int64_t width = job->width, vector_end = width / 8 * 8;
  FOR_EACH_ROW(job, segment) {
    const int64_t begin = job->offsets[segment], end = job->offsets[segment + 1];
    float *out = job->out + segment * width;
    for (int64_t j = 0; j < vector_end; j += 8) _mm256_storeu_ps(out + j, segment_vector(job, begin, end, j, max));
    for (int64_t j = vector_end; j < width; ++j) {
      float acc = max ? -__builtin_inff() : 0.0f;
      for (int64_t k = begin; k < end; ++k) {
        const float value = job->a[k * width + j];
        if (max) acc = (value != value) ? value : (acc < value ? value : acc);
        else acc = acc + value;
      }
      out[j] = acc;
    }
  }
  return 0;
}

/* out[k, :] = src[k, :] - values[s, :] (or / values[s, :]) for the entries k of segment s: torch's elementwise
 * subtraction (division) of the values repeated over each segment, without writing the repeated copy. out may be
 * src. */
static void *segment_apply_range(void *arg) {
  const range_job *job = arg;
  const int64_t width = job->width;
  FOR_EACH_ROW(job, segment) {
    const float *values = job->b + segment * width;
    const int64_t begin = job->offsets[segment] * width, end = job->offsets[segment + 1] * width;
    if (width == 1) { /* one value for the whole segment: a loop the compiler vectorises */
      const float value = values[0];
      if (job->divide)
        for (int64_t k = begin; k < end; ++k) job->out[k] = job->a[k] / value;
      else
        for (int64_t k = begin; k < end; ++k) job->out[k] = job->a[k] - value;
    } else {
      for (int64_t k = begin; k < end; k += width)
        for (int64_t j = 0; j < width; ++j)
          job->out[k + j] = job->divide ? job->a[k + j] / values[j] : job->a[k + j] - values[j];
    }
  }
  return 0;
}

static void *segment_sum_range(void *arg) { return segment_range(arg, 0); }
static void *segment_max_range(void *arg) { return segment_range(arg, 1); }

/* Run kernel(job) on `threads` threads of the OpenMP runtime that torch's own operators use (the library is linked
 * with -fopenmp and loaded after torch, so the dynamic loader binds it to torch's libgomp): its worker threads keep
 * spinning for a while after each torch operator, and threads of our own would compete with them for the cores. */
static void run_threads(void *(*kernel)(void *), void *job, int threads) {
  if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads)
  kernel(job);
}

/* No more threads than blocks of BLOCK rows. */
static int row_threads(int64_t rows, int threads) {
  return threads > (rows + BLOCK - 1) / BLOCK ? (int)((rows + BLOCK - 1) / BLOCK) : threads;
}

static void run_ranges(void *(*kernel)(void *), range_job whole, int64_t rows, int threads) {
  threads = row_threads(rows, threads);
  int64_t next = 0;
  whole.end = rows;
  whole.next = &next;
  run_threads(kernel, &whole, threads);
}

void grcn_bench_spmm_f32(const int32_t *rowptr, const int32_t *col, const float *values, const int64_t *order,
                         const float *x, float *out, int64_t rows, int64_t width, int64_t heads, int threads) {
  range_job whole = {.rowptr = rowptr, .col = col, .values = values, .b = x, .order = order, .out = out,
                     .width = width, .nnz = rowptr[rows], .heads = heads};
  run_ranges(spmm_range, whole, rows, threads);
}

/* transposed spmm, pushed: out[m] = A^T (values[m] on the pattern) x[m] for each channel m, out[m, c, :] = sum over
 * the entries k in column c of values[m, k] * x[m, r_k, :]. The pull (spmm over the transpose's pattern, reading
 * values through the order) waits on two scattered reads per entry, a row of x and its weight; this pass walks the
 * forward's rows in order and adds each entry's term into its column's output row, one scattered read-modify-write
 * per entry, with the weights read in order. Each column's terms arrive in the order of their rows, the order in
 * which the transpose lists them (sparse.py's patterns keep it: CSRPattern), and each addition is the pull's
 * acc + w * x from +0, so the sums are the pull's, bit for bit. A channel's columns belong to the thread that took
 * the channel, so no two threads write one row: channels are handed out one at a time. */
typedef struct {
  const int32_t *rowptr, *col;
  const float *values, *x;
  float *out;
  int64_t rows, cols, nnz, width, channels;
  int64_t *next;
  const float *gathered;  /* sampled_backward: the right operand b, whose rows the row-local gradient gathers */
  float *row_local;       /* and that gradient (grad_a) */
} push_job;

static void push_channel(const push_job *job, int64_t m) {
  const int64_t width = job->width, vector_end = width / 8 * 8, cache_lines = (width + 15) / 16, nnz = job->nnz;
  const float *values = job->values + m * nnz, *x = job->x + m * job->rows * width;
  float *out = job->out + m * job->cols * width;
  memset(out, 0, (size_t)(job->cols * width) * sizeof(float));
  for (int64_t r = 0; r < job->rows; ++r) {
    const float *term = x + r * width;
    for (int64_t k = job->rowptr[r]; k < job->rowptr[r + 1]; ++k) {
      if (k + PREFETCH < nnz) prefetch_row(out + (int64_t)job->col[k + PREFETCH] * width, cache_lines);
      float *o = out + (int64_t)job->col[k] * width;
      const float weight = values[k];
      const __m256 w = _mm256_set1_ps(weight);
      for (int64_t j = 0; j < vector_end; j += 8)
        _mm256_storeu_ps(o + j, _mm256_add_ps(_mm256_loadu_ps(o + j), _mm256_mul_ps(w, _mm256_loadu_ps(term + j))));
      for (int64_t j = vector_end; j < width; ++j) o[j] = o[j] + weight * term[j];
    }
  }
}

/* The channels of the job, one at a time, claimed from the shared counter: a thread writes whole channels. */
#define FOR_EACH_CHANNEL(job, m)                                                                     \
  for (int64_t m = __atomic_fetch_add((job)->next, 1, __ATOMIC_RELAXED); m < (job)->channels;       \
       m = __atomic_fetch_add((job)->next, 1, __ATOMIC_RELAXED))

static void *push_range(void *arg) {
  const push_job *job = arg;
  FOR_EACH_CHANNEL(job, m) push_channel(job, m);
  return 0;
}

void grcn_bench_spmm_pushed_f32(const int32_t *rowptr, const int32_t *col, const float *values, const float *x,
                                float *out, int64_t rows, int64_t cols, int64_t width, int64_t channels,
                                int threads) {
  int64_t next = 0;
  push_job job = {.rowptr = rowptr, .col = col, .values = values, .x = x, .out = out, .rows = rows, .cols = cols,
                  .nnz = rowptr[rows], .width = width, .channels = channels, .next = &next};
  run_threads(push_range, &job, threads < channels ? threads : (int)channels);
}

/* A sampled product's backward pass over narrow channels (width 8 or 16) in one walk over the forward's rows. For
 * z[m, k] = a[m, r_k] . b[m, col_k] with gradient g [M, nnz], channel m:
 *   grad_a[r] = sum over the row's k of g_k b[col_k]     (spmm's sum, from +0 in the row's order)
 *   grad_b[c] = sum over the column's k of g_k a[r_k]    (pushed, as above)
 * An entry's rows of b and of grad_b are fetched together, and a[r] is read once for the row. The same sums as the
 * product and the pushed transposed product that it replaces. (The product's backward, a sampled product and a pushed
 * one, is slower walked together than apart, so it is not done this way.) */
static void sampled_backward_channel(const push_job *job, int64_t m) {
  const int64_t width = job->width, vectors = width / 8, nnz = job->nnz;
  const float *grad = job->values + m * nnz, *a = job->x + m * job->rows * width;
  const float *b = job->gathered + m * job->cols * width;
  float *grad_a = job->row_local + m * job->rows * width, *grad_b = job->out + m * job->cols * width;
  memset(grad_b, 0, (size_t)(job->cols * width) * sizeof(float));
  for (int64_t r = 0; r < job->rows; ++r) {
    const float *a_row = a + r * width;
    __m256 sum[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t k = job->rowptr[r]; k < job->rowptr[r + 1]; ++k) {
      if (k + PREFETCH < nnz) {
        const int64_t ahead = (int64_t)job->col[k + PREFETCH] * width;
        prefetch_row(b + ahead, 1);
        prefetch_row(grad_b + ahead, 1);
      }
      const int64_t c = (int64_t)job->col[k] * width;
      add_weighted_row(sum, grad[k], b + c, vectors);
      const __m256 w = _mm256_set1_ps(grad[k]);
      for (int64_t v = 0; v < vectors; ++v)
        _mm256_storeu_ps(grad_b + c + 8 * v, _mm256_add_ps(_mm256_loadu_ps(grad_b + c + 8 * v),
                                                           _mm256_mul_ps(w, _mm256_loadu_ps(a_row + 8 * v))));
    }
    for (int64_t v = 0; v < vectors; ++v) _mm256_storeu_ps(grad_a + r * width + 8 * v, sum[v]);
  }
}

static void *sampled_backward_range(void *arg) {
  const push_job *job = arg;
  FOR_EACH_CHANNEL(job, m) sampled_backward_channel(job, m);
  return 0;
}

void grcn_bench_sddmm_backward_pushed_f32(const int32_t *rowptr, const int32_t *col, const float *grad,
                                          const float *a, const float *b, float *grad_a, float *grad_b, int64_t rows,
                                          int64_t cols, int64_t width, int64_t channels, int threads) {
  int64_t next = 0;
  push_job job = {.rowptr = rowptr, .col = col, .values = grad, .x = a, .out = grad_b, .rows = rows, .cols = cols,
                  .nnz = rowptr[rows], .width = width, .channels = channels, .next = &next, .gathered = b,
                  .row_local = grad_a};
  run_threads(sampled_backward_range, &job, threads < channels ? threads : (int)channels);
}

void grcn_bench_sddmm_f32(const int32_t *rowptr, const int32_t *col, const float *a, const float *b, float *out,
                          int64_t rows, int64_t width, int64_t heads, int threads) {
  range_job whole = {.rowptr = rowptr, .col = col, .a = a, .b = b, .out = out, .width = width, .nnz = rowptr[rows],
                     .heads = heads};
  run_ranges(sddmm_range, whole, rows, threads);
}

void grcn_bench_segment_f32(const int64_t *offsets, const float *src, float *out, int64_t segments, int64_t width,
                            int max, int threads) {
  range_job whole = {.a = src, .out = out, .width = width, .nnz = offsets[segments], .heads = 1, .offsets = offsets};
  run_ranges(max ? segment_max_range : segment_sum_range, whole, segments, threads);
}

/* gemm: out[i, j] = sum_k a[i, k] b[k, j] for the layers' linear maps: one fused multiply-add chain over k from 0,
 * then + bias[j] (bias given) or added to out[i, j] (accumulate), rounded once more either way. That is MKL's sum on
 * the shapes native.py sends here (depth <= 192; it compares the two on this machine before it uses this one).
 * Tiles of 6 x 16 outputs stay in 12 accumulators: 2 loads of b and 6 broadcasts of a per 12 multiply-adds, about
 * 1.3-1.4x MKL's rate on [112741, 64] x [64, 64] on the 2-core AMD EPYC machines this project is measured on. */
#define TILE_ROWS 6

typedef struct {
  const float *a, *b, *bias; /* a: rows x depth (row stride lda); b: depth x width, contiguous; bias: width or NULL */
  float *out;                /* rows x width, contiguous */
  int64_t lda, depth, rows, width, share;
  int accumulate;
  int64_t *next; /* the next row to hand out, share rows at a time */
} gemm_job;

/* out[r, 0:16] (+)= sum over k < depth of a[r, k] b[k, 0:16] for r < rows <= 6, a's rows lda apart, b's ldb, out's
 * ldo; rows past `rows` read row 0 instead. Then + bias[0:16] (bias given) or added to out (accumulate). */
__attribute__((target("avx2,fma"))) static void gemm_tile(const float *a, int64_t lda, const float *b, int64_t ldb,
                                                         int64_t depth, float *out, int64_t ldo, int rows,
                                                         const float *bias, int accumulate) {
  const float *a0 = a, *a1 = a + (rows > 1) * lda, *a2 = a + (rows > 2) * 2 * lda, *a3 = a + (rows > 3) * 3 * lda,
              *a4 = a + (rows > 4) * 4 * lda, *a5 = a + (rows > 5) * 5 * lda;
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
         c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t k = 0; k < depth; ++k) {
    const __m256 b0 = _mm256_loadu_ps(b + k * ldb), b1 = _mm256_loadu_ps(b + k * ldb + 8);
    __m256 s = _mm256_broadcast_ss(a0 + k);
    c00 = _mm256_fmadd_ps(s, b0, c00), c01 = _mm256_fmadd_ps(s, b1, c01);
    s = _mm256_broadcast_ss(a1 + k), c10 = _mm256_fmadd_ps(s, b0, c10), c11 = _mm256_fmadd_ps(s, b1, c11);
    s = _mm256_broadcast_ss(a2 + k), c20 = _mm256_fmadd_ps(s, b0, c20), c21 = _mm256_fmadd_ps(s, b1, c21);
    s = _mm256_broadcast_ss(a3 + k), c30 = _mm256_fmadd_ps(s, b0, c30), c31 = _mm256_fmadd_ps(s, b1, c31);
    s = _mm256_broadcast_ss(a4 + k), c40 = _mm256_fmadd_ps(s, b0, c40), c41 = _mm256_fmadd_ps(s, b1, c41);
    s = _mm256_broadcast_ss(a5 + k), c50 = _mm256_fmadd_ps(s, b0, c50), c51 = _mm256_fmadd_ps(s, b1, c51);
  }
  const __m256 acc[12] = {c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51};
  for (int r = 0; r < rows; ++r)
    for (int h = 0; h < 2; ++h) {
      __m256 value = acc[2 * r + h];
      if (bias) value = _mm256_add_ps(value, _mm256_loadu_ps(bias + 8 * h));
      else if (accumulate) value = _mm256_add_ps(_mm256_loadu_ps(out + r * ldo + 8 * h), value);
      _mm256_storeu_ps(out + r * ldo + 8 * h, value);
    }
}

static void *gemm_range(void *arg) {
  const gemm_job *job = arg;
  const int64_t width = job->width;
  for (int64_t start = __atomic_fetch_add(job->next, job->share, __ATOMIC_RELAXED); start < job->rows;
       start = __atomic_fetch_add(job->next, job->share, __ATOMIC_RELAXED)) {
    const int64_t stop = start + job->share < job->rows ? start + job->share : job->rows;
    for (int64_t row = start; row < stop; row += TILE_ROWS)
      for (int64_t j = 0; j < width; j += 16)
        gemm_tile(job->a + row * job->lda, job->lda, job->b + j, width, job->depth, job->out + row * width + j, width,
                  stop - row < TILE_ROWS ? (int)(stop - row) : TILE_ROWS, job->bias ? job->bias + j : 0,
                  job->accumulate);
  }
  return 0;
}

/* out [rows, width] = a [rows, depth] (row stride lda) x b [depth, width] (+ bias, or accumulated into out); width a
 * multiple of 16. Each thread takes one contiguous share of the rows (measured faster here than blocks from a
 * shared counter: the operand is read once, in order). */
void grcn_bench_gemm_f32(const float *a, int64_t lda, const float *b, const float *bias, float *out, int64_t rows,
                         int64_t depth, int64_t width, int accumulate, int threads) {
  if (threads < 1) threads = 1;
  int64_t next = 0;
  const int64_t per_thread = (rows + threads - 1) / threads;
  gemm_job whole = {.a = a, .b = b, .bias = bias, .out = out, .lda = lda, .depth = depth, .rows = rows,
                    .width = width, .share = (per_thread + TILE_ROWS - 1) / TILE_ROWS * TILE_ROWS,
                    .accumulate = accumulate, .next = &next};
  run_threads(gemm_range, &whole, threads);
}

/* gemm_tn: out[m, j] = sum_k g[k, m] x[k, j] over the depth in blocks of TN_BLOCK rows: each block's sum is one fused
 * multiply-add chain from 0 (gemm's tiles, on the block packed k-contiguous), and out is the first block's sum plus
 * the others' in order, which is how MKL sums a layer's weight gradient x^T grad on the shapes native.py sends here
 * (it checks that first). The threads take blocks from a shared counter, each block's sums going to its own slice
 * of partial, then add the slices up, each thread a share of the outputs. */
#define TN_BLOCK 192

typedef struct {
  const float *g, *x;
  float *partial, *out;
  const int64_t *offsets; /* block b is rows offsets[b]..offsets[b+1] (each at most TN_BLOCK), or NULL: TN_BLOCK each */
  int64_t depth, rows, width, blocks;
  int64_t *next;
} tn_job;

static void *gemm_tn_blocks(void *arg) {
  const tn_job *job = arg;
  const int64_t rows = job->rows, width = job->width;
  /* the block of g transposed ([rows, TN_BLOCK]) and that of x in 16-column panels ([TN_BLOCK, 16] each), so that
   * gemm_tile reads both along k */
  float *packed_g = malloc((size_t)((rows + width) * TN_BLOCK) * sizeof(float));
  if (!packed_g) return (void *)1;
  float *packed_x = packed_g + rows * TN_BLOCK;
  for (int64_t block = __atomic_fetch_add(job->next, 1, __ATOMIC_RELAXED); block < job->blocks;
       block = __atomic_fetch_add(job->next, 1, __ATOMIC_RELAXED)) {
    const int64_t start = job->offsets ? job->offsets[block] : block * TN_BLOCK;
    const int64_t depth = job->offsets                      ? job->offsets[block + 1] - start
                          : job->depth - start < TN_BLOCK ? job->depth - start
                                                          : TN_BLOCK; /* an empty block's sums are +0 */
    for (int64_t k = 0; k < depth; ++k) {
      const float *g_row = job->g + (start + k) * rows, *x_row = job->x + (start + k) * width;
      for (int64_t m = 0; m < rows; ++m) packed_g[m * TN_BLOCK + k] = g_row[m];
      for (int64_t j = 0; j < width; j += 8)
        _mm256_storeu_ps(packed_x + (j - j % 16) * TN_BLOCK + k * 16 + j % 16, _mm256_loadu_ps(x_row + j));
    }
    float *partial = job->partial + block * rows * width;
    for (int64_t j = 0; j < width; j += 16)
      for (int64_t m = 0; m < rows; m += TILE_ROWS)
        gemm_tile(packed_g + m * TN_BLOCK, TN_BLOCK, packed_x + j * TN_BLOCK, 16, depth, partial + m * width + j, width,
                  rows - m < TILE_ROWS ? (int)(rows - m) : TILE_ROWS, 0, 0);
  }
  free(packed_g);
  return 0;
}

/* out[e] = partial[0][e] + partial[1][e] + ... in block order, each thread a share of the outputs' 64-float chunks. */
static void *gemm_tn_sum(void *arg) {
  const tn_job *job = arg;
  const int64_t size = job->rows * job->width, chunks = size / 64;
  for (int64_t chunk = __atomic_fetch_add(job->next, 1, __ATOMIC_RELAXED); chunk < chunks;
       chunk = __atomic_fetch_add(job->next, 1, __ATOMIC_RELAXED)) {
    __m256 acc[8];
    const float *partial = job->partial + chunk * 64;
    for (int v = 0; v < 8; ++v) acc[v] = _mm256_loadu_ps(partial + 8 * v);
    for (int64_t block = 1; block < job->blocks; ++block)
      for (int v = 0; v < 8; ++v) acc[v] = _mm256_add_ps(acc[v], _mm256_loadu_ps(partial + block * size + 8 * v));
    for (int v = 0; v < 8; ++v) _mm256_storeu_ps(job->out + chunk * 64 + 8 * v, acc[v]);
  }
  return 0;
}

/* out [rows, width] = g^T x for g [depth, rows] and x [depth, width], both contiguous; rows and width multiples of 16.
 * Blocks of TN_BLOCK rows, or (offsets given) the `blocks` blocks offsets[b]..offsets[b+1]: the rows of a larger
 * product that its other rows add exact zeros to, blocked as that product's are. partial holds blocks * rows * width
 * floats. Returns 0, or 1 when scratch memory ran out. */
int grcn_bench_gemm_tn_f32(const float *g, const float *x, const int64_t *offsets, int64_t blocks, float *partial,
                           float *out, int64_t depth, int64_t rows, int64_t width, int threads) {
  int64_t next = 0;
  tn_job job = {.g = g, .x = x, .partial = partial, .out = out, .offsets = offsets, .depth = depth, .rows = rows,
                .width = width, .blocks = offsets ? blocks : (depth + TN_BLOCK - 1) / TN_BLOCK, .next = &next};
  int failed = 0;
  if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  failed |= gemm_tn_blocks(&job) != 0;
  if (failed) return 1;
  next = 0;
  run_threads(gemm_tn_sum, &job, threads);
  return 0;
}

/* out [n, width] = src [n, width] - (or /) values [segments, width] repeated over each segment's rows of src. */
void grcn_bench_segment_apply_f32(const int64_t *offsets, const float *src, const float *values, float *out,
                                  int64_t segments, int64_t width, int divide, int threads) {
  range_job whole = {.a = src, .b = values, .out = out, .width = width, .nnz = offsets[segments], .heads = 1,
                     .offsets = offsets, .divide = divide};
  run_ranges(segment_apply_range, whole, segments, threads);
}

/* dot scores: out[r, j] = users[r, :] . items[j, :] for every item j, summed as torch.mm sums user @ item.T on the
 * machines this project is measured on (native.py checks that before it uses this): the depth in chains of `chain`
 * (the whole depth up to 192, two halves up to 383, blocks of 192 from there), each a fused multiply-add chain from
 * 0, the chains added in order. Each score is summed on its own, so a user's scores do not depend on the other users
 * of its batch (numpy's BLAS gave some the same user's scores different last bits in batches of different sizes).
 *
 * items are packed once per evaluation as [panels, depth, 16] (pack_score_items in scores.py: item j is column j % 16
 * of panel j / 16; panels is even, the padding items zero), so a 6 x 16 tile reads its items along k like gemm_tile.
 * Threads take SCORE_CHUNK panels at a time (256 KB of items at depth 64) and score every user against them; the
 * scores go to out [rows, ldo] (ldo >= panels * 16: the padding items' scores land in the columns past the
 * catalogue) with streaming stores when out is 32-byte aligned, since the scores are not read back in full (only the
 * ranking's candidates and the masked items are). group_max[r, g] is the maximum of out[r, 32g .. 32g + 32) for
 * g < groups (NaN when one of them is NaN, as torch.amax), the first pass of the evaluator's grouped top-k, computed
 * here while the scores are still in registers: that pass read the whole score block back from memory. */
#define SCORE_CHUNK 64

typedef struct {
  const float *users, *items;
  float *out, *group_max;
  int64_t ldu, ldo, rows, depth, chain, panels, groups;
  int stream;
  int64_t *next;
} score_job;

/* The 6 x 16 tile of rows <= 6 users (ldu apart; rows past `rows` read row 0) and one packed panel: the chains over
 * the depth added in order into acc, then stored; rowmax[r] and rownan[r] are lane-wise max and unordered of the
 * row's two halves, for the group maxima. */
__attribute__((target("avx2,fma"))) static inline void score_tile(const score_job *job, const float *user,
                                                                  const float *panel, float *out, int rows,
                                                                  __m256 rowmax[TILE_ROWS], __m256 rownan[TILE_ROWS]) {
  const int64_t ldu = job->ldu, depth = job->depth, ldo = job->ldo;
  __m256 acc[2 * TILE_ROWS];
  for (int64_t start = 0; start < depth; start += job->chain) {
    const int64_t stop = start + job->chain < depth ? start + job->chain : depth;
    const float *a0 = user, *a1 = user + (rows > 1) * ldu, *a2 = user + (rows > 2) * 2 * ldu,
                *a3 = user + (rows > 3) * 3 * ldu, *a4 = user + (rows > 4) * 4 * ldu, *a5 = user + (rows > 5) * 5 * ldu;
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
           c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (int64_t k = start; k < stop; ++k) {
      const __m256 b0 = _mm256_load_ps(panel + 16 * k), b1 = _mm256_load_ps(panel + 16 * k + 8);
      __m256 s = _mm256_broadcast_ss(a0 + k);
      c00 = _mm256_fmadd_ps(s, b0, c00), c01 = _mm256_fmadd_ps(s, b1, c01);
      s = _mm256_broadcast_ss(a1 + k), c10 = _mm256_fmadd_ps(s, b0, c10), c11 = _mm256_fmadd_ps(s, b1, c11);
      s = _mm256_broadcast_ss(a2 + k), c20 = _mm256_fmadd_ps(s, b0, c20), c21 = _mm256_fmadd_ps(s, b1, c21);
      s = _mm256_broadcast_ss(a3 + k), c30 = _mm256_fmadd_ps(s, b0, c30), c31 = _mm256_fmadd_ps(s, b1, c31);
      s = _mm256_broadcast_ss(a4 + k), c40 = _mm256_fmadd_ps(s, b0, c40), c41 = _mm256_fmadd_ps(s, b1, c41);
      s = _mm256_broadcast_ss(a5 + k), c50 = _mm256_fmadd_ps(s, b0, c50), c51 = _mm256_fmadd_ps(s, b1, c51);
    }
    const __m256 chain[2 * TILE_ROWS] = {c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51};
    for (int v = 0; v < 2 * TILE_ROWS; ++v) acc[v] = start ? _mm256_add_ps(acc[v], chain[v]) : chain[v];
  }
  for (int r = 0; r < rows; ++r) {
    if (job->stream) {
      _mm256_stream_ps(out + r * ldo, acc[2 * r]);
      _mm256_stream_ps(out + r * ldo + 8, acc[2 * r + 1]);
    } else {
      _mm256_storeu_ps(out + r * ldo, acc[2 * r]);
      _mm256_storeu_ps(out + r * ldo + 8, acc[2 * r + 1]);
    }
    rowmax[r] = _mm256_max_ps(acc[2 * r], acc[2 * r + 1]);
    rownan[r] = _mm256_cmp_ps(acc[2 * r], acc[2 * r + 1], _CMP_UNORD_Q);
  }
}

__attribute__((target("avx2,fma"))) static void *score_range(void *arg) {
  const score_job *job = arg;
  __m256 max0[TILE_ROWS], nan0[TILE_ROWS], max1[TILE_ROWS], nan1[TILE_ROWS];
  for (int64_t start = __atomic_fetch_add(job->next, SCORE_CHUNK, __ATOMIC_RELAXED); start < job->panels;
       start = __atomic_fetch_add(job->next, SCORE_CHUNK, __ATOMIC_RELAXED)) {
    const int64_t stop = start + SCORE_CHUNK < job->panels ? start + SCORE_CHUNK : job->panels;
    for (int64_t row = 0; row < job->rows; row += TILE_ROWS) {
      const int rows = job->rows - row < TILE_ROWS ? (int)(job->rows - row) : TILE_ROWS;
      const float *user = job->users + row * job->ldu;
      float *out = job->out + row * job->ldo;
      for (int64_t panel = start; panel < stop; panel += 2) { /* panels and SCORE_CHUNK are even: a group each */
        score_tile(job, user, job->items + panel * 16 * job->depth, out + panel * 16, rows, max0, nan0);
        score_tile(job, user, job->items + (panel + 1) * 16 * job->depth, out + (panel + 1) * 16, rows, max1, nan1);
        const int64_t group = panel / 2;
        if (group >= job->groups) continue;
        for (int r = 0; r < rows; ++r) {
          const __m256 lanes = _mm256_max_ps(max0[r], max1[r]);
          const __m256 nan = _mm256_or_ps(_mm256_or_ps(nan0[r], nan1[r]), _mm256_cmp_ps(max0[r], max1[r], _CMP_UNORD_Q));
          __m128 half = _mm_max_ps(_mm256_castps256_ps128(lanes), _mm256_extractf128_ps(lanes, 1));
          half = _mm_max_ps(half, _mm_movehl_ps(half, half));
          half = _mm_max_ss(half, _mm_shuffle_ps(half, half, 1));
          job->group_max[(row + r) * job->groups + group] = _mm256_movemask_ps(nan) ? NAN : _mm_cvtss_f32(half);
        }
      }
    }
  }
  return 0;
}

/* out [rows, ldo] and group_max [rows, groups] for users [rows, depth] (rows ldu apart) and the items packed as
 * [panels, depth, 16] (panels even, 32-byte aligned); chain: the length of each summed chain (see above). */
void grcn_bench_dot_scores_f32(const float *users, int64_t ldu, const float *items, float *out, int64_t ldo,
                               float *group_max, int64_t rows, int64_t depth, int64_t chain, int64_t panels,
                               int64_t groups, int threads) {
  int64_t next = 0;
  score_job job = {.users = users, .items = items, .out = out, .group_max = group_max, .ldu = ldu, .ldo = ldo,
                   .rows = rows, .depth = depth, .chain = chain, .panels = panels, .groups = groups,
                   .stream = ((uintptr_t)out % 32 == 0 && ldo % 8 == 0), .next = &next};
  run_threads(score_range, &job, threads);
  if (job.stream) _mm_sfence(); /* the streamed scores are visible to whoever reads them next */
}
