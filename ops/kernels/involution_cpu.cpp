// Involution forward, grad-input and grad-weight for the CPU (built on first use by ops/cpu_backend.py).
//
//   out[n, c, i, j] = sum_{u,v < K} weight[n, g, u, v, i, j] * x[n, c, i*s + u*d - p, j*s + v*d - p],
//   g = c / (C / G), x read as zero outside the image.
//
// Plain C++ (no torch headers) with an extern "C" API on raw pointers, element strides and sizes, so every memory
// layout (NCHW, channels_last with pixel-major kernels, any non-contiguous view) runs without copies to a canonical
// layout. Work is split into items (n, g, block of kRows rows; kInputRows for grad-input), each computed by one
// thread from start to end: an item packs what it reads into small thread-local buffers (the group's input rows,
// zero-padded and split by stride phase so that every read of the hot loops is contiguous; grad_out's rows; the
// kernels' rows where they cannot be read in place), then runs loops vectorized over kLanes adjacent output pixels
// with the sums in registers. The hot loops are register-blocked: several output rows x several channels (or taps)
// are summed at once, so each loaded vector serves several multiply-adds (with one vector per multiply-add, loads
// limited the first version of these kernels). Each output element is summed by one thread in a fixed order (taps
// u, v for out and grad_x, the group's channels for grad_weight), the way the CUDA kernels do
// (ops/kernels/involution.cu), so results do not depend on the thread count or on the blocking. Sums accumulate in
// float (double for double); bfloat16 is converted on packing and rounded to nearest even on storing.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
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

// Rows per work item: larger items re-read fewer halo rows (an item packs the K-1 input rows around its own; for
// grad-input the kernels' rows too), smaller ones balance the threads better; these measured best at RedNet's
// shapes (scripts/compare_cpu_kernels.py, docs/benchmarks.md).
constexpr int kRows = 16;       // output rows per forward / grad-weight item
constexpr int kInputRows = 24;  // grad_x rows per grad-input item
constexpr int kChannels = 4;    // taps side by side in grad-weight's general path
// Forward register blocking: output rows x channels summed at once, each sum one 64-byte vector (one AVX-512
// register; two AVX2 ones, so fewer there to stay within 16 registers).
#ifdef __AVX512F__
constexpr int kRowBlock = 4, kChannelBlock = 4;
#else
constexpr int kRowBlock = 2, kChannelBlock = 2;
#endif

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

// Stores the first `count` lanes of v to dst[e * stride], rounded to S (one vector store when it can).
template <typename S, typename A>
static inline void store(const typename Vec<A>::type& v, S* dst, i64 stride, int count) {
    if (std::is_same<S, A>::value && stride == 1 && count == Lanes<A>::value) {
        std::memcpy(dst, &v, sizeof(v));
        return;
    }
    A sums[Lanes<A>::value];
    spill<A>(v, sums);
    for (int e = 0; e < count; ++e) from_acc(sums[e], dst + e * stride);
}

// Keeps a loaded vector in a register: without it the compiler folds the load into each of the CB multiply-adds
// that use it, which multiplies the loads of the hot loops.
template <typename T> static inline void in_register(T& v) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && defined(__AVX512F__)
    asm("" : "+v"(v));
#else
    (void)v;
#endif
}

// a / b rounded down (b > 0). C++ rounds toward zero, which for a negative a (a stride phase beyond the padded
// image, when s > p + W) would give column 0 instead of none.
static inline int floor_div(int a, int b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// The tap u with u*d == du, or -1 when there is none (du < 0 or not a multiple of d); no division when d == 1.
static inline int tap_of(int du, int d) {
    if (d == 1) return du;
    return du >= 0 && du % d == 0 ? du / d : -1;
}

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

// Calls f(std::integral_constant<int, B>{}, i) over [begin, end) in blocks of B = N, then the remainder in blocks
// of 2 and 1: the register blocks and their remainders, each a template instance of its own.
template <int N, typename F> static inline void in_blocks(int begin, int end, F&& f) {
    int i = begin;
    for (; i + N <= end; i += N) f(std::integral_constant<int, N>{}, i);
    if constexpr (N > 2)
        for (; i + 2 <= end; i += 2) f(std::integral_constant<int, 2>{}, i);
    for (; i < end; ++i) f(std::integral_constant<int, 1>{}, i);
}

// One work item's decomposition: item -> (n, g, first row).
struct Item {
    int n, g, r0, r1;
};
static inline Item item_of(i64 t, int G, int rows, int blocks, int per_item = kRows) {
    Item it;
    const int b = int(t % blocks);
    t /= blocks;
    it.g = int(t % G);
    it.n = int(t / G);
    it.r0 = b * per_item;
    it.r1 = std::min(rows, it.r0 + per_item);
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
    // Packs the rows that output rows it.r0..it.r1-1 read (fewer than R for a short last item).
    void pack(const Image<const S>& x, const Geo& g, int n, int c0, int channels, const Item& it) {
        const int row0 = it.r0 * g.s, rows = std::min(R, (it.r1 - it.r0 - 1) * g.s + (g.K - 1) * g.d + 1);
        for (int c = 0; c < channels; ++c) {
            for (int r = 0; r < rows; ++r) {
                const int h = row0 + r - g.p;
                for (int phase = 0; phase < s; ++phase) {
                    A* dst = row(c, r, phase);
                    if (h < 0 || h >= g.H) {
                        std::fill(dst, dst + Q, A(0));
                        continue;
                    }
                    // Columns q read x[..., q*s + phase - p]: inside the image for q in [qlo, qhi).
                    const int qlo = std::min(Q, std::max(0, (g.p - phase + s - 1) / s));
                    const int qhi = std::max(qlo, std::min(Q, floor_div(g.W - 1 + g.p - phase, s) + 1));
                    std::fill(dst, dst + qlo, A(0));
                    copy_row(&x.at(n, c0 + c, h, i64(qlo) * s + phase - g.p), x.sw * s, qhi - qlo, dst + qlo);
                    std::fill(dst + qhi, dst + Q, A(0));
                }
            }
        }
    }
};

// ---------------------------------------------------------------------------------------------------------------
// Forward. Item (n, g, rows i0..i1). Register blocking: kRowBlock output rows x kChannelBlock channels x kLanes
// pixels are summed at once, so each input vector loaded from the slab serves up to kRowBlock output rows (the
// taps u of rows that read the same input row) and each kernel vector kChannelBlock channels. The kernels are read
// in place when their rows are contiguous and of the accumulation type, the last partial vector of a row too (its
// lanes past Wo read the next row and are never stored) unless that read would end past the tensor (the last
// item); otherwise they are packed to kbuf[t][row][j]. Packing those short tails cost a fifth of the forward.
template <typename S> struct Forward {
    typedef typename Acc<S>::type A;
    typedef typename Vec<A>::type V;
    static constexpr int L = Lanes<A>::value;
    Image<const S> x;
    Kernels<const S> w;
    Image<S> out;
    Geo g;
    int cg, wop, q, slab_rows;
    Slab<S, A> slab;
    std::vector<A> kbuf;
    std::vector<int> columns;  // offset in a slab row of tap v's input: phase (v*d) % s, column (v*d) / s
    bool direct;               // kernels read in place (full vectors)
    i64 w_extent;              // the largest element offset of the kernel tensor
    bool tail_in_place;        // this item's last partial vectors may be read whole: they end inside the tensor

    void init() {
        slab.size(slab_rows, q, g.s, cg);
        kbuf.resize(size_t(g.K) * g.K * kRows * wop);
        for (int v = 0; v < g.K; ++v) columns.push_back((v * g.d) % g.s * q + (v * g.d) / g.s);
    }
    // Where the kernel vector (u, v, local row li, columns jb..jb+L) is: base + u*su + v*sv + li*si.
    struct KernelView {
        const A* base;
        i64 su, sv, si;
    };
    KernelView kernels_at(int n, int grp, int r0, int jb) {
        if (direct && (jb + L <= g.Wo || tail_in_place)) {
            const A* base = reinterpret_cast<const A*>(&w.at(n, grp, 0, 0, r0, jb));
            return {base, w.su, w.sv, w.si};
        }
        return {kbuf.data() + jb, i64(g.K) * kRows * wop, i64(kRows) * wop, wop};
    }
    template <int RB, int CB> void block(int li0, int i0, int n, int grp, int c0, int jb, const KernelView& kv) {
        const int K = g.K, s = g.s, d = g.d;
        const int* column = columns.data();
        V acc[RB][CB];
        for (int b = 0; b < RB; ++b)
            for (int k = 0; k < CB; ++k) acc[b][k] = V{};
        // Slab rows the block reads: r = (li0 + b)*s + u*d, ascending, so each output sums its taps u ascending.
        const int r_first = li0 * s, r_last = (li0 + RB - 1) * s + (K - 1) * d;
        for (int r = r_first; r <= r_last; ++r) {
            const int h = r + (i0 - li0) * s - g.p;  // image row of slab row r
            if (h < 0 || h >= g.H) continue;  // a row of padding adds nothing
            // The kernel row of each output row b that reads slab row r (tap u), or none.
            const A* wp[RB];
            bool any = false;
            for (int b = 0; b < RB; ++b) {
                const int du = r - (li0 + b) * s;
                const int u = tap_of(du, d);
                wp[b] = u >= 0 && u < K ? kv.base + u * kv.su + (li0 + b) * kv.si : nullptr;
                any |= wp[b] != nullptr;
            }
            if (!any) continue;
            const A* xr[CB];
            for (int k = 0; k < CB; ++k) xr[k] = slab.row(c0 + k, r, 0) + jb;
            const i64 sv = kv.sv;
            for (int v = 0; v < K; ++v) {
                const int off = column[v];
                V xv[CB];
                for (int k = 0; k < CB; ++k) xv[k] = load(xr[k] + off);
                for (int b = 0; b < RB; ++b) {
                    if (!wp[b]) continue;
                    V wv = load(wp[b] + v * sv);
                    in_register(wv);
                    for (int k = 0; k < CB; ++k) acc[b][k] += wv * xv[k];
                }
            }
        }
        const int count = std::min(L, g.Wo - jb);
        for (int b = 0; b < RB; ++b)
            for (int k = 0; k < CB; ++k)
                store<S, A>(acc[b][k], &out.at(n, i64(grp) * cg + c0 + k, i0 + b, jb), out.sw, count);
    }
    void operator()(i64 t) {
        const int blocks = (g.Ho + kRows - 1) / kRows;
        const Item it = item_of(t, g.G, g.Ho, blocks);
        slab.pack(x, g, it.n, it.g * cg, cg, it);
        const int K = g.K;
        const int rows = it.r1 - it.r0;
        // A vector past the end of a kernel row reads the next row's first columns: harmless (those lanes are never
        // stored), as long as the read ends inside the tensor; strides are >= 0, so the item's last read is the
        // last tap's last row.
        const i64 last_read = &w.at(it.n, it.g, K - 1, K - 1, it.r1 - 1, wop - L) - w.base + L - 1;
        tail_in_place = direct && last_read <= w_extent;
        if (!direct || (g.Wo % L != 0 && !tail_in_place)) {
            // Pack the kernel rows that are not read in place: all columns, or only the last partial vector.
            const int j0 = direct ? g.Wo / L * L : 0;
            for (int tap = 0; tap < K * K; ++tap)
                for (int i = it.r0; i < it.r1; ++i) {
                    A* dst = kbuf.data() + (size_t(tap) * kRows + i - it.r0) * wop;
                    copy_row(&w.at(it.n, it.g, tap / K, tap % K, i, j0), w.sj, g.Wo - j0, dst + j0);
                    std::fill(dst + g.Wo, dst + wop, A(0));
                }
        }
        for (int jb = 0; jb < wop; jb += L) {
            const KernelView kv = kernels_at(it.n, it.g, it.r0, jb);
            in_blocks<kRowBlock>(0, rows, [&](auto rb, int li) {
                in_blocks<kChannelBlock>(0, cg, [&](auto cb, int c0) {
                    this->template block<decltype(rb)::value, decltype(cb)::value>(li, it.r0 + li, it.n, it.g, c0,
                                                                                   jb, kv);
                });
            });
        }
    }
};

// Grad-weight. Item (n, g, rows i0..i1): same slab as the forward, plus grad_out's rows gyb[c][row][j]:
// acc[t][j] = sum_c gy[c][j] * slab[c][...][j], c ascending, kLanes pixels at a time. With stride 1 and dilation
// 1 (RedNet's K=7 and K=3 layers) and AVX-512, a block of output rows x all K taps u of one tap column v at once;
// otherwise one output row x kChannels taps.
template <typename S> struct GradWeight {
    typedef typename Acc<S>::type A;
    typedef typename Vec<A>::type V;
    static constexpr int L = Lanes<A>::value;
    Image<const S> gy;
    Image<const S> x;
    Kernels<S> gw;
    Geo g;
    int cg, wop, q, slab_rows;
    Slab<S, A> slab;
    std::vector<A> gyb;  // grad_out rows of the item: gyb[c][row][j], zero past Wo

    void init() {
        slab.size(slab_rows, q, g.s, cg);
        gyb.resize(size_t(cg) * kRows * wop);
    }
    const A* gy_row(int c, int li) const { return gyb.data() + (size_t(c) * kRows + li) * wop; }
    bool inside(int i, int u) const {
        const int h = i * g.s - g.p + u * g.d;
        return h >= 0 && h < g.H;
    }
    // Stride 1, dilation 1, K <= KU: output rows li0..li0+RB-1, all taps u of one tap column v, at once. Input row
    // li0 + rr serves output row b at tap u = rr - b, so each input vector is loaded once for the block.
    template <int RB, int KU> void rows_block(int li0, int i0, int n, int grp, int v, int jb) {
        const int K = g.K;
        V acc[RB][KU];
        for (int b = 0; b < RB; ++b)
            for (int u = 0; u < KU; ++u) acc[b][u] = V{};
        const i64 channel_step = i64(slab.R) * slab.Q;
        const A* xc = slab.row(0, li0, 0) + jb + v;
        for (int c = 0; c < cg; ++c, xc += channel_step) {
            V gv[RB];
            for (int b = 0; b < RB; ++b) gv[b] = load(gy_row(c, li0 + b) + jb);
            for (int rr = 0; rr < RB + KU - 1; ++rr) {
                if (rr >= RB + K - 1) break;
                V xv = load(xc + rr * slab.Q);
                in_register(xv);
                for (int b = 0; b < RB; ++b) {
                    const int u = rr - b;
                    if (u >= 0 && u < KU && u < K) acc[b][u] += gv[b] * xv;
                }
            }
        }
        const int count = std::min(L, g.Wo - jb);
        for (int b = 0; b < RB; ++b)
            for (int u = 0; u < KU && u < K; ++u)
                store<S, A>(inside(i0 + b, u) ? acc[b][u] : V{}, &gw.at(n, grp, u, v, i0 + b, jb), gw.sj, count);
    }
    template <int KU> void unit_stride_rows(const Item& it) {
        constexpr int RB = KU >= 6 ? 3 : 4;  // RB*KU sums + RB grad_out vectors + 1 input vector in 32 registers
        for (int jb = 0; jb < wop; jb += L)
            for (int v = 0; v < g.K; ++v)
                in_blocks<RB>(0, it.r1 - it.r0, [&](auto rb, int li) {
                    this->template rows_block<decltype(rb)::value, KU>(li, it.r0 + li, it.n, it.g, v, jb);
                });
    }
    // Any geometry: one output row, TB taps at once.
    template <int TB> void taps(int li, int i, int n, int grp, int t0) {
        const int K = g.K;
        i64 off[TB];  // offset of tap k's input row in channel 0's slab (the channel step is R*s*Q)
        for (int k = 0; k < TB; ++k) {
            const int u = (t0 + k) / K, v = (t0 + k) % K;
            off[k] = slab.row(0, li * g.s + u * g.d, (v * g.d) % g.s) - slab.row(0, 0, 0) + (v * g.d) / g.s;
        }
        const i64 channel_step = i64(slab.R) * slab.s * slab.Q;
        for (int jb = 0; jb < wop; jb += L) {
            V acc[TB];
            for (int k = 0; k < TB; ++k) acc[k] = V{};
            const A* xc = slab.row(0, 0, 0) + jb;
            for (int c = 0; c < cg; ++c, xc += channel_step) {
                const V gv = load(gy_row(c, li) + jb);
                for (int k = 0; k < TB; ++k) acc[k] += gv * load(xc + off[k]);
            }
            const int count = std::min(L, g.Wo - jb);
            for (int k = 0; k < TB; ++k) {
                const int u = (t0 + k) / K, v = (t0 + k) % K;
                store<S, A>(inside(i, u) ? acc[k] : V{}, &gw.at(n, grp, u, v, i, jb), gw.sj, count);
            }
        }
    }
    void operator()(i64 t) {
        const int blocks = (g.Ho + kRows - 1) / kRows;
        const Item it = item_of(t, g.G, g.Ho, blocks);
        slab.pack(x, g, it.n, it.g * cg, cg, it);
        for (int c = 0; c < cg; ++c)
            for (int i = it.r0; i < it.r1; ++i) {
                A* dst = gyb.data() + (size_t(c) * kRows + i - it.r0) * wop;
                copy_row(&gy.at(it.n, i64(it.g) * cg + c, i, 0), gy.sw, g.Wo, dst);
                std::fill(dst + g.Wo, dst + wop, A(0));
            }
#ifdef __AVX512F__
        if (g.s == 1 && g.d == 1) {
            if (g.K == 7) return unit_stride_rows<7>(it);
            if (g.K <= 3) return unit_stride_rows<3>(it);
            if (g.K <= 5) return unit_stride_rows<5>(it);
        }
#endif
        const int taps_total = g.K * g.K;
        for (int i = it.r0; i < it.r1; ++i) {
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

    std::vector<int> tap_phase, tap_shift;  // (v*d) % s and (v*d) / s: no division in the hot loops

    void init() {
        gyb.resize(size_t(cg) * max_rows * len);
        wkb.resize(size_t(max_rows) * g.K * g.K * len);
        for (int v = 0; v < g.K; ++v) tap_phase.push_back(v * g.d % g.s), tap_shift.push_back(v * g.d / g.s);
    }
    A* gy_row(int c, int r) { return gyb.data() + (size_t(c) * max_rows + r) * len; }
    A* wk_row(int r, int t) { return wkb.data() + (size_t(r) * g.K * g.K + t) * len; }

    // grad_x rows h0..h0+RB-1 x channels c0..c0+CB-1, kLanes columns of one stride phase at a time. Each grad_out
    // row i serves every row of the block that reads it (tap u = (h + p - i*s) / d), so its vectors are loaded once
    // for the block; rows go from high i to low, so each sum runs over its taps u (then v) ascending.
    template <int RB, int CB> void block(int h0, int ilo, int rows, int n, int grp, int c0) {
        typedef typename Vec<A>::type V;
        const int K = g.K, s = g.s, d = g.d;
        const i64 tap_step = len;  // wk_row(r, t + 1) - wk_row(r, t)
        for (int phase = 0; phase < s; ++phase) {
            // Columns w = m*s + phase - p inside the image.
            const int mlo = (g.p - phase + s - 1) / s > 0 ? (g.p - phase + s - 1) / s : 0;
            const int mhi = floor_div(g.p + g.W - 1 - phase, s);  // inclusive; < mlo when the phase has none
            if (mhi < mlo) continue;
            const int i_top = std::min(ilo + rows - 1, (h0 + RB - 1 + g.p) / s);
            const int low = h0 + g.p - (K - 1) * d;
            const int i_bottom = std::max(ilo, low <= 0 ? 0 : (low + s - 1) / s);
            for (int mb = mlo; mb <= mhi; mb += L) {
                V acc[RB][CB];
                for (int b = 0; b < RB; ++b)
                    for (int k = 0; k < CB; ++k) acc[b][k] = V{};
                for (int i = i_top; i >= i_bottom; --i) {
                    const int r = i - ilo;
                    const A* wp[RB];
                    bool any = false;
                    for (int b = 0; b < RB; ++b) {
                        const int u = tap_of(h0 + b + g.p - i * s, d);
                        wp[b] = u >= 0 && u < K ? wk_row(r, u * K) : nullptr;
                        any |= wp[b] != nullptr;
                    }
                    if (!any) continue;
                    const A* gp[CB];
                    for (int k = 0; k < CB; ++k) gp[k] = gy_row(c0 + k, r);
                    for (int v = 0; v < K; ++v) {
                        if (tap_phase[v] != phase) continue;
                        const int start = lp + mb - tap_shift[v];
                        V gv[CB];
                        for (int k = 0; k < CB; ++k) gv[k] = load(gp[k] + start);
                        for (int b = 0; b < RB; ++b) {
                            if (!wp[b]) continue;
                            V wv = load(wp[b] + v * tap_step + start);
                            in_register(wv);
                            for (int k = 0; k < CB; ++k) acc[b][k] += wv * gv[k];
                        }
                    }
                }
                const int count = std::min(L, mhi - mb + 1);
                for (int b = 0; b < RB; ++b)
                    for (int k = 0; k < CB; ++k)
                        store<S, A>(acc[b][k], &gx.at(n, i64(grp) * cg + c0 + k, h0 + b, i64(mb) * s + phase - g.p),
                                    gx.sw * s, count);
            }
        }
    }
    void operator()(i64 t) {
        const int blocks = (g.H + kInputRows - 1) / kInputRows;
        const Item it = item_of(t, g.G, g.H, blocks, kInputRows);
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
        in_blocks<kRowBlock>(it.r0, it.r1, [&](auto rb, int h) {
            in_blocks<kChannelBlock>(0, cg, [&](auto cb, int c0) {
                this->template block<decltype(rb)::value, decltype(cb)::value>(h, ilo, rows, it.n, it.g, c0);
            });
        });
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
    f.direct = std::is_same<S, A>::value && ws[5] == 1;
    const int kernel_sizes[6] = {g.N, g.G, g.K, g.K, g.Ho, g.Wo};
    f.w_extent = 0;
    for (int dim = 0; dim < 6; ++dim) f.w_extent += i64(kernel_sizes[dim] - 1) * ws[dim];
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
    f.max_rows = (kInputRows - 1 + (g.K - 1) * g.d) / g.s + 2;
    parallel_items(i64(g.N) * g.G * ((g.H + kInputRows - 1) / kInputRows), threads, f);
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
