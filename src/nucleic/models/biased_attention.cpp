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
// a block of heads at a time (see head_block); the scores of one row stay in cache. At inference nothing of size L x L is
// written; training saves the probabilities (B, L, L, H) for the backward pass, which also writes the
// bias gradient (B, L, L, H). Dropout keeps a weight where a hash of its index and a seed clears a
// threshold, so the backward pass regenerates the forward's mask. Plain loops over a block's heads that
// the compiler vectorizes (-O3 -march=native -fno-trapping-math); all arithmetic in float32.
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

// Heads are processed in blocks small enough that a row's accumulators of one block (block x D floats of
// context) stay in vector registers: AVX2 has 16 registers of 8 floats, AVX-512 32 of 16. The paper
// config's 32 heads of dimension 8 are one block on AVX-512 and four on AVX2, where one block of 32 spills
// the context to memory at every key (inference 1.9x slower, measured on AMD EPYC, AVX2).
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16, kBlockFloats = 256;
#else
constexpr int64_t kLanes = 8, kBlockFloats = 64;
#endif

constexpr int64_t head_block(int64_t H, int64_t D) {
    return std::min(H, std::max(kLanes, kBlockFloats / std::max<int64_t>(D, 1) / kLanes * kLanes));
}

// GCC 12 unrolls a loop over a block's lanes completely before its loop vectorizer runs, and its
// basic-block vectorizer then leaves a loop holding a select, the exponential or the dropout hash scalar
// (on AVX2; the AVX-512 code is the same either way). LANE_LOOP keeps such a loop rolled, so the loop
// vectorizer takes it whole: inference 1.9x faster on AVX2 (AMD EPYC).
#define LANE_LOOP _Pragma("GCC unroll 1")

// Buffers hold each block of heads apart, heads last: the block of heads h0..h0+nb-1 of a sequence's keys
// starts at keys + h0 * L * D and holds key j's dimension d of head h0 + lane at (j * D + d) * nb + lane;
// one position's vector (a query, a gradient) holds it at h0 * D + d * nb + lane.
template <typename T>
INLINE void load_keys_values(const T* qkv, int64_t b, int64_t L, int64_t D, int64_t H, int64_t block, float* keys,
                             float* values) {
    const int64_t width = H * D;
    for (int64_t h0 = 0; h0 < H; h0 += block) {
        const int64_t nb = std::min(block, H - h0);
        for (int64_t j = 0; j < L; ++j) {
            const T* k_j = qkv + (b * L + j) * 3 * width + width + h0 * D;
            float* keys_j = keys + h0 * L * D + j * D * nb;
            float* values_j = values + h0 * L * D + j * D * nb;
            for (int64_t lane = 0; lane < nb; ++lane)
                for (int64_t d = 0; d < D; ++d) {
                    keys_j[d * nb + lane] = to_float(k_j[lane * D + d]);
                    values_j[d * nb + lane] = to_float(k_j[width + lane * D + d]);
                }
        }
    }
}

// One position's (H, D) vector of qkv or of a gradient into head blocks, scaled; and back (heads first).
template <typename T>
INLINE void load_blocked(const T* from, int64_t D, int64_t H, int64_t block, float scale, float* into) {
    for (int64_t h0 = 0; h0 < H; h0 += block) {
        const int64_t nb = std::min(block, H - h0);
        for (int64_t lane = 0; lane < nb; ++lane)
            for (int64_t d = 0; d < D; ++d) into[h0 * D + d * nb + lane] = to_float(from[(h0 + lane) * D + d]) * scale;
    }
}

// A block's (D, nb) accumulators, each head's scaled by its scale[lane], into the heads-first output.
template <typename T>
INLINE void store_block(const float* from, int64_t D, int64_t nb, const float* scale, T* into) {
    for (int64_t lane = 0; lane < nb; ++lane)
        for (int64_t d = 0; d < D; ++d) store(into + lane * D + d, from[d * nb + lane] * scale[lane]);
}

// Forward pass over query rows first_row..last_row of the B * L. kH, kD: the head count and dimension
// as compile-time constants (0: take the arguments); with them the loops over heads unroll into a few
// vector instructions each, while as runtime counts every tiny loop pays its own set-up (several times
// slower). kTrain: save the probabilities into probs and drop weights (dropout) before the product with v.
template <typename T, int kH, int kD, bool kTrain>
void forward_rows(const T* __restrict qkv, const T* __restrict bias, T* __restrict out, float* __restrict probs,
                  int64_t L, int64_t D, int64_t H, float scale, Dropout dropout, int64_t first_row, int64_t last_row) {
    constexpr int64_t kBlock = kH ? head_block(kH, kD) : 0;
    static_assert(kH == 0 || kH % kBlock == 0, "compile-time head counts come in whole blocks");
    if (kH) H = kH;
    if (kD) D = kD;
    const int64_t width = H * D, block = head_block(H, D);
    // Per-row state in local arrays, which the compiler knows alias nothing (it would reload heap
    // buffers after every store to the scores).
    float query[kMaxWidth], context[kMaxWidth], s[kMaxHeads], row_max[kMaxHeads], denominator[kMaxHeads],
        e[kMaxHeads];
    std::vector<float> scores(L * H), keys(L * width), values(L * width);
    int64_t loaded = -1;  // the sequence whose keys and values are in the buffers
    for (int64_t row = first_row; row < last_row; ++row) {
        const int64_t b = row / L;
        if (b != loaded) load_keys_values(qkv, b, L, D, H, block, keys.data(), values.data());
        loaded = b;
        load_blocked(qkv + row * 3 * width, D, H, block, scale, query);
        for (int64_t h0 = 0; h0 < H; h0 += block) {
            const int64_t nb = kH ? kBlock : std::min(block, H - h0);
            const float* q = query + h0 * D;
            const float* k = keys.data() + h0 * L * D;
            const float* v = values.data() + h0 * L * D;
            const T* bias_row = bias + row * L * H + h0;
            // The scores (bias + scaled q k) and their maximum per head.
            for (int64_t lane = 0; lane < nb; ++lane) row_max[lane] = -3.0e38f;
            for (int64_t j = 0; j < L; ++j) {
                const float* k_j = k + j * D * nb;
                for (int64_t lane = 0; lane < nb; ++lane) s[lane] = to_float(bias_row[j * H + lane]);
                for (int64_t d = 0; d < D; ++d)
                    for (int64_t lane = 0; lane < nb; ++lane) s[lane] += q[d * nb + lane] * k_j[d * nb + lane];
                LANE_LOOP
                for (int64_t lane = 0; lane < nb; ++lane) {
                    row_max[lane] = std::max(row_max[lane], s[lane]);
                    scores[j * nb + lane] = s[lane];
                }
            }
            // One pass for the exponentials, their sums and the unnormalised context (dropout commutes with
            // the division by the sum, which comes last).
            for (int64_t lane = 0; lane < nb; ++lane) denominator[lane] = 0.0f;
            for (int64_t i = 0; i < D * nb; ++i) context[i] = 0.0f;
            for (int64_t j = 0; j < L; ++j) {
                const float* v_j = v + j * D * nb;
                LANE_LOOP
                for (int64_t lane = 0; lane < nb; ++lane) {
                    e[lane] = exp_nonpositive(scores[j * nb + lane] - row_max[lane]);
                    denominator[lane] += e[lane];
                }
                if (kTrain) {  // save the exponential, then drop it
                    float* probs_j = probs + (row * L + j) * H + h0;
                    const uint32_t index = uint32_t((row * L + j) * H + h0);
                    LANE_LOOP
                    for (int64_t lane = 0; lane < nb; ++lane) {
                        probs_j[lane] = e[lane];
                        e[lane] = dropout.weight(index + uint32_t(lane), e[lane]);
                    }
                }
                for (int64_t d = 0; d < D; ++d)
                    for (int64_t lane = 0; lane < nb; ++lane) context[d * nb + lane] += e[lane] * v_j[d * nb + lane];
            }
            for (int64_t lane = 0; lane < nb; ++lane) denominator[lane] = 1.0f / denominator[lane];  // the inverse
            if (kTrain)
                for (int64_t j = 0; j < L; ++j)
                    for (int64_t lane = 0; lane < nb; ++lane) probs[(row * L + j) * H + h0 + lane] *= denominator[lane];
            store_block(context, D, nb, denominator, out + row * width + h0 * D);
        }
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
    constexpr int64_t kBlock = kH ? head_block(kH, kD) : 0;
    static_assert(kH == 0 || kH % kBlock == 0, "compile-time head counts come in whole blocks");
    if (kH) H = kH;
    if (kD) D = kD;
    const int64_t width = H * D, block = head_block(H, D);
    float query[kMaxWidth], grad[kMaxWidth], grad_query[kMaxWidth], correction[kMaxHeads], ds[kMaxHeads],
        w[kMaxHeads], scales[kMaxHeads], ones[kMaxHeads];
    std::fill(scales, scales + H, scale);
    std::fill(ones, ones + H, 1.0f);
    // keep: each weight's dropout factor in the current query row and block (1 / (1 - p) or 0), hashed once
    std::vector<float> keys(L * width), values(L * width), grad_keys(L * width), grad_values(L * width),
        grad_probs(L * H), keep(L * H);
    for (int64_t b = first; b < last; ++b) {
        load_keys_values(qkv, b, L, D, H, block, keys.data(), values.data());
        std::fill(grad_keys.begin(), grad_keys.end(), 0.0f);
        std::fill(grad_values.begin(), grad_values.end(), 0.0f);
        for (int64_t i = 0; i < L; ++i) {
            const int64_t row = b * L + i;
            load_blocked(qkv + row * 3 * width, D, H, block, scale, query);
            load_blocked(grad_out + row * width, D, H, block, 1.0f, grad);
            for (int64_t h0 = 0; h0 < H; h0 += block) {
                const int64_t nb = kH ? kBlock : std::min(block, H - h0);
                const float* q = query + h0 * D;
                const float* g = grad + h0 * D;
                const float* k = keys.data() + h0 * L * D;
                const float* v = values.data() + h0 * L * D;
                float* gk = grad_keys.data() + h0 * L * D;
                float* gv = grad_values.data() + h0 * L * D;
                for (int64_t lane = 0; lane < nb; ++lane) correction[lane] = 0.0f;
                for (int64_t j = 0; j < L; ++j) {
                    const float* v_j = v + j * D * nb;
                    const float* p_j = probs + (row * L + j) * H + h0;
                    float* dp_j = grad_probs.data() + j * nb;
                    for (int64_t lane = 0; lane < nb; ++lane) dp_j[lane] = 0.0f;
                    for (int64_t d = 0; d < D; ++d)
                        for (int64_t lane = 0; lane < nb; ++lane) dp_j[lane] += g[d * nb + lane] * v_j[d * nb + lane];
                    const uint32_t index = uint32_t((row * L + j) * H + h0);
                    LANE_LOOP
                    for (int64_t lane = 0; lane < nb; ++lane) {
                        keep[j * nb + lane] = dropout.weight(index + uint32_t(lane), 1.0f);
                        dp_j[lane] *= keep[j * nb + lane];
                        correction[lane] += p_j[lane] * dp_j[lane];
                    }
                }
                for (int64_t x = 0; x < D * nb; ++x) grad_query[x] = 0.0f;
                for (int64_t j = 0; j < L; ++j) {
                    const float* p_j = probs + (row * L + j) * H + h0;
                    const float* k_j = k + j * D * nb;
                    float* gk_j = gk + j * D * nb;
                    float* gv_j = gv + j * D * nb;
                    LANE_LOOP
                    for (int64_t lane = 0; lane < nb; ++lane) {
                        ds[lane] = p_j[lane] * (grad_probs[j * nb + lane] - correction[lane]);
                        w[lane] = p_j[lane] * keep[j * nb + lane];
                        store(grad_bias + (row * L + j) * H + h0 + lane, ds[lane]);
                    }
                    for (int64_t d = 0; d < D; ++d)
                        for (int64_t lane = 0; lane < nb; ++lane) {
                            grad_query[d * nb + lane] += ds[lane] * k_j[d * nb + lane];
                            gk_j[d * nb + lane] += ds[lane] * q[d * nb + lane];
                            gv_j[d * nb + lane] += w[lane] * g[d * nb + lane];
                        }
                }
                store_block(grad_query, D, nb, scales, grad_qkv + row * 3 * width + h0 * D);
            }
        }
        for (int64_t h0 = 0; h0 < H; h0 += block) {
            const int64_t nb = std::min(block, H - h0);
            for (int64_t j = 0; j < L; ++j) {
                T* g_j = grad_qkv + (b * L + j) * 3 * width + h0 * D;
                store_block(grad_keys.data() + h0 * L * D + j * D * nb, D, nb, ones, g_j + width);
                store_block(grad_values.data() + h0 * L * D + j * D * nb, D, nb, ones, g_j + 2 * width);
            }
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
