// Involution forward, grad-input and grad-weight for the CPU (built on first use by ops/cpu_backend.py).
//
//   out[n, c, i, j] = sum_{u,v < K} weight[n, g, u, v, i, j] * x[n, c, i*s + u*d - p, j*s + v*d - p],
//   g = c / (C / G), x read as zero outside the image.
//
// Plain C++ (no torch headers) with an extern "C" API on raw pointers, element strides and sizes, so every memory
// layout (NCHW, channels_last with pixel-major kernels, any non-contiguous view) runs without copies to a canonical
// layout. Work is split into items (n, g, block of kRows rows), each computed by one thread from start to end:
// an item packs what it reads into small thread-local buffers (the group's input rows, zero-padded and split by
// stride phase so that every read of the hot loops is contiguous; the kernels' and grad_out's rows), then runs
// loops vectorized over kLanes adjacent output pixels with the sums in registers. Each output element is summed
// by one thread in a fixed order (taps u, v for out and grad_x, the group's channels for grad_weight), the way the
// CUDA kernels do (ops/kernels/involution.cu), so results do not depend on the thread count. Sums accumulate in
// float (double for double); bfloat16 is converted on packing and rounded to nearest even on storing.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

typedef int64_t i64;

struct bf16 {
    uint16_t bits;
};

static inline float to_acc(float v) { return v; }
static inline double to_acc(double v) { return v; }
static inline float to_acc(bf16 v) {
    const uint32_t u = uint32_t(v.bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
static inline void from_acc(float v, float* out) { *out = v; }
static inline void from_acc(double v, double* out) { *out = v; }
static inline void from_acc(float v, bf16* out) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays a (quiet) NaN
        out->bits = uint16_t((u >> 16) | 0x40);
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    out->bits = uint16_t(u >> 16);
}

template <typename S> struct Acc { typedef float type; };
template <> struct Acc<double> { typedef double type; };

// Sizes (int32 from Python, in this order).
struct Geo {
    int N, C, H, W, G, K, Ho, Wo, s, p, d;
};

// A strided 4-D image (n, c, h, w) or 6-D kernel tensor (n, g, u, v, i, j); strides in elements.
template <typename S> struct Image {
    S* base;
    i64 sn, sc, sh, sw;
    S& at(i64 n, i64 c, i64 h, i64 w) const { return base[n * sn + c * sc + h * sh + w * sw]; }
};
template <typename S> struct Kernels {
    S* base;
    i64 sn, sg, su, sv, si, sj;
    S& at(i64 n, i64 g, int u, int v, i64 i, i64 j) const {
        return base[n * sn + g * sg + u * su + v * sv + i * si + j * sj];
    }
};

constexpr int kRows = 8;      // rows of output (grad_x for grad-input) per work item
constexpr int kChannels = 4;  // channels summed side by side (forward, grad-input); taps side by side (grad-weight)

// kLanes adjacent pixels as one 64-byte vector (GCC/Clang vector extensions: one AVX-512 register, two AVX2 ones,
// four SSE ones, whatever the target has). Loads and stores go through memcpy: no alignment is assumed.
typedef float vec_float __attribute__((vector_size(64)));
typedef double vec_double __attribute__((vector_size(64)));
template <typename A> struct Vec { typedef vec_float type; };
template <> struct Vec<double> { typedef vec_double type; };
template <typename A> struct Lanes { static constexpr int value = int(64 / sizeof(A)); };

template <typename A> static inline typename Vec<A>::type load(const A* p) {
    typename Vec<A>::type v;
    std::memcpy(&v, p, sizeof(v));
    return v;
}
template <typename A> static inline void spill(const typename Vec<A>::type& v, A* p) { std::memcpy(p, &v, sizeof(v)); }

static inline int round_up(int a, int b) { return (a + b - 1) / b * b; }

// dst[q] = src[q * stride] for q < count, converted to the accumulation type (a plain, vectorized loop when the
// source is contiguous).
template <typename S, typename A> static inline void copy_row(const S* src, i64 stride, int count, A* dst) {
    if (stride == 1) {
        for (int q = 0; q < count; ++q) dst[q] = to_acc(src[q]);
    } else {
        for (int q = 0; q < count; ++q) dst[q] = to_acc(src[q * stride]);
    }
}

// One work item's decomposition: item -> (n, g, first row).
struct Item {
    int n, g, r0, r1;
};
static inline Item item_of(i64 t, int G, int rows, int blocks) {
    Item it;
    const int b = int(t % blocks);
    t /= blocks;
    it.g = int(t % G);
    it.n = int(t / G);
    it.r0 = b * kRows;
    it.r1 = std::min(rows, it.r0 + kRows);
    return it;
}

// Runs body(t) for every item; each thread works on its own copy of body (its own buffers).
template <typename F> static void parallel_items(i64 items, int threads, const F& body) {
    if (items <= 0) return;
#ifdef _OPENMP
    if (threads > 1 && items > 1) {
#pragma omp parallel num_threads(int(std::min<i64>(threads, items)))
        {
            F local = body;
            local.init();
#pragma omp for schedule(dynamic, 1)
            for (i64 t = 0; t < items; ++t) local(t);
        }
        return;
    }
#endif
    (void)threads;
    F local = body;
    local.init();
    for (i64 t = 0; t < items; ++t) local(t);
}

// The padded input rows an item reads: slab[c][row][phase][q] = x[n, c0 + c, row0 + row - p, q*s + phase - p]
// (zero outside the image), so the input of output column j at tap v is slab[...][(v*d) % s][j + (v*d) / s].
template <typename S, typename A> struct Slab {
    int R, Q, s;
    std::vector<A> data;
    void size(int rows, int q, int stride, int channels) {
        R = rows, Q = q, s = stride;
        data.resize(size_t(channels) * R * s * Q);
    }
    A* row(int c, int r, int phase) { return data.data() + ((size_t(c) * R + r) * s + phase) * Q; }
    void pack(const Image<const S>& x, const Geo& g, int n, int c0, int channels, int row0) {
        for (int c = 0; c < channels; ++c) {
            for (int r = 0; r < R; ++r) {
                const int h = row0 + r - g.p;
                for (int phase = 0; phase < s; ++phase) {
                    A* dst = row(c, r, phase);
                    if (h < 0 || h >= g.H) {
                        std::fill(dst, dst + Q, A(0));
                        continue;
                    }
                    // Columns q read x[..., q*s + phase - p]: inside the image for q in [qlo, qhi).
                    const int qlo = std::min(Q, std::max(0, (g.p - phase + s - 1) / s));
                    const int qhi = std::max(qlo, std::min(Q, (g.W - 1 + g.p - phase) / s + 1));
                    std::fill(dst, dst + qlo, A(0));
                    copy_row(&x.at(n, c0 + c, h, i64(qlo) * s + phase - g.p), x.sw * s, qhi - qlo, dst + qlo);
                    std::fill(dst + qhi, dst + Q, A(0));
                }
            }
        }
    }
};

// ---------------------------------------------------------------------------------------------------------------
// Forward. Item (n, g, rows i0..i1). For each row: the K*K kernel rows are packed to wrow[t][j] (zero past Wo),
// then kChannels channels at a time, kLanes pixels at a time: acc[k][j] = sum_t wrow[t][j] * slab[k][...][j].
template <typename S> struct Forward {
    typedef typename Acc<S>::type A;
    static constexpr int L = Lanes<A>::value;
    Image<const S> x;
    Kernels<const S> w;
    Image<S> out;
    Geo g;
    int cg, wop, q, slab_rows;
    Slab<S, A> slab;
    std::vector<A> wrow;
    std::vector<int> columns;  // offset in a slab row of tap v's input: phase (v*d) % s, column (v*d) / s

    void init() {
        slab.size(slab_rows, q, g.s, cg);
        wrow.resize(size_t(g.K) * g.K * kRows * wop);
        for (int v = 0; v < g.K; ++v) columns.push_back((v * g.d) % g.s * q + (v * g.d) / g.s);
    }
    template <int CB> void channels(int li, int i, int n, int grp, int c0) {
        const int K = g.K;
        const int* column = columns.data();
        for (int jb = 0; jb < wop; jb += L) {
            typename Vec<A>::type acc[CB];
            for (int k = 0; k < CB; ++k) acc[k] = typename Vec<A>::type{};
            for (int u = 0; u < K; ++u) {
                const int h = i * g.s - g.p + u * g.d;
                if (h < 0 || h >= g.H) continue;  // a row of padding adds nothing
                const int r = li * g.s + u * g.d;
                const A* xr[CB];
                for (int k = 0; k < CB; ++k) xr[k] = slab.row(c0 + k, r, 0) + jb;
                const A* wr = wrow.data() + (size_t(u * K) * kRows + li) * wop + jb;
                for (int v = 0; v < K; ++v) {
                    const auto wv = load(wr + size_t(v) * kRows * wop);
                    const int off = column[v];
                    for (int k = 0; k < CB; ++k) acc[k] += wv * load(xr[k] + off);
                }
            }
            const int count = std::min(L, g.Wo - jb);
            A sums[L];
            for (int k = 0; k < CB; ++k) {
                spill(acc[k], sums);
                for (int e = 0; e < count; ++e) from_acc(sums[e], &out.at(n, i64(grp) * cg + c0 + k, i, jb + e));
            }
        }
    }
    void operator()(i64 t) {
        const int blocks = (g.Ho + kRows - 1) / kRows;
        const Item it = item_of(t, g.G, g.Ho, blocks);
        slab.pack(x, g, it.n, it.g * cg, cg, it.r0 * g.s);
        const int K = g.K;
        // The kernels of the item's rows, wrow[t][row][j]: tap by tap, so each tap's rows stream in one run.
        for (int t = 0; t < K * K; ++t)
            for (int i = it.r0; i < it.r1; ++i) {
                A* dst = wrow.data() + (size_t(t) * kRows + i - it.r0) * wop;
                copy_row(&w.at(it.n, it.g, t / K, t % K, i, 0), w.sj, g.Wo, dst);
                std::fill(dst + g.Wo, dst + wop, A(0));
            }
        for (int i = it.r0; i < it.r1; ++i) {
            int c0 = 0;
            for (; c0 + kChannels <= cg; c0 += kChannels) channels<kChannels>(i - it.r0, i, it.n, it.g, c0);
            for (; c0 < cg; ++c0) channels<1>(i - it.r0, i, it.n, it.g, c0);
        }
    }
};

// Grad-weight. Item (n, g, rows i0..i1): same slab as the forward, plus grad_out's rows gy[c][j]. For each row,
// kChannels taps at a time, kLanes pixels at a time: acc[t][j] = sum_c gy[c][j] * slab[c][...][j], c ascending.
template <typename S> struct GradWeight {
    typedef typename Acc<S>::type A;
    static constexpr int L = Lanes<A>::value;
    Image<const S> gy;
    Image<const S> x;
    Kernels<S> gw;
    Geo g;
    int cg, wop, q, slab_rows;
    Slab<S, A> slab;
    std::vector<A> gyrow;

    void init() {
        slab.size(slab_rows, q, g.s, cg);
        gyrow.resize(size_t(cg) * wop);
    }
    template <int TB> void taps(int li, int i, int n, int grp, int t0) {
        const int K = g.K;
        i64 off[TB];  // offset of tap k's input row in channel 0's slab (the channel step is R*s*Q)
        bool inside[TB];
        for (int k = 0; k < TB; ++k) {
            const int u = (t0 + k) / K, v = (t0 + k) % K;
            const int h = i * g.s - g.p + u * g.d;
            inside[k] = h >= 0 && h < g.H;
            off[k] = slab.row(0, li * g.s + u * g.d, (v * g.d) % g.s) - slab.row(0, 0, 0) + (v * g.d) / g.s;
        }
        const i64 channel_step = i64(slab.R) * slab.s * slab.Q;
        for (int jb = 0; jb < wop; jb += L) {
            typename Vec<A>::type acc[TB];
            for (int k = 0; k < TB; ++k) acc[k] = typename Vec<A>::type{};
            const A* xc = slab.row(0, 0, 0) + jb;
            for (int c = 0; c < cg; ++c, xc += channel_step) {
                const auto gv = load(gyrow.data() + size_t(c) * wop + jb);
                for (int k = 0; k < TB; ++k) acc[k] += gv * load(xc + off[k]);
            }
            const int count = std::min(L, g.Wo - jb);
            A sums[L];
            for (int k = 0; k < TB; ++k) {
                const int u = (t0 + k) / K, v = (t0 + k) % K;
                spill(acc[k], sums);
                for (int e = 0; e < count; ++e) from_acc(inside[k] ? sums[e] : A(0), &gw.at(n, grp, u, v, i, jb + e));
            }
        }
    }
    void operator()(i64 t) {
        const int blocks = (g.Ho + kRows - 1) / kRows;
        const Item it = item_of(t, g.G, g.Ho, blocks);
        slab.pack(x, g, it.n, it.g * cg, cg, it.r0 * g.s);
        const int taps_total = g.K * g.K;
        for (int i = it.r0; i < it.r1; ++i) {
            for (int c = 0; c < cg; ++c) {
                A* dst = gyrow.data() + size_t(c) * wop;
                copy_row(&gy.at(it.n, i64(it.g) * cg + c, i, 0), gy.sw, g.Wo, dst);
                std::fill(dst + g.Wo, dst + wop, A(0));
            }
            int t0 = 0;
            for (; t0 + kChannels <= taps_total; t0 += kChannels) taps<kChannels>(i - it.r0, i, it.n, it.g, t0);
            for (; t0 < taps_total; ++t0) taps<1>(i - it.r0, i, it.n, it.g, t0);
        }
    }
};

// Grad-input. Item (n, g, rows h0..h1 of grad_x). Packs the rows of grad_out and of the kernels that reach them,
// gy[c][row][lp + j] and wk[row][t][lp + j], zero outside 0 <= j < Wo. Input column w = m*s + phase - p (m a
// column of that phase) was read at tap v, when (v*d) % s == phase, by output column j = m - (v*d) / s; so, per
// phase, kLanes columns at a time: acc[k][m] = sum_{u, v} wk[i][t][m - a] * gy[k][i][m - a], u and v ascending.
template <typename S> struct GradInput {
    typedef typename Acc<S>::type A;
    static constexpr int L = Lanes<A>::value;
    Image<const S> gy;
    Kernels<const S> w;
    Image<S> gx;
    Geo g;
    int cg, lp, len, max_rows;
    std::vector<A> gyb, wkb;

    void init() {
        gyb.resize(size_t(cg) * max_rows * len);
        wkb.resize(size_t(max_rows) * g.K * g.K * len);
    }
    A* gy_row(int c, int r) { return gyb.data() + (size_t(c) * max_rows + r) * len; }
    A* wk_row(int r, int t) { return wkb.data() + (size_t(r) * g.K * g.K + t) * len; }

    template <int CB> void channels(int h, int ilo, int rows, int n, int grp, int c0) {
        const int K = g.K, s = g.s;
        for (int phase = 0; phase < s; ++phase) {
            // Columns w = m*s + phase - p inside the image.
            const int mlo = (g.p - phase + s - 1) / s > 0 ? (g.p - phase + s - 1) / s : 0;
            const int mhi = (g.p + g.W - 1 - phase) / s;  // inclusive
            if (mhi < mlo) continue;
            for (int mb = mlo; mb <= mhi; mb += L) {
                typename Vec<A>::type acc[CB];
                for (int k = 0; k < CB; ++k) acc[k] = typename Vec<A>::type{};
                for (int u = 0; u < K; ++u) {
                    const int hs = h + g.p - u * g.d;
                    if (hs < 0 || hs % s != 0 || hs / s >= g.Ho) continue;
                    const int r = hs / s - ilo;
                    if (r < 0 || r >= rows) continue;
                    for (int v = 0; v < K; ++v) {
                        if ((v * g.d) % s != phase) continue;
                        const int start = lp + mb - (v * g.d) / s;
                        const auto wv = load(wk_row(r, u * K + v) + start);
                        for (int k = 0; k < CB; ++k) acc[k] += wv * load(gy_row(c0 + k, r) + start);
                    }
                }
                const int count = std::min(L, mhi - mb + 1);
                A sums[L];
                for (int k = 0; k < CB; ++k) {
                    spill(acc[k], sums);
                    for (int e = 0; e < count; ++e)
                        from_acc(sums[e], &gx.at(n, i64(grp) * cg + c0 + k, h, i64(mb + e) * s + phase - g.p));
                }
            }
        }
    }
    void operator()(i64 t) {
        const int blocks = (g.H + kRows - 1) / kRows;
        const Item it = item_of(t, g.G, g.H, blocks);
        const int K = g.K, s = g.s;
        // Output rows i with i*s = h + p - u*d for some h of the item and some u.
        int ilo = it.r0 + g.p - (K - 1) * g.d;
        ilo = ilo <= 0 ? 0 : (ilo + s - 1) / s;
        const int ihi = std::min(g.Ho - 1, (it.r1 - 1 + g.p) / s);
        const int rows = ihi >= ilo ? ihi - ilo + 1 : 0;
        for (int r = 0; r < rows; ++r) {
            const int i = ilo + r;
            for (int c = 0; c < cg; ++c) {
                A* dst = gy_row(c, r);
                std::fill(dst, dst + len, A(0));
                copy_row(&gy.at(it.n, i64(it.g) * cg + c, i, 0), gy.sw, g.Wo, dst + lp);
            }
        }
        for (int t = 0; t < K * K; ++t)  // tap by tap, so each tap's rows stream in one run
            for (int r = 0; r < rows; ++r) {
                A* dst = wk_row(r, t);
                std::fill(dst, dst + len, A(0));
                copy_row(&w.at(it.n, it.g, t / K, t % K, ilo + r, 0), w.sj, g.Wo, dst + lp);
            }
        for (int h = it.r0; h < it.r1; ++h) {
            int c0 = 0;
            for (; c0 + kChannels <= cg; c0 += kChannels) channels<kChannels>(h, ilo, rows, it.n, it.g, c0);
            for (; c0 < cg; ++c0) channels<1>(h, ilo, rows, it.n, it.g, c0);
        }
    }
};

// ---------------------------------------------------------------------------------------------------------------
template <typename S> static void forward(const void* x, const i64* xs, const void* w, const i64* ws, void* out,
                                          const i64* os, const Geo& g, int threads) {
    typedef typename Acc<S>::type A;
    constexpr int L = Lanes<A>::value;
    Forward<S> f;
    f.x = {static_cast<const S*>(x), xs[0], xs[1], xs[2], xs[3]};
    f.w = {static_cast<const S*>(w), ws[0], ws[1], ws[2], ws[3], ws[4], ws[5]};
    f.out = {static_cast<S*>(out), os[0], os[1], os[2], os[3]};
    f.g = g;
    f.cg = g.C / g.G;
    f.wop = round_up(g.Wo, L);
    f.q = f.wop + (g.K - 1) * g.d / g.s + 1;
    f.slab_rows = (kRows - 1) * g.s + (g.K - 1) * g.d + 1;
    parallel_items(i64(g.N) * g.G * ((g.Ho + kRows - 1) / kRows), threads, f);
}

template <typename S> static void grad_weight(const void* gy, const i64* gys, const void* x, const i64* xs,
                                              void* gw, const i64* gws, const Geo& g, int threads) {
    typedef typename Acc<S>::type A;
    constexpr int L = Lanes<A>::value;
    GradWeight<S> f;
    f.gy = {static_cast<const S*>(gy), gys[0], gys[1], gys[2], gys[3]};
    f.x = {static_cast<const S*>(x), xs[0], xs[1], xs[2], xs[3]};
    f.gw = {static_cast<S*>(gw), gws[0], gws[1], gws[2], gws[3], gws[4], gws[5]};
    f.g = g;
    f.cg = g.C / g.G;
    f.wop = round_up(g.Wo, L);
    f.q = f.wop + (g.K - 1) * g.d / g.s + 1;
    f.slab_rows = (kRows - 1) * g.s + (g.K - 1) * g.d + 1;
    parallel_items(i64(g.N) * g.G * ((g.Ho + kRows - 1) / kRows), threads, f);
}

template <typename S> static void grad_input(const void* gy, const i64* gys, const void* w, const i64* ws, void* gx,
                                             const i64* gxs, const Geo& g, int threads) {
    typedef typename Acc<S>::type A;
    constexpr int L = Lanes<A>::value;
    GradInput<S> f;
    f.gy = {static_cast<const S*>(gy), gys[0], gys[1], gys[2], gys[3]};
    f.w = {static_cast<const S*>(w), ws[0], ws[1], ws[2], ws[3], ws[4], ws[5]};
    f.gx = {static_cast<S*>(gx), gxs[0], gxs[1], gxs[2], gxs[3]};
    f.g = g;
    f.cg = g.C / g.G;
    f.lp = (g.K - 1) * g.d / g.s;
    const int columns = std::max(g.Wo, (g.p + g.W - 1) / g.s + 1);
    f.len = f.lp + round_up(columns, L) + L;
    f.max_rows = (kRows - 1 + (g.K - 1) * g.d) / g.s + 2;
    parallel_items(i64(g.N) * g.G * ((g.H + kRows - 1) / kRows), threads, f);
}

// Entry points. dtype: 0 float32, 1 float64, 2 bfloat16. Strides in elements: images (n, c, h, w), kernels
// (n, g, u, v, i, j). geometry: N, C, H, W, G, K, Ho, Wo, stride, padding, dilation. Returns 0, or -1 for an
// unknown dtype.
#define INVOLUTION_DISPATCH(fn, ...)                        \
    switch (dtype) {                                        \
        case 0: fn<float>(__VA_ARGS__); return 0;           \
        case 1: fn<double>(__VA_ARGS__); return 0;          \
        case 2: fn<bf16>(__VA_ARGS__); return 0;            \
        default: return -1;                                 \
    }

static Geo geo_of(const int* a) { return Geo{a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10]}; }

extern "C" {
int involution_cpu_forward(int dtype, const void* x, const i64* xs, const void* w, const i64* ws, void* out,
                           const i64* os, const int* geometry, int threads) {
    INVOLUTION_DISPATCH(forward, x, xs, w, ws, out, os, geo_of(geometry), threads)
}
int involution_cpu_grad_input(int dtype, const void* gy, const i64* gys, const void* w, const i64* ws, void* gx,
                              const i64* gxs, const int* geometry, int threads) {
    INVOLUTION_DISPATCH(grad_input, gy, gys, w, ws, gx, gxs, geo_of(geometry), threads)
}
int involution_cpu_grad_weight(int dtype, const void* gy, const i64* gys, const void* x, const i64* xs, void* gw,
                               const i64* gws, const int* geometry, int threads) {
    INVOLUTION_DISPATCH(grad_weight, gy, gys, x, xs, gw, gws, geo_of(geometry), threads)
}
int involution_cpu_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
}
