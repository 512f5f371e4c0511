// Involution forward, grad-input and grad-weight kernels (compiled at run time by NVRTC through CuPy).
//
//   out[n, c, i, j] = sum_{u,v < K} weight[n, g, u, v, i, j] * x[n, c, i*s + u*d - p, j*s + v*d - p],
//   g = c / (C / G), x read as zero outside the image.
//
// All tensors are contiguous: x, grad_x (N, C, H, W); weight, grad_weight (N, G, K, K, Ho, Wo); out, grad_out
// (N, C, Ho, Wo). Sizes are kernel arguments, so one compiled module serves every shape.
//
// The element type is chosen when compiling: -DINVOLUTION_SCALAR=float | double | __half | __nv_bfloat16.
// Sums are accumulated in float (double for double). Each kernel has a 32-bit index variant (_i32), used when
// every tensor has fewer than 2^31 elements, and a 64-bit one (_i64).
//
// The op is memory bound, so the kernels are shaped to move each byte once:
// - one thread handles up to INVOLUTION_CHANNELS_PER_THREAD channels of a group at one pixel, keeping their
//   sums in registers, so each generated weight is loaded once per thread instead of once per channel;
// - consecutive threads take consecutive columns, so loads and stores are coalesced along W;
// - no shared memory, atomics or synchronisation: every thread's work is independent of the others', which
//   also lets the test suite run this same file on the CPU (tests/host_emulation).

#ifndef INVOLUTION_HOST_EMULATION
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#endif

#ifndef INVOLUTION_SCALAR
#define INVOLUTION_SCALAR float
#endif

// Registers per thread grow with this; 16 is RedNet's channels per group.
#ifndef INVOLUTION_CHANNELS_PER_THREAD
#define INVOLUTION_CHANNELS_PER_THREAD 16
#endif

typedef INVOLUTION_SCALAR scalar_t;
constexpr int kChannelsPerThread = INVOLUTION_CHANNELS_PER_THREAD;

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

// Shapes shared by the three kernels.
struct Geometry {
    int N, C, H, W, G, K, Ho, Wo, stride, pad, dil;
};

// Forward. One thread: output pixel (i, j) of sample n for a run of up to kChannelsPerThread channels of group
// g. Reads the K*K weights weight[n, g, :, :, i, j] once each and x over the K*K window of each of its channels;
// writes out[n, c, i, j] for its channels.
template <typename index_t>
__device__ __forceinline__ void forward_impl(const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                                             scalar_t* __restrict__ out, const Geometry g) {
    const int group_channels = g.C / g.G;
    const int chunks = (group_channels + kChannelsPerThread - 1) / kChannelsPerThread;
    const index_t in_plane = (index_t)g.H * g.W;
    const index_t out_plane = (index_t)g.Ho * g.Wo;
    const index_t total = (index_t)g.N * g.G * chunks * out_plane;
    const index_t step = (index_t)blockDim.x * gridDim.x;
    for (index_t t = (index_t)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += step) {
        const int j = (int)(t % g.Wo);
        index_t rest = t / g.Wo;
        const int i = (int)(rest % g.Ho);
        rest /= g.Ho;
        const int chunk = (int)(rest % chunks);
        rest /= chunks;
        const int grp = (int)(rest % g.G);
        const index_t n = rest / g.G;
        const int c0 = grp * group_channels + chunk * kChannelsPerThread;
        const int count = group_channels - chunk * kChannelsPerThread;  // channels of this run, clipped below

        const scalar_t* x_n = x + (n * g.C + c0) * in_plane;
        const scalar_t* w_pix = weight + (n * g.G + grp) * g.K * g.K * out_plane + (index_t)i * g.Wo + j;
        acc_t acc[kChannelsPerThread];
#pragma unroll
        for (int k = 0; k < kChannelsPerThread; ++k) acc[k] = 0;

        const int h0 = i * g.stride - g.pad;
        const int w0 = j * g.stride - g.pad;
        for (int u = 0; u < g.K; ++u) {
            const int h = h0 + u * g.dil;
            if (h < 0 || h >= g.H) continue;
            for (int v = 0; v < g.K; ++v) {
                const int w = w0 + v * g.dil;
                if (w < 0 || w >= g.W) continue;
                const acc_t wv = to_acc(w_pix[(index_t)(u * g.K + v) * out_plane]);
                const scalar_t* x_hw = x_n + (index_t)h * g.W + w;
#pragma unroll
                for (int k = 0; k < kChannelsPerThread; ++k) {
                    if (k < count) acc[k] += wv * to_acc(x_hw[k * in_plane]);
                }
            }
        }
        scalar_t* out_pix = out + (n * g.C + c0) * out_plane + (index_t)i * g.Wo + j;
#pragma unroll
        for (int k = 0; k < kChannelsPerThread; ++k) {
            if (k < count) from_acc(acc[k], &out_pix[k * out_plane]);
        }
    }
}

// Grad-input. One thread: input pixel (h, w) of sample n for a run of up to kChannelsPerThread channels of group
// g. Gathers over the K*K window positions (u, v) whose output pixel (i, j) read (h, w): reads weight[n, g, u, v,
// i, j] once each and grad_out[n, c, i, j] of its channels; writes grad_x[n, c, h, w] for its channels (zero for
// pixels no window reaches).
template <typename index_t>
__device__ __forceinline__ void grad_input_impl(const scalar_t* __restrict__ grad_out,
                                                const scalar_t* __restrict__ weight, scalar_t* __restrict__ grad_x,
                                                const Geometry g) {
    const int group_channels = g.C / g.G;
    const int chunks = (group_channels + kChannelsPerThread - 1) / kChannelsPerThread;
    const index_t in_plane = (index_t)g.H * g.W;
    const index_t out_plane = (index_t)g.Ho * g.Wo;
    const index_t total = (index_t)g.N * g.G * chunks * in_plane;
    const index_t step = (index_t)blockDim.x * gridDim.x;
    for (index_t t = (index_t)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += step) {
        const int w = (int)(t % g.W);
        index_t rest = t / g.W;
        const int h = (int)(rest % g.H);
        rest /= g.H;
        const int chunk = (int)(rest % chunks);
        rest /= chunks;
        const int grp = (int)(rest % g.G);
        const index_t n = rest / g.G;
        const int c0 = grp * group_channels + chunk * kChannelsPerThread;
        const int count = group_channels - chunk * kChannelsPerThread;

        const scalar_t* gy_n = grad_out + (n * g.C + c0) * out_plane;
        const scalar_t* w_ng = weight + (n * g.G + grp) * g.K * g.K * out_plane;
        acc_t acc[kChannelsPerThread];
#pragma unroll
        for (int k = 0; k < kChannelsPerThread; ++k) acc[k] = 0;

        for (int u = 0; u < g.K; ++u) {
            // Output row i read this row when i * stride = h + pad - u * dil.
            const int hs = h + g.pad - u * g.dil;
            if (hs < 0 || hs % g.stride != 0) continue;
            const int i = hs / g.stride;
            if (i >= g.Ho) continue;
            for (int v = 0; v < g.K; ++v) {
                const int ws = w + g.pad - v * g.dil;
                if (ws < 0 || ws % g.stride != 0) continue;
                const int j = ws / g.stride;
                if (j >= g.Wo) continue;
                const index_t pix = (index_t)i * g.Wo + j;
                const acc_t wv = to_acc(w_ng[(index_t)(u * g.K + v) * out_plane + pix]);
                const scalar_t* gy_pix = gy_n + pix;
#pragma unroll
                for (int k = 0; k < kChannelsPerThread; ++k) {
                    if (k < count) acc[k] += wv * to_acc(gy_pix[k * out_plane]);
                }
            }
        }
        scalar_t* gx_pix = grad_x + (n * g.C + c0) * in_plane + (index_t)h * g.W + w;
#pragma unroll
        for (int k = 0; k < kChannelsPerThread; ++k) {
            if (k < count) from_acc(acc[k], &gx_pix[k * in_plane]);
        }
    }
}

// Grad-weight. One thread: output pixel (i, j) of sample n and group g, all K*K weights. Reads grad_out[n, c, i,
// j] of the group's channels once into registers (per run of kChannelsPerThread channels) and x over the window
// of each channel; writes grad_weight[n, g, u, v, i, j] for every (u, v), each the sum over the group's channels.
template <typename index_t>
__device__ __forceinline__ void grad_weight_impl(const scalar_t* __restrict__ grad_out,
                                                 const scalar_t* __restrict__ x,
                                                 scalar_t* __restrict__ grad_weight, const Geometry g) {
    const int group_channels = g.C / g.G;
    const int chunks = (group_channels + kChannelsPerThread - 1) / kChannelsPerThread;
    const index_t in_plane = (index_t)g.H * g.W;
    const index_t out_plane = (index_t)g.Ho * g.Wo;
    const index_t total = (index_t)g.N * g.G * out_plane;
    const index_t step = (index_t)blockDim.x * gridDim.x;
    for (index_t t = (index_t)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += step) {
        const int j = (int)(t % g.Wo);
        index_t rest = t / g.Wo;
        const int i = (int)(rest % g.Ho);
        rest /= g.Ho;
        const int grp = (int)(rest % g.G);
        const index_t n = rest / g.G;
        const index_t pix = (index_t)i * g.Wo + j;

        const scalar_t* gy_pix = grad_out + (n * g.C + (index_t)grp * group_channels) * out_plane + pix;
        const scalar_t* x_ng = x + (n * g.C + (index_t)grp * group_channels) * in_plane;
        scalar_t* gw_pix = grad_weight + (n * g.G + grp) * g.K * g.K * out_plane + pix;

        // grad_out of one run of channels; loaded once when the group fits in one run (RedNet: 16 channels).
        acc_t gy[kChannelsPerThread];
        if (chunks == 1) {
#pragma unroll
            for (int k = 0; k < kChannelsPerThread; ++k) gy[k] = k < group_channels ? to_acc(gy_pix[k * out_plane]) : 0;
        }

        const int h0 = i * g.stride - g.pad;
        const int w0 = j * g.stride - g.pad;
        for (int u = 0; u < g.K; ++u) {
            const int h = h0 + u * g.dil;
            for (int v = 0; v < g.K; ++v) {
                const int w = w0 + v * g.dil;
                acc_t sum = 0;
                if (h >= 0 && h < g.H && w >= 0 && w < g.W) {
                    for (int chunk = 0; chunk < chunks; ++chunk) {
                        const int c0 = chunk * kChannelsPerThread;
                        const int count = group_channels - c0;
                        if (chunks != 1) {
#pragma unroll
                            for (int k = 0; k < kChannelsPerThread; ++k)
                                gy[k] = k < count ? to_acc(gy_pix[(c0 + k) * out_plane]) : 0;
                        }
                        const scalar_t* x_hw = x_ng + c0 * in_plane + (index_t)h * g.W + w;
#pragma unroll
                        for (int k = 0; k < kChannelsPerThread; ++k) {
                            if (k < count) sum += gy[k] * to_acc(x_hw[k * in_plane]);
                        }
                    }
                }
                from_acc(sum, &gw_pix[(index_t)(u * g.K + v) * out_plane]);
            }
        }
    }
}

// Entry points, looked up by name from ops/cupy_backend.py. Arguments: three pointers, then the eleven sizes of
// Geometry in order (all int32).
#define INVOLUTION_SIZE_PARAMS                                                                                   \
    int N, int C, int H, int W, int G, int K, int Ho, int Wo, int stride, int pad, int dil
#define INVOLUTION_GEOMETRY Geometry{N, C, H, W, G, K, Ho, Wo, stride, pad, dil}

extern "C" __global__ void involution_forward_i32(const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                                                  scalar_t* __restrict__ out, INVOLUTION_SIZE_PARAMS) {
    forward_impl<int>(x, weight, out, INVOLUTION_GEOMETRY);
}
extern "C" __global__ void involution_forward_i64(const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                                                  scalar_t* __restrict__ out, INVOLUTION_SIZE_PARAMS) {
    forward_impl<long long>(x, weight, out, INVOLUTION_GEOMETRY);
}
extern "C" __global__ void involution_grad_input_i32(const scalar_t* __restrict__ grad_out,
                                                     const scalar_t* __restrict__ weight,
                                                     scalar_t* __restrict__ grad_x, INVOLUTION_SIZE_PARAMS) {
    grad_input_impl<int>(grad_out, weight, grad_x, INVOLUTION_GEOMETRY);
}
extern "C" __global__ void involution_grad_input_i64(const scalar_t* __restrict__ grad_out,
                                                     const scalar_t* __restrict__ weight,
                                                     scalar_t* __restrict__ grad_x, INVOLUTION_SIZE_PARAMS) {
    grad_input_impl<long long>(grad_out, weight, grad_x, INVOLUTION_GEOMETRY);
}
extern "C" __global__ void involution_grad_weight_i32(const scalar_t* __restrict__ grad_out,
                                                      const scalar_t* __restrict__ x,
                                                      scalar_t* __restrict__ grad_weight, INVOLUTION_SIZE_PARAMS) {
    grad_weight_impl<int>(grad_out, x, grad_weight, INVOLUTION_GEOMETRY);
}
extern "C" __global__ void involution_grad_weight_i64(const scalar_t* __restrict__ grad_out,
                                                      const scalar_t* __restrict__ x,
                                                      scalar_t* __restrict__ grad_weight, INVOLUTION_SIZE_PARAMS) {
    grad_weight_impl<long long>(grad_out, x, grad_weight, INVOLUTION_GEOMETRY);
}
