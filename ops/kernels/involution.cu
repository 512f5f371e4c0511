// Involution forward, grad-input and grad-weight kernels (compiled at run time by NVRTC through CuPy).
//
//   out[n, c, i, j] = sum_{u,v < K} weight[n, g, u, v, i, j] * x[n, c, i*s + u*d - p, j*s + v*d - p],
//   g = c / (C / G), x read as zero outside the image.
//
// Two memory layouts, each with its own kernels (sizes are kernel arguments, so one compiled module serves every
// shape):
// - NCHW (involution_<kind>_i32/_i64): x, grad_x (N, C, H, W); weight, grad_weight (N, G, K, K, Ho, Wo); out,
//   grad_out (N, C, Ho, Wo), all contiguous.
// - NHWC (involution_<kind>_nhwc_i32/_i64), for channels_last models: x, grad_x stored as (N, H, W, C); out,
//   grad_out as (N, Ho, Wo, C); weight, grad_weight as (N, Ho, Wo, G, K, K), which is how the (N, G*K*K, Ho, Wo)
//   output of a channels_last convolution, viewed as (N, G, K, K, Ho, Wo), lies in memory. No copies to NCHW.
//
// Chosen when compiling (ops/cupy_backend.py passes them):
//   INVOLUTION_SCALAR              float | double | __half | __nv_bfloat16; sums accumulate in float (double
//                                  for double)
//   INVOLUTION_CHANNELS_PER_THREAD channels of a group one thread handles (RedNet: 16 per group)
//   INVOLUTION_PIXELS_PER_THREAD   adjacent pixels of a row one thread handles (a power of two; NCHW kernels)
//   INVOLUTION_BLOCK_SIZE          threads per block the kernels are launched with (__launch_bounds__)
//   INVOLUTION_MIN_BLOCKS          blocks per SM the registers must leave room for (__launch_bounds__): 2 keeps
//                                  at least 16 warps resident at 256 threads (at most 128 registers per thread)
//   INVOLUTION_INDEX_BITS          32 or 64: build only those entry points (unset: both, for the host emulation)
// Each kernel has a 32-bit index variant (_i32), used when every tensor has fewer than 2^31 elements, and a
// 64-bit one (_i64). The GPU path compiles them as separate modules, the 64-bit one with a smaller split of the
// work per thread (64-bit address arithmetic needs more registers; see ops/cupy_backend.py).
//
// The op is memory bound; the kernels are shaped to load each value as few times as possible:
// - a thread keeps the sums of several channels of a group in registers, so each generated weight is loaded
//   once per thread, not once per channel;
// - it also handles a few adjacent pixels of a row: their weights (and outputs) are loaded (stored) as one
//   vector when aligned, and when stride == dilation the input a pixel reads at tap v + 1 is the one its right
//   neighbour read at tap v, so it slides along in registers instead of being loaded again;
// - consecutive threads take consecutive pixels of a row, so memory accesses are coalesced along W;
// - in NHWC, a thread's channels are adjacent in memory: they move as 16-byte vectors when aligned, and
//   consecutive threads take consecutive runs of channels of one pixel, so accesses are coalesced along C;
// - no shared memory, atomics or synchronisation: every thread's work is independent of the others', which
//   also lets the test suite run this same file on the CPU (tests/host_emulation).

#ifndef INVOLUTION_HOST_EMULATION
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#endif

#ifndef INVOLUTION_SCALAR
#define INVOLUTION_SCALAR float
#endif
#ifndef INVOLUTION_CHANNELS_PER_THREAD
#define INVOLUTION_CHANNELS_PER_THREAD 16
#endif
#ifndef INVOLUTION_PIXELS_PER_THREAD
#define INVOLUTION_PIXELS_PER_THREAD 2
#endif
#ifndef INVOLUTION_BLOCK_SIZE
#define INVOLUTION_BLOCK_SIZE 256
#endif
#ifndef INVOLUTION_MIN_BLOCKS
#define INVOLUTION_MIN_BLOCKS 2
#endif

typedef INVOLUTION_SCALAR scalar_t;
constexpr int kChannels = INVOLUTION_CHANNELS_PER_THREAD;
constexpr int kPixels = INVOLUTION_PIXELS_PER_THREAD;
static_assert(kPixels > 0 && (kPixels & (kPixels - 1)) == 0, "INVOLUTION_PIXELS_PER_THREAD must be a power of 2");

// Accumulation type and conversions: float for every storage type but double.
template <typename T>
struct Accumulator {
    typedef float type;
};
template <>
struct Accumulator<double> {
    typedef double type;
};
typedef Accumulator<scalar_t>::type acc_t;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ void from_acc(float v, float* out) { *out = v; }
__device__ __forceinline__ void from_acc(double v, double* out) { *out = v; }
#ifndef INVOLUTION_HOST_EMULATION
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void from_acc(float v, __half* out) { *out = __float2half_rn(v); }
__device__ __forceinline__ void from_acc(float v, __nv_bfloat16* out) { *out = __float2bfloat16_rn(v); }
#endif

// kPixels adjacent elements, moved as one vector load or store when their address is aligned.
struct alignas(kPixels * sizeof(scalar_t)) PixelVector {
    scalar_t v[kPixels];
};

__device__ __forceinline__ bool is_vector_aligned(const scalar_t* p) {
    return reinterpret_cast<unsigned long long>(p) % sizeof(PixelVector) == 0;
}

// out[q] = row[cols[q]] for the pixels q with cols[q] >= 0, else 0; one vector load when the columns are
// consecutive, all valid and aligned.
__device__ __forceinline__ void load_pixels(const scalar_t* row, const int (&cols)[kPixels], acc_t (&out)[kPixels]) {
    bool consecutive = cols[0] >= 0;
#pragma unroll
    for (int q = 1; q < kPixels; ++q) consecutive = consecutive && cols[q] == cols[0] + q;
    if (consecutive && is_vector_aligned(row + cols[0])) {
        const PixelVector vec = *reinterpret_cast<const PixelVector*>(row + cols[0]);
#pragma unroll
        for (int q = 0; q < kPixels; ++q) out[q] = to_acc(vec.v[q]);
    } else {
#pragma unroll
        for (int q = 0; q < kPixels; ++q) out[q] = cols[q] >= 0 ? to_acc(row[cols[q]]) : acc_t(0);
    }
}

// The first `count` of kPixels consecutive elements at p (the rest read as 0).
__device__ __forceinline__ void load_run(const scalar_t* p, int count, acc_t (&out)[kPixels]) {
    int cols[kPixels];
#pragma unroll
    for (int q = 0; q < kPixels; ++q) cols[q] = q < count ? q : -1;
    load_pixels(p, cols, out);
}

// p[q] = values[q] for q < count; one vector store when the run is complete and aligned.
__device__ __forceinline__ void store_run(scalar_t* p, int count, const acc_t (&values)[kPixels]) {
    if (count == kPixels && is_vector_aligned(p)) {
        PixelVector vec;
#pragma unroll
        for (int q = 0; q < kPixels; ++q) from_acc(values[q], &vec.v[q]);
        *reinterpret_cast<PixelVector*>(p) = vec;
    } else {
#pragma unroll
        for (int q = 0; q < kPixels; ++q) {
            if (q < count) from_acc(values[q], &p[q]);
        }
    }
}

// x[col] if 0 <= col < width, else 0 (zero padding).
__device__ __forceinline__ acc_t load_padded(const scalar_t* row, int col, int width) {
    return col >= 0 && col < width ? to_acc(row[col]) : acc_t(0);
}

// The next digit of a flat mixed-radix index, innermost first: returns rest % radix and leaves rest / radix.
template <typename index_t>
__device__ __forceinline__ int next_digit(index_t& rest, int radix) {
    const int digit = (int)(rest % radix);
    rest /= radix;
    return digit;
}

// Shapes shared by the three kernels.
struct Geometry {
    int N, C, H, W, G, K, Ho, Wo, stride, pad, dil;
};

// Forward. One thread: kPixels adjacent output pixels (i, j0 ...) of sample n for a run of up to kChannels
// channels of group g. Reads the weights weight[n, g, :, :, i, j0 ...] once each and x over the K*K windows of
// its channels; writes out[n, c, i, j0 ...] for its channels.
template <typename index_t>
__device__ __forceinline__ void forward_impl(const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                                             scalar_t* __restrict__ out, const Geometry g) {
    const int group_channels = g.C / g.G;
    const int chunks = (group_channels + kChannels - 1) / kChannels;
    const int col_tiles = (g.Wo + kPixels - 1) / kPixels;
    const index_t in_plane = (index_t)g.H * g.W;
    const index_t out_plane = (index_t)g.Ho * g.Wo;
    const index_t total = (index_t)g.N * g.G * chunks * g.Ho * col_tiles;
    const index_t step = (index_t)blockDim.x * gridDim.x;
    // Pixel q + 1 at tap v reads the column pixel q reads at tap v + 1.
    const bool slide = g.stride == g.dil;
    for (index_t t = (index_t)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += step) {
        index_t rest = t;
        const int j0 = next_digit(rest, col_tiles) * kPixels;
        const int i = next_digit(rest, g.Ho);
        const int chunk = next_digit(rest, chunks);
        const int grp = next_digit(rest, g.G);
        const index_t n = rest;
        const int c0 = grp * group_channels + chunk * kChannels;
        const int count = group_channels - chunk * kChannels;  // channels of this run, clipped below
        const int pixels = g.Wo - j0 < kPixels ? g.Wo - j0 : kPixels;

        const scalar_t* x_n = x + (n * g.C + c0) * in_plane;
        const scalar_t* w_pix = weight + (n * g.G + grp) * g.K * g.K * out_plane + (index_t)i * g.Wo + j0;
        acc_t acc[kChannels][kPixels];
        acc_t xs[kChannels][kPixels];
#pragma unroll
        for (int k = 0; k < kChannels; ++k) {
#pragma unroll
            for (int q = 0; q < kPixels; ++q) acc[k][q] = 0;
        }

        const int h0 = i * g.stride - g.pad;
        const int w0 = j0 * g.stride - g.pad;
        for (int u = 0; u < g.K; ++u) {
            const int h = h0 + u * g.dil;
            if (h < 0 || h >= g.H) continue;
            const scalar_t* x_row = x_n + (index_t)h * g.W;
            for (int v = 0; v < g.K; ++v) {
                acc_t wv[kPixels];
                load_run(w_pix + (index_t)(u * g.K + v) * out_plane, pixels, wv);
                const int col = w0 + v * g.dil;  // input column of pixel 0
#pragma unroll
                for (int k = 0; k < kChannels; ++k) {
                    if (k >= count) continue;
                    const scalar_t* x_k = x_row + k * in_plane;
                    if (slide && v > 0) {
#pragma unroll
                        for (int q = 0; q + 1 < kPixels; ++q) xs[k][q] = xs[k][q + 1];
                        xs[k][kPixels - 1] = load_padded(x_k, col + (kPixels - 1) * g.stride, g.W);
                    } else {
#pragma unroll
                        for (int q = 0; q < kPixels; ++q) xs[k][q] = load_padded(x_k, col + q * g.stride, g.W);
                    }
#pragma unroll
                    for (int q = 0; q < kPixels; ++q) acc[k][q] += wv[q] * xs[k][q];
                }
            }
        }
        scalar_t* out_pix = out + (n * g.C + c0) * out_plane + (index_t)i * g.Wo + j0;
#pragma unroll
        for (int k = 0; k < kChannels; ++k) {
            if (k < count) store_run(out_pix + k * out_plane, pixels, acc[k]);
        }
    }
}

// Grad-input. One thread: kPixels adjacent input pixels (h, w0 ...) of sample n for a run of up to kChannels
// channels of group g. Gathers over the taps (u, v) whose output pixel (i, j) read each of its pixels: reads
// weight[n, g, u, v, i, j] once each and grad_out[n, c, i, j] of its channels; writes grad_x[n, c, h, w0 ...]
// for its channels (zero where no window reaches).
template <typename index_t>
__device__ __forceinline__ void grad_input_impl(const scalar_t* __restrict__ grad_out,
                                                const scalar_t* __restrict__ weight,
                                                scalar_t* __restrict__ grad_x, const Geometry g) {
    const int group_channels = g.C / g.G;
    const int chunks = (group_channels + kChannels - 1) / kChannels;
    const int col_tiles = (g.W + kPixels - 1) / kPixels;
    const index_t in_plane = (index_t)g.H * g.W;
    const index_t out_plane = (index_t)g.Ho * g.Wo;
    const index_t total = (index_t)g.N * g.G * chunks * g.H * col_tiles;
    const index_t step = (index_t)blockDim.x * gridDim.x;
    // With unit stride and dilation, pixel q at tap v + 1 reads the grad_out column pixel q - 1 reads at tap v.
    const bool slide = g.stride == 1 && g.dil == 1;
    for (index_t t = (index_t)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += step) {
        index_t rest = t;
        const int w0 = next_digit(rest, col_tiles) * kPixels;
        const int h = next_digit(rest, g.H);
        const int chunk = next_digit(rest, chunks);
        const int grp = next_digit(rest, g.G);
        const index_t n = rest;
        const int c0 = grp * group_channels + chunk * kChannels;
        const int count = group_channels - chunk * kChannels;
        const int pixels = g.W - w0 < kPixels ? g.W - w0 : kPixels;

        const scalar_t* gy_n = grad_out + (n * g.C + c0) * out_plane;
        const scalar_t* w_ng = weight + (n * g.G + grp) * g.K * g.K * out_plane;
        acc_t acc[kChannels][kPixels];
        acc_t gs[kChannels][kPixels];
#pragma unroll
        for (int k = 0; k < kChannels; ++k) {
#pragma unroll
            for (int q = 0; q < kPixels; ++q) acc[k][q] = 0;
        }

        for (int u = 0; u < g.K; ++u) {
            // Output row i read this row when i * stride = h + pad - u * dil.
            const int hs = h + g.pad - u * g.dil;
            if (hs < 0 || hs % g.stride != 0) continue;
            const int i = hs / g.stride;
            if (i >= g.Ho) continue;
            const scalar_t* gy_row = gy_n + (index_t)i * g.Wo;
            for (int v = 0; v < g.K; ++v) {
                // Output column of pixel q, or -1 when no output pixel read it at this tap.
                int js[kPixels];
#pragma unroll
                for (int q = 0; q < kPixels; ++q) {
                    const int ws = w0 + q + g.pad - v * g.dil;
                    js[q] = q < pixels && ws >= 0 && ws % g.stride == 0 && ws / g.stride < g.Wo ? ws / g.stride : -1;
                }
                acc_t wv[kPixels];
                load_pixels(w_ng + (index_t)(u * g.K + v) * out_plane + (index_t)i * g.Wo, js, wv);
#pragma unroll
                for (int k = 0; k < kChannels; ++k) {
                    if (k >= count) continue;
                    const scalar_t* gy_k = gy_row + k * out_plane;
                    if (slide && v > 0) {
#pragma unroll
                        for (int q = kPixels - 1; q > 0; --q) gs[k][q] = gs[k][q - 1];
                        gs[k][0] = js[0] >= 0 ? to_acc(gy_k[js[0]]) : acc_t(0);
                    } else {
#pragma unroll
                        for (int q = 0; q < kPixels; ++q) gs[k][q] = js[q] >= 0 ? to_acc(gy_k[js[q]]) : acc_t(0);
                    }
#pragma unroll
                    for (int q = 0; q < kPixels; ++q) acc[k][q] += wv[q] * gs[k][q];
                }
            }
        }
        scalar_t* gx_pix = grad_x + (n * g.C + c0) * in_plane + (index_t)h * g.W + w0;
#pragma unroll
        for (int k = 0; k < kChannels; ++k) {
            if (k < count) store_run(gx_pix + k * in_plane, pixels, acc[k]);
        }
    }
}

// Grad-weight. One thread: kPixels adjacent output pixels (i, j0 ...) of sample n and group g, all K*K taps.
// Reads grad_out[n, c, i, j0 ...] of the group's channels into registers (once, when the group fits in one run
// of kChannels) and x over the windows of each channel; writes grad_weight[n, g, u, v, i, j0 ...] for every
// tap, each the sum over the group's channels.
template <typename index_t>
__device__ __forceinline__ void grad_weight_impl(const scalar_t* __restrict__ grad_out,
                                                 const scalar_t* __restrict__ x,
                                                 scalar_t* __restrict__ grad_weight, const Geometry g) {
    const int group_channels = g.C / g.G;
    const int chunks = (group_channels + kChannels - 1) / kChannels;
    const int col_tiles = (g.Wo + kPixels - 1) / kPixels;
    const index_t in_plane = (index_t)g.H * g.W;
    const index_t out_plane = (index_t)g.Ho * g.Wo;
    const index_t total = (index_t)g.N * g.G * g.Ho * col_tiles;
    const index_t step = (index_t)blockDim.x * gridDim.x;
    // As in the forward; the inputs only stay in registers from tap to tap when one run covers the group.
    const bool slide = g.stride == g.dil && chunks == 1;
    for (index_t t = (index_t)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += step) {
        index_t rest = t;
        const int j0 = next_digit(rest, col_tiles) * kPixels;
        const int i = next_digit(rest, g.Ho);
        const int grp = next_digit(rest, g.G);
        const index_t n = rest;
        const int pixels = g.Wo - j0 < kPixels ? g.Wo - j0 : kPixels;
        const index_t pix = (index_t)i * g.Wo + j0;

        const scalar_t* gy_pix = grad_out + (n * g.C + (index_t)grp * group_channels) * out_plane + pix;
        const scalar_t* x_ng = x + (n * g.C + (index_t)grp * group_channels) * in_plane;
        scalar_t* gw_pix = grad_weight + (n * g.G + grp) * g.K * g.K * out_plane + pix;

        acc_t gy[kChannels][kPixels];  // grad_out of one run of channels
        acc_t xs[kChannels][kPixels];
        if (chunks == 1) {
#pragma unroll
            for (int k = 0; k < kChannels; ++k) load_run(gy_pix + k * out_plane, k < group_channels ? pixels : 0, gy[k]);
        }

        const int h0 = i * g.stride - g.pad;
        const int w0 = j0 * g.stride - g.pad;
        for (int u = 0; u < g.K; ++u) {
            const int h = h0 + u * g.dil;
            const bool row_inside = h >= 0 && h < g.H;
            for (int v = 0; v < g.K; ++v) {
                const int col = w0 + v * g.dil;  // input column of pixel 0
                acc_t sum[kPixels];
#pragma unroll
                for (int q = 0; q < kPixels; ++q) sum[q] = 0;
                for (int chunk = 0; row_inside && chunk < chunks; ++chunk) {
                    const int c0 = chunk * kChannels;
                    const int count = group_channels - c0;
                    if (chunks != 1) {
#pragma unroll
                        for (int k = 0; k < kChannels; ++k)
                            load_run(gy_pix + (c0 + k) * out_plane, k < count ? pixels : 0, gy[k]);
                    }
                    const scalar_t* x_row = x_ng + c0 * in_plane + (index_t)h * g.W;
#pragma unroll
                    for (int k = 0; k < kChannels; ++k) {
                        if (k >= count) continue;
                        const scalar_t* x_k = x_row + k * in_plane;
                        if (slide && v > 0) {
#pragma unroll
                            for (int q = 0; q + 1 < kPixels; ++q) xs[k][q] = xs[k][q + 1];
                            xs[k][kPixels - 1] = load_padded(x_k, col + (kPixels - 1) * g.stride, g.W);
                        } else {
#pragma unroll
                            for (int q = 0; q < kPixels; ++q) xs[k][q] = load_padded(x_k, col + q * g.stride, g.W);
                        }
#pragma unroll
                        for (int q = 0; q < kPixels; ++q) sum[q] += gy[k][q] * xs[k][q];
                    }
                }
                store_run(gw_pix + (index_t)(u * g.K + v) * out_plane, pixels, sum);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// NHWC kernels. A run of kChannels adjacent channels is one or more vectors of up to 16 bytes.
constexpr int kRunBytes = kChannels * (int)sizeof(scalar_t);
constexpr int kChannelVectorBytes = (kRunBytes % 16 == 0) ? 16 : (kRunBytes % 8 == 0) ? 8 : (kRunBytes % 4 == 0) ? 4
                                    : (int)sizeof(scalar_t);
constexpr int kChannelVectorElements = kChannelVectorBytes / (int)sizeof(scalar_t);
static_assert(kChannels % kChannelVectorElements == 0, "a run of channels must be whole vectors");

struct alignas(kChannelVectorBytes) ChannelVector {
    scalar_t v[kChannelVectorElements];
};

// out[k] = p[k] for k < count, else 0; whole vectors when the run is complete and aligned.
__device__ __forceinline__ void load_channels(const scalar_t* p, int count, acc_t (&out)[kChannels]) {
    if (count >= kChannels && reinterpret_cast<unsigned long long>(p) % kChannelVectorBytes == 0) {
#pragma unroll
        for (int b = 0; b < kChannels / kChannelVectorElements; ++b) {
            const ChannelVector vec = reinterpret_cast<const ChannelVector*>(p)[b];
#pragma unroll
            for (int e = 0; e < kChannelVectorElements; ++e) out[b * kChannelVectorElements + e] = to_acc(vec.v[e]);
        }
    } else {
#pragma unroll
        for (int k = 0; k < kChannels; ++k) out[k] = k < count ? to_acc(p[k]) : acc_t(0);
    }
}

// p[k] = values[k] for k < count; whole vectors when the run is complete and aligned.
__device__ __forceinline__ void store_channels(scalar_t* p, int count, const acc_t (&values)[kChannels]) {
    if (count >= kChannels && reinterpret_cast<unsigned long long>(p) % kChannelVectorBytes == 0) {
#pragma unroll
        for (int b = 0; b < kChannels / kChannelVectorElements; ++b) {
            ChannelVector vec;
#pragma unroll
            for (int e = 0; e < kChannelVectorElements; ++e) from_acc(values[b * kChannelVectorElements + e], &vec.v[e]);
            reinterpret_cast<ChannelVector*>(p)[b] = vec;
        }
    } else {
#pragma unroll
        for (int k = 0; k < kChannels; ++k) {
            if (k < count) from_acc(values[k], &p[k]);
        }
    }
}

// Forward, NHWC. One thread: output pixel (n, i, j), a run of up to kChannels channels of group g. Reads the K*K
// weights weight[n, i, j, g, :, :] (adjacent in memory) once each and x[n, h, w, c0 ...] over the window; writes
// out[n, i, j, c0 ...].
template <typename index_t>
__device__ __forceinline__ void forward_nhwc_impl(const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                                                  scalar_t* __restrict__ out, const Geometry g) {
    const int group_channels = g.C / g.G;
    const int chunks = (group_channels + kChannels - 1) / kChannels;
    const int taps = g.K * g.K;
    const index_t total = (index_t)g.N * g.Ho * g.Wo * g.G * chunks;
    const index_t step = (index_t)blockDim.x * gridDim.x;
    for (index_t t = (index_t)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += step) {
        index_t rest = t;
        const int chunk = next_digit(rest, chunks);
        const int grp = next_digit(rest, g.G);
        const index_t pixel = rest;  // (n, i, j) flattened
        const int j = next_digit(rest, g.Wo);
        const int i = next_digit(rest, g.Ho);
        const index_t n = rest;
        const int c0 = grp * group_channels + chunk * kChannels;
        const int count = group_channels - chunk * kChannels;

        const scalar_t* w_pix = weight + (pixel * g.G + grp) * taps;
        acc_t acc[kChannels];
        acc_t xs[kChannels];
#pragma unroll
        for (int k = 0; k < kChannels; ++k) acc[k] = 0;
        for (int u = 0; u < g.K; ++u) {
            const int h = i * g.stride - g.pad + u * g.dil;
            if (h < 0 || h >= g.H) continue;
            const scalar_t* x_row = x + (n * g.H + h) * g.W * g.C + c0;
            for (int v = 0; v < g.K; ++v) {
                const int w = j * g.stride - g.pad + v * g.dil;
                if (w < 0 || w >= g.W) continue;
                const acc_t wv = to_acc(w_pix[u * g.K + v]);
                load_channels(x_row + (index_t)w * g.C, count, xs);
#pragma unroll
                for (int k = 0; k < kChannels; ++k) acc[k] += wv * xs[k];
            }
        }
        store_channels(out + pixel * g.C + c0, count, acc);
    }
}

// Grad-input, NHWC. One thread: input pixel (n, h, w), a run of up to kChannels channels of group g. Gathers over
// the taps (u, v) whose output pixel (i, j) read it: weight[n, i, j, g, u, v] and grad_out[n, i, j, c0 ...];
// writes grad_x[n, h, w, c0 ...] (zero where no window reaches).
template <typename index_t>
__device__ __forceinline__ void grad_input_nhwc_impl(const scalar_t* __restrict__ grad_out,
                                                     const scalar_t* __restrict__ weight,
                                                     scalar_t* __restrict__ grad_x, const Geometry g) {
    const int group_channels = g.C / g.G;
    const int chunks = (group_channels + kChannels - 1) / kChannels;
    const int taps = g.K * g.K;
    const index_t total = (index_t)g.N * g.H * g.W * g.G * chunks;
    const index_t step = (index_t)blockDim.x * gridDim.x;
    for (index_t t = (index_t)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += step) {
        index_t rest = t;
        const int chunk = next_digit(rest, chunks);
        const int grp = next_digit(rest, g.G);
        const index_t pixel = rest;  // (n, h, w) flattened
        const int w = next_digit(rest, g.W);
        const int h = next_digit(rest, g.H);
        const index_t n = rest;
        const int c0 = grp * group_channels + chunk * kChannels;
        const int count = group_channels - chunk * kChannels;

        acc_t acc[kChannels];
        acc_t gs[kChannels];
#pragma unroll
        for (int k = 0; k < kChannels; ++k) acc[k] = 0;
        for (int u = 0; u < g.K; ++u) {
            const int hs = h + g.pad - u * g.dil;  // output row i read this row when i * stride == hs
            if (hs < 0 || hs % g.stride != 0 || hs / g.stride >= g.Ho) continue;
            const index_t out_row = n * g.Ho + hs / g.stride;
            for (int v = 0; v < g.K; ++v) {
                const int ws = w + g.pad - v * g.dil;
                if (ws < 0 || ws % g.stride != 0 || ws / g.stride >= g.Wo) continue;
                const index_t out_pixel = out_row * g.Wo + ws / g.stride;
                const acc_t wv = to_acc(weight[(out_pixel * g.G + grp) * taps + u * g.K + v]);
                load_channels(grad_out + out_pixel * g.C + c0, count, gs);
#pragma unroll
                for (int k = 0; k < kChannels; ++k) acc[k] += wv * gs[k];
            }
        }
        store_channels(grad_x + pixel * g.C + c0, count, acc);
    }
}

// Grad-weight, NHWC. One thread: output pixel (n, i, j) and group g, all K*K taps. Reads grad_out[n, i, j, ...] of
// the group's channels (once, when the group fits in one run of kChannels) and x over the window; writes
// grad_weight[n, i, j, g, u, v] for every tap (adjacent in memory), each the sum over the group's channels.
template <typename index_t>
__device__ __forceinline__ void grad_weight_nhwc_impl(const scalar_t* __restrict__ grad_out,
                                                      const scalar_t* __restrict__ x,
                                                      scalar_t* __restrict__ grad_weight, const Geometry g) {
    const int group_channels = g.C / g.G;
    const int chunks = (group_channels + kChannels - 1) / kChannels;
    const int taps = g.K * g.K;
    const index_t total = (index_t)g.N * g.Ho * g.Wo * g.G;
    const index_t step = (index_t)blockDim.x * gridDim.x;
    for (index_t t = (index_t)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += step) {
        index_t rest = t;
        const int grp = next_digit(rest, g.G);
        const index_t pixel = rest;  // (n, i, j) flattened
        const int j = next_digit(rest, g.Wo);
        const int i = next_digit(rest, g.Ho);
        const index_t n = rest;
        const scalar_t* gy_pix = grad_out + pixel * g.C + grp * group_channels;
        const index_t x_channel0 = (index_t)grp * group_channels;
        scalar_t* gw_pix = grad_weight + t * taps;

        acc_t gy[kChannels];
        acc_t xs[kChannels];
        if (chunks == 1) load_channels(gy_pix, group_channels, gy);
        for (int u = 0; u < g.K; ++u) {
            const int h = i * g.stride - g.pad + u * g.dil;
            for (int v = 0; v < g.K; ++v) {
                const int w = j * g.stride - g.pad + v * g.dil;
                acc_t sum = 0;
                if (h >= 0 && h < g.H && w >= 0 && w < g.W) {
                    const scalar_t* x_pix = x + ((n * g.H + h) * g.W + w) * g.C + x_channel0;
                    for (int chunk = 0; chunk < chunks; ++chunk) {
                        const int c0 = chunk * kChannels;
                        if (chunks != 1) load_channels(gy_pix + c0, group_channels - c0, gy);
                        load_channels(x_pix + c0, group_channels - c0, xs);
#pragma unroll
                        for (int k = 0; k < kChannels; ++k) sum += gy[k] * xs[k];
                    }
                }
                from_acc(sum, &gw_pix[u * g.K + v]);
            }
        }
    }
}

// Entry points, looked up by name from ops/cupy_backend.py. Arguments: three pointers, then the eleven sizes of
// Geometry in order (all int32).
#define INVOLUTION_SIZE_PARAMS int N, int C, int H, int W, int G, int K, int Ho, int Wo, int stride, int pad, int dil
#define INVOLUTION_GEOMETRY Geometry{N, C, H, W, G, K, Ho, Wo, stride, pad, dil}

// A launch with more threads per block than INVOLUTION_BLOCK_SIZE fails; cupy_backend.plan_launch uses exactly it.
#define INVOLUTION_ENTRY(name, impl, index_t, a, b, out)                                                   \
    extern "C" __global__ void __launch_bounds__(INVOLUTION_BLOCK_SIZE, INVOLUTION_MIN_BLOCKS)                 \
        name(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, scalar_t* __restrict__ out,       \
             INVOLUTION_SIZE_PARAMS) {                                                                         \
        impl<index_t>(a, b, out, INVOLUTION_GEOMETRY);                                                         \
    }

#if !defined(INVOLUTION_INDEX_BITS) || INVOLUTION_INDEX_BITS == 32
INVOLUTION_ENTRY(involution_forward_i32, forward_impl, int, x, weight, out)
INVOLUTION_ENTRY(involution_grad_input_i32, grad_input_impl, int, grad_out, weight, grad_x)
INVOLUTION_ENTRY(involution_grad_weight_i32, grad_weight_impl, int, grad_out, x, grad_weight)
INVOLUTION_ENTRY(involution_forward_nhwc_i32, forward_nhwc_impl, int, x, weight, out)
INVOLUTION_ENTRY(involution_grad_input_nhwc_i32, grad_input_nhwc_impl, int, grad_out, weight, grad_x)
INVOLUTION_ENTRY(involution_grad_weight_nhwc_i32, grad_weight_nhwc_impl, int, grad_out, x, grad_weight)
#endif
#if !defined(INVOLUTION_INDEX_BITS) || INVOLUTION_INDEX_BITS == 64
INVOLUTION_ENTRY(involution_forward_i64, forward_impl, long long, x, weight, out)
INVOLUTION_ENTRY(involution_grad_input_i64, grad_input_impl, long long, grad_out, weight, grad_x)
INVOLUTION_ENTRY(involution_grad_weight_i64, grad_weight_impl, long long, grad_out, x, grad_weight)
INVOLUTION_ENTRY(involution_forward_nhwc_i64, forward_nhwc_impl, long long, x, weight, out)
INVOLUTION_ENTRY(involution_grad_input_nhwc_i64, grad_input_nhwc_impl, long long, grad_out, weight, grad_x)
INVOLUTION_ENTRY(involution_grad_weight_nhwc_i64, grad_weight_nhwc_impl, long long, grad_out, x, grad_weight)
#endif
