// softmax(q k^T / sqrt(D) + bias) v for many heads of a small dimension, on a CPU, at inference.
//
// Why: the Nucleic Transformer's attention has 32 heads of dimension 8 (paper config) and a full
// (B, H, L, L) additive bias. torch's kernels treat each head as a tiny matrix product and spend most
// of an inference pass there. Here one query row is computed for all heads at once, with the heads as
// the vector lanes:
//   qkv: (B, L, 3, H, D), the qkv projection's output as it comes;
//   bias: (B, L, L, H), the channels_last memory of the pair path's output, read in place;
//   out: (B, L, H, D), as the output projection reads it; all three float32 or all bfloat16.
// Each thread copies the keys and values of the sequence it works on into heads-last float32 buffers,
// (L, D, H); the scores of one row (L x H floats) stay in cache and nothing of size L x L is written.
// Plain loops over H that the compiler vectorizes (-O3 -march=native); all arithmetic in float32.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

namespace {

constexpr int64_t kMaxHeads = 256, kMaxWidth = 4096;  // heads, heads x dimension (cpu_attention.py checks)

inline float to_float(float x) { return x; }
inline float to_float(uint16_t bf16) {
    uint32_t bits = uint32_t(bf16) << 16;
    float x;
    std::memcpy(&x, &bits, sizeof x);
    return x;
}
inline void store(float* out, float x) { *out = x; }
inline void store(uint16_t* out, float x) {  // round to nearest even, as torch does
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    *out = uint16_t((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// exp(x) for x <= 0 to about 2 ulp: 2^n * 2^f, n = round(x / ln 2), |f| <= 1/2, a degree-6 polynomial for
// 2^f. Branch-free, so the loops around it vectorize without -ffast-math.
inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float t = x * 1.44269504088896341f;
    const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23)
    const float f = t - n;
    float p = 1.5403530393381606e-4f;
    p = p * f + 1.3333558146428443e-3f;
    p = p * f + 9.6181291076284772e-3f;
    p = p * f + 5.5504108664821580e-2f;
    p = p * f + 2.4022650695910071e-1f;
    p = p * f + 6.9314718055994531e-1f;
    p = p * f + 1.0f;
    const int32_t bits = (int32_t(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

// Rows first_row..last_row of the B * L query rows. kH, kD: the head count and dimension as compile-time
// constants (0: take the arguments); with them the loops over heads unroll into a few vector
// instructions each, while as runtime counts every tiny loop pays its own set-up (several times slower).
template <typename T, int kH, int kD>
void attend_rows(const T* __restrict qkv, const T* __restrict bias, T* __restrict out, int64_t L, int64_t D,
                 int64_t H, float scale, int64_t first_row, int64_t last_row) {
    if (kH) H = kH;
    if (kD) D = kD;
    const int64_t width = H * D, token = 3 * width;  // one position's q, k, v in qkv
    // Per-row state in local arrays, which the compiler knows alias nothing (it would reload heap
    // buffers after every store to the scores).
    float query[kMaxWidth], context[kMaxWidth], row_max[kMaxHeads], denominator[kMaxHeads], s[kMaxHeads];
    std::vector<float> scores(L * H), keys(L * width), values(L * width);
    int64_t loaded = -1;  // the sequence whose keys and values are in the buffers
    for (int64_t row = first_row; row < last_row; ++row) {
        const int64_t b = row / L;
        if (b != loaded) {
            for (int64_t j = 0; j < L; ++j) {
                const T* k_j = qkv + (b * L + j) * token + width;
                for (int64_t h = 0; h < H; ++h)
                    for (int64_t d = 0; d < D; ++d) {
                        keys[(j * D + d) * H + h] = to_float(k_j[h * D + d]);
                        values[(j * D + d) * H + h] = to_float(k_j[width + h * D + d]);
                    }
            }
            loaded = b;
        }
        const T* q_row = qkv + row * token;
        for (int64_t h = 0; h < H; ++h)
            for (int64_t d = 0; d < D; ++d) query[d * H + h] = to_float(q_row[h * D + d]) * scale;
        for (int64_t h = 0; h < H; ++h) row_max[h] = -3.0e38f;
        for (int64_t j = 0; j < L; ++j) {
            const T* bias_j = bias + (row * L + j) * H;
            const float* k_j = keys.data() + j * width;
            for (int64_t h = 0; h < H; ++h) s[h] = to_float(bias_j[h]);
            for (int64_t d = 0; d < D; ++d)
                for (int64_t h = 0; h < H; ++h) s[h] += query[d * H + h] * k_j[d * H + h];
            for (int64_t h = 0; h < H; ++h) {
                row_max[h] = std::max(row_max[h], s[h]);
                scores[j * H + h] = s[h];
            }
        }
        for (int64_t h = 0; h < H; ++h) denominator[h] = 0.0f;
        for (int64_t i = 0; i < width; ++i) context[i] = 0.0f;
        for (int64_t j = 0; j < L; ++j) {
            const float* v_j = values.data() + j * width;
            for (int64_t h = 0; h < H; ++h) {
                s[h] = exp_nonpositive(scores[j * H + h] - row_max[h]);
                denominator[h] += s[h];
            }
            for (int64_t d = 0; d < D; ++d)
                for (int64_t h = 0; h < H; ++h) context[d * H + h] += s[h] * v_j[d * H + h];
        }
        T* out_row = out + row * width;
        for (int64_t h = 0; h < H; ++h) {
            const float inverse = 1.0f / denominator[h];
            for (int64_t d = 0; d < D; ++d) store(out_row + h * D + d, context[d * H + h] * inverse);
        }
    }
}

template <typename T>
using RowKernel = void (*)(const T*, const T*, T*, int64_t, int64_t, int64_t, float, int64_t, int64_t);

// The attention shapes of this project's models (heads x dimension: paper config 32 x 8, and 16 x 16,
// 16 x 8) get their own unrolled kernel; any other shape the generic one.
template <typename T>
RowKernel<T> row_kernel(int64_t H, int64_t D) {
    if (H == 32 && D == 8) return attend_rows<T, 32, 8>;
    if (H == 16 && D == 16) return attend_rows<T, 16, 16>;
    if (H == 16 && D == 8) return attend_rows<T, 16, 8>;
    return attend_rows<T, 0, 0>;
}

// Rows split evenly over an OpenMP team. Loaded after torch, this library shares torch's OpenMP runtime
// (the same libgomp.so.1), so the team is torch's own threads, not a second set spinning beside them.
template <typename T>
void attend(const T* qkv, const T* bias, T* out, int64_t B, int64_t L, int64_t H, int64_t D, float scale,
            int64_t threads) {
    const int64_t rows = B * L;
    const RowKernel<T> kernel = row_kernel<T>(H, D);
    threads = std::max<int64_t>(1, std::min(threads, rows));
#pragma omp parallel num_threads(threads)
    {
        const int64_t t = omp_get_thread_num(), team = omp_get_num_threads();
        kernel(qkv, bias, out, L, D, H, scale, rows * t / team, rows * (t + 1) / team);
    }
}

}  // namespace

extern "C" {
void biased_attention_f32(const float* qkv, const float* bias, float* out, int64_t B, int64_t L, int64_t H, int64_t D,
                          float scale, int64_t threads) {
    attend(qkv, bias, out, B, L, H, D, scale, threads);
}
void biased_attention_bf16(const uint16_t* qkv, const uint16_t* bias, uint16_t* out, int64_t B, int64_t L, int64_t H,
                           int64_t D, float scale, int64_t threads) {
    attend(qkv, bias, out, B, L, H, D, scale, threads);
}
}
