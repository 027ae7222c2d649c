// softmax(q k^T / sqrt(D) + bias) v for many heads of a small dimension, on a CPU: the forward pass at
// inference, and for training a forward pass with attention dropout and its backward pass.
//
// Why: the Nucleic Transformer's attention has 32 heads of dimension 8 (paper config) and a full
// (B, H, L, L) additive bias. torch's kernels treat each head as a tiny matrix product and spend most
// of an inference pass there. Here one query row is computed for all heads at once, with the heads as
// the vector lanes:
//   qkv: (B, L, 3, H, D), the qkv projection's output as it comes;
//   bias: (B, L, L, H), the channels_last memory of the pair path's output, read in place;
//   out: (B, L, H, D), as the output projection reads it; all three float32 or all bfloat16.
// Each thread copies the keys and values of the sequence it works on into heads-last float32 buffers,
// (L, D, H); the scores of one row (L x H floats) stay in cache. At inference nothing of size L x L is
// written; training saves the probabilities (B, L, L, H) for the backward pass, which also writes the
// bias gradient (B, L, L, H). Dropout keeps a weight where a hash of its index and a seed clears a
// threshold, so the backward pass regenerates the forward's mask. Plain loops over H that the compiler
// vectorizes (-O3 -march=native); all arithmetic in float32.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

namespace {

#define INLINE inline __attribute__((always_inline))

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

// Dropout's mask: weight (row, j, h) of the (B * L, L, H) probabilities is dropped when
// hash(index ^ seed) < threshold (threshold = p * 2^32). The hash is a 32-bit integer mixer
// (lowbias32); cpu_attention.py's dropout_mask computes the same mask in torch for the tests.
INLINE uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

struct Dropout {
    uint32_t seed, threshold;
    float keep_scale;  // 1 / (1 - p)
    INLINE float weight(uint32_t index, float probability) const {
        return mix32(index ^ seed) >= threshold ? probability * keep_scale : 0.0f;
    }
};

// The keys and values of sequence b, heads last: keys[(j * D + d) * H + h].
template <typename T>
INLINE void load_keys_values(const T* qkv, int64_t b, int64_t L, int64_t D, int64_t H, float* keys, float* values) {
    const int64_t width = H * D;
    for (int64_t j = 0; j < L; ++j) {
        const T* k_j = qkv + (b * L + j) * 3 * width + width;
        for (int64_t h = 0; h < H; ++h)
            for (int64_t d = 0; d < D; ++d) {
                keys[(j * D + d) * H + h] = to_float(k_j[h * D + d]);
                values[(j * D + d) * H + h] = to_float(k_j[width + h * D + d]);
            }
    }
}

// One position's (H, D) vector of qkv or of a gradient, heads last and scaled: into[d * H + h].
template <typename T>
INLINE void load_heads_last(const T* from, int64_t D, int64_t H, float scale, float* into) {
    for (int64_t h = 0; h < H; ++h)
        for (int64_t d = 0; d < D; ++d) into[d * H + h] = to_float(from[h * D + d]) * scale;
}

template <typename T>
INLINE void store_heads_first(const float* from, int64_t D, int64_t H, float scale, T* into) {
    for (int64_t h = 0; h < H; ++h)
        for (int64_t d = 0; d < D; ++d) store(into + h * D + d, from[d * H + h] * scale);
}

// The scores of one query row (bias + scaled q k) into scores, and their maximum per head.
template <typename T>
INLINE void row_scores(const T* bias_row, const float* query, const float* keys, int64_t L, int64_t D, int64_t H,
                       float* scores, float* row_max) {
    float s[kMaxHeads];
    for (int64_t h = 0; h < H; ++h) row_max[h] = -3.0e38f;
    for (int64_t j = 0; j < L; ++j) {
        const T* bias_j = bias_row + j * H;
        const float* k_j = keys + j * H * D;
        for (int64_t h = 0; h < H; ++h) s[h] = to_float(bias_j[h]);
        for (int64_t d = 0; d < D; ++d)
            for (int64_t h = 0; h < H; ++h) s[h] += query[d * H + h] * k_j[d * H + h];
        for (int64_t h = 0; h < H; ++h) {
            row_max[h] = std::max(row_max[h], s[h]);
            scores[j * H + h] = s[h];
        }
    }
}

// Forward pass over query rows first_row..last_row of the B * L. kH, kD: the head count and dimension
// as compile-time constants (0: take the arguments); with them the loops over heads unroll into a few
// vector instructions each, while as runtime counts every tiny loop pays its own set-up (several times
// slower). kTrain: save the probabilities into probs and drop weights (dropout) before the product with v.
template <typename T, int kH, int kD, bool kTrain>
void forward_rows(const T* __restrict qkv, const T* __restrict bias, T* __restrict out, float* __restrict probs,
                  int64_t L, int64_t D, int64_t H, float scale, Dropout dropout, int64_t first_row, int64_t last_row) {
    if (kH) H = kH;
    if (kD) D = kD;
    const int64_t width = H * D;
    // Per-row state in local arrays, which the compiler knows alias nothing (it would reload heap
    // buffers after every store to the scores).
    float query[kMaxWidth], context[kMaxWidth], row_max[kMaxHeads], denominator[kMaxHeads], e[kMaxHeads];
    std::vector<float> scores(L * H), keys(L * width), values(L * width);
    int64_t loaded = -1;  // the sequence whose keys and values are in the buffers
    for (int64_t row = first_row; row < last_row; ++row) {
        const int64_t b = row / L;
        if (b != loaded) load_keys_values(qkv, b, L, D, H, keys.data(), values.data());
        loaded = b;
        load_heads_last(qkv + row * 3 * width, D, H, scale, query);
        row_scores(bias + row * L * H, query, keys.data(), L, D, H, scores.data(), row_max);
        // One pass for the exponentials, their sums and the unnormalised context (dropout commutes with
        // the division by the sum, which comes last).
        for (int64_t h = 0; h < H; ++h) denominator[h] = 0.0f;
        for (int64_t i = 0; i < width; ++i) context[i] = 0.0f;
        for (int64_t j = 0; j < L; ++j) {
            const float* v_j = values.data() + j * width;
            for (int64_t h = 0; h < H; ++h) {
                e[h] = exp_nonpositive(scores[j * H + h] - row_max[h]);
                denominator[h] += e[h];
            }
            if (kTrain) {  // save the exponential, then drop it
                const uint32_t index = uint32_t((row * L + j) * H);
                for (int64_t h = 0; h < H; ++h) {
                    probs[(row * L + j) * H + h] = e[h];
                    e[h] = dropout.weight(index + uint32_t(h), e[h]);
                }
            }
            for (int64_t d = 0; d < D; ++d)
                for (int64_t h = 0; h < H; ++h) context[d * H + h] += e[h] * v_j[d * H + h];
        }
        for (int64_t h = 0; h < H; ++h) denominator[h] = 1.0f / denominator[h];  // now the inverse
        if (kTrain)
            for (int64_t j = 0; j < L; ++j)
                for (int64_t h = 0; h < H; ++h) probs[(row * L + j) * H + h] *= denominator[h];
        for (int64_t d = 0; d < D; ++d)
            for (int64_t h = 0; h < H; ++h) context[d * H + h] *= denominator[h];
        store_heads_first(context, D, H, 1.0f, out + row * width);
    }
}

// Backward pass over sequences first..last of the B (a thread owns whole sequences, so the key and value
// gradients, sums over every query row, need no locks). With P the saved probabilities, W the weights
// after dropout and S = scale q k^T + bias: dW = dO V^T, dP = dW * mask / (1 - p),
// dS = P (dP - sum_j P dP), dq = scale dS k, dk = scale dS^T q, dv = W^T dO, dbias = dS.
template <typename T, int kH, int kD>
void backward_sequences(const T* __restrict qkv, const float* __restrict probs, const T* __restrict grad_out,
                        T* __restrict grad_qkv, T* __restrict grad_bias, int64_t L, int64_t D, int64_t H, float scale,
                        Dropout dropout, int64_t first, int64_t last) {
    if (kH) H = kH;
    if (kD) D = kD;
    const int64_t width = H * D;
    float query[kMaxWidth], grad[kMaxWidth], grad_query[kMaxWidth], correction[kMaxHeads], ds[kMaxHeads],
        w[kMaxHeads];
    // keep: each weight's dropout factor in the current query row (1 / (1 - p) or 0), hashed once
    std::vector<float> keys(L * width), values(L * width), grad_keys(L * width), grad_values(L * width),
        grad_probs(L * H), keep(L * H);
    for (int64_t b = first; b < last; ++b) {
        load_keys_values(qkv, b, L, D, H, keys.data(), values.data());
        std::fill(grad_keys.begin(), grad_keys.end(), 0.0f);
        std::fill(grad_values.begin(), grad_values.end(), 0.0f);
        for (int64_t i = 0; i < L; ++i) {
            const int64_t row = b * L + i;
            load_heads_last(qkv + row * 3 * width, D, H, scale, query);
            load_heads_last(grad_out + row * width, D, H, 1.0f, grad);
            for (int64_t h = 0; h < H; ++h) correction[h] = 0.0f;
            for (int64_t j = 0; j < L; ++j) {
                const float* v_j = values.data() + j * width;
                const float* p_j = probs + (row * L + j) * H;
                float* dp_j = grad_probs.data() + j * H;
                for (int64_t h = 0; h < H; ++h) dp_j[h] = 0.0f;
                for (int64_t d = 0; d < D; ++d)
                    for (int64_t h = 0; h < H; ++h) dp_j[h] += grad[d * H + h] * v_j[d * H + h];
                const uint32_t index = uint32_t((row * L + j) * H);
                for (int64_t h = 0; h < H; ++h) {
                    keep[j * H + h] = dropout.weight(index + uint32_t(h), 1.0f);
                    dp_j[h] *= keep[j * H + h];
                    correction[h] += p_j[h] * dp_j[h];
                }
            }
            for (int64_t k = 0; k < width; ++k) grad_query[k] = 0.0f;
            for (int64_t j = 0; j < L; ++j) {
                const float* p_j = probs + (row * L + j) * H;
                const float* k_j = keys.data() + j * width;
                float* gk_j = grad_keys.data() + j * width;
                float* gv_j = grad_values.data() + j * width;
                for (int64_t h = 0; h < H; ++h) {
                    ds[h] = p_j[h] * (grad_probs[j * H + h] - correction[h]);
                    w[h] = p_j[h] * keep[j * H + h];
                    store(grad_bias + (row * L + j) * H + h, ds[h]);
                }
                for (int64_t d = 0; d < D; ++d)
                    for (int64_t h = 0; h < H; ++h) {
                        grad_query[d * H + h] += ds[h] * k_j[d * H + h];
                        gk_j[d * H + h] += ds[h] * query[d * H + h];
                        gv_j[d * H + h] += w[h] * grad[d * H + h];
                    }
            }
            store_heads_first(grad_query, D, H, scale, grad_qkv + row * 3 * width);
        }
        for (int64_t j = 0; j < L; ++j) {
            T* g_j = grad_qkv + (b * L + j) * 3 * width;
            store_heads_first(grad_keys.data() + j * width, D, H, 1.0f, g_j + width);
            store_heads_first(grad_values.data() + j * width, D, H, 1.0f, g_j + 2 * width);
        }
    }
}

template <typename T, bool kTrain>
using ForwardKernel = void (*)(const T*, const T*, T*, float*, int64_t, int64_t, int64_t, float, Dropout, int64_t,
                               int64_t);
template <typename T>
using BackwardKernel = void (*)(const T*, const float*, const T*, T*, T*, int64_t, int64_t, int64_t, float, Dropout,
                                int64_t, int64_t);

// The attention shapes of this project's models (heads x dimension: paper config 32 x 8, and 16 x 16,
// 16 x 8) get their own unrolled kernels; any other shape the generic ones.
template <typename T, bool kTrain>
ForwardKernel<T, kTrain> forward_kernel(int64_t H, int64_t D) {
    if (H == 32 && D == 8) return forward_rows<T, 32, 8, kTrain>;
    if (H == 16 && D == 16) return forward_rows<T, 16, 16, kTrain>;
    if (H == 16 && D == 8) return forward_rows<T, 16, 8, kTrain>;
    return forward_rows<T, 0, 0, kTrain>;
}

template <typename T>
BackwardKernel<T> backward_kernel(int64_t H, int64_t D) {
    if (H == 32 && D == 8) return backward_sequences<T, 32, 8>;
    if (H == 16 && D == 16) return backward_sequences<T, 16, 16>;
    if (H == 16 && D == 8) return backward_sequences<T, 16, 8>;
    return backward_sequences<T, 0, 0>;
}

Dropout make_dropout(float p, int64_t seed) {
    const double threshold = std::min(double(p) * 4294967296.0, 4294967295.0);
    return Dropout{uint32_t(seed), uint32_t(threshold), p < 1.0f ? 1.0f / (1.0f - p) : 0.0f};
}

// Work split evenly over an OpenMP team. Loaded after torch, this library shares torch's OpenMP runtime
// (the same libgomp.so.1), so the team is torch's own threads, not a second set spinning beside them.
template <typename Work>
void split(int64_t items, int64_t threads, Work work) {
    threads = std::max<int64_t>(1, std::min(threads, items));
#pragma omp parallel num_threads(threads)
    {
        const int64_t t = omp_get_thread_num(), team = omp_get_num_threads();
        work(items * t / team, items * (t + 1) / team);
    }
}

template <typename T>
void forward(const T* qkv, const T* bias, T* out, float* probs, int64_t B, int64_t L, int64_t H, int64_t D,
             float scale, float p, int64_t seed, int64_t threads) {
    const Dropout dropout = make_dropout(p, seed);
    if (probs == nullptr) {
        const auto kernel = forward_kernel<T, false>(H, D);
        split(B * L, threads, [&](int64_t a, int64_t z) { kernel(qkv, bias, out, probs, L, D, H, scale, dropout, a, z); });
    } else {
        const auto kernel = forward_kernel<T, true>(H, D);
        split(B * L, threads, [&](int64_t a, int64_t z) { kernel(qkv, bias, out, probs, L, D, H, scale, dropout, a, z); });
    }
}

template <typename T>
void backward(const T* qkv, const float* probs, const T* grad_out, T* grad_qkv, T* grad_bias, int64_t B, int64_t L,
              int64_t H, int64_t D, float scale, float p, int64_t seed, int64_t threads) {
    const Dropout dropout = make_dropout(p, seed);
    const auto kernel = backward_kernel<T>(H, D);
    split(B, threads, [&](int64_t a, int64_t z) {
        kernel(qkv, probs, grad_out, grad_qkv, grad_bias, L, D, H, scale, dropout, a, z);
    });
}

}  // namespace

// probs: null at inference; for training a (B, L, L, H) float32 buffer that receives the probabilities.
extern "C" {
void biased_attention_f32(const float* qkv, const float* bias, float* out, float* probs, int64_t B, int64_t L,
                          int64_t H, int64_t D, float scale, float p, int64_t seed, int64_t threads) {
    forward(qkv, bias, out, probs, B, L, H, D, scale, p, seed, threads);
}
void biased_attention_bf16(const uint16_t* qkv, const uint16_t* bias, uint16_t* out, float* probs, int64_t B,
                           int64_t L, int64_t H, int64_t D, float scale, float p, int64_t seed, int64_t threads) {
    forward(qkv, bias, out, probs, B, L, H, D, scale, p, seed, threads);
}
void biased_attention_backward_f32(const float* qkv, const float* probs, const float* grad_out, float* grad_qkv,
                                   float* grad_bias, int64_t B, int64_t L, int64_t H, int64_t D, float scale, float p,
                                   int64_t seed, int64_t threads) {
    backward(qkv, probs, grad_out, grad_qkv, grad_bias, B, L, H, D, scale, p, seed, threads);
}
void biased_attention_backward_bf16(const uint16_t* qkv, const float* probs, const uint16_t* grad_out,
                                    uint16_t* grad_qkv, uint16_t* grad_bias, int64_t B, int64_t L, int64_t H, int64_t D,
                                    float scale, float p, int64_t seed, int64_t threads) {
    backward(qkv, probs, grad_out, grad_qkv, grad_bias, B, L, H, D, scale, p, seed, threads);
}
}
