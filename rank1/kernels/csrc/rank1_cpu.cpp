// The whole decomposed rank-1 layer in one CPU call, for inference: the 1x1 (one GEMM)
// and both depthwise 1-D passes (kh x 1 with b, then 1 x kw with c) plus the bias (and
// the ReLU that follows the layer, where there is one), on channels-last fp32 activations.
//
// Why: at small shapes a decomposed layer run as two or three framework convolutions
// pays each call's fixed cost, and the library's depthwise kernels run far below the
// machine's speed on short channel rows. Here the threads split the output rows; per
// row and per vector of channels (16 with AVX-512, 8 with AVX2), the kh + kw factor values
// sit in vector registers, the vertical taps fill a one-row buffer (in L1), and the
// horizontal taps write the output once. Every load and store is a contiguous vector.
//
// Built on first use by rank1.cpp_conv (torch.utils.cpp_extension) as a Python module
// with one function, conv.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/extension.h>

#include <algorithm>
#include <new>
#include <optional>
#include <utility>
#include <vector>

namespace {

// Floats per vector, from the target the file is compiled for (rank1.kernels.cpp passes the
// flags of the CPU capability torch detected): one AVX-512 register, one AVX2 register, or
// four (SSE, NEON). A 16-float vector type compiled for AVX2 is split by the compiler into
// register halves that go through memory: the whole kernel ran 5-7x slower than with
// 8-float vectors (2026-12-06, AMD EPYC running an AVX2 build).
#if defined(__AVX512F__)
constexpr int VL = 16;
// Pixels x vectors of the 1x1's register tile (16 accumulators of the 32 registers), and
// pixels per block of the depthwise passes.
constexpr int kGemmPx = 4, kGemmVec = 4, kBlock = 8;
#else
// 16 registers: 12 accumulators (6 pixels x 2 vectors; 4 x 3 and 3 x 3 measured the same or
// slower).
#if defined(__AVX__)
constexpr int VL = 8;
#else
constexpr int VL = 4;
#endif
constexpr int kGemmPx = 6, kGemmVec = 2, kBlock = 8;
#endif
typedef float vf __attribute__((vector_size(VL * sizeof(float))));
typedef float vfu __attribute__((vector_size(VL * sizeof(float)), aligned(alignof(float))));
inline vf ld(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void st(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
template <int... I>
inline vf splat(float s, std::integer_sequence<int, I...>) { return vf{((void)I, s)...}; }
// One float in every lane: a broadcast load. (`vf{} + s` added 0.0 to s first, an FP op per
// broadcast in the 1x1's inner loop.)
inline vf bcast(float s) { return splat(s, std::make_integer_sequence<int, VL>{}); }

// Buffers on 64-byte boundaries, so a vector never straddles two cache lines (malloc
// aligns to 16 bytes).
template <typename T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <typename U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const Aligned64<U>&) const { return true; }
  template <typename U>
  bool operator!=(const Aligned64<U>&) const { return false; }
};
using Buffer = std::vector<float, Aligned64<float>>;

// The output store, with the ReLU that follows the layer fused in when `relu`.
inline void st_out(float* p, vf v, bool relu) {
  const vf z{};
  st(p, relu ? (v > z ? v : z) : v);
}

constexpr int64_t kMaxTaps = 64;  // the largest kernel side (named in a message below)

struct Geometry {
  int64_t n, h, w, c, o, kh, kw, ho, wo, sh, sw, pt, pl, dh, dw;
};

// Vertical taps for pixels p .. p + NP of channels k0 .. k0 + VL into `mid` (w x o).
template <int NP>
inline void vertical(const float* const* src, const float* __restrict b, float* __restrict mid, int64_t p,
                     int64_t k0, int64_t kh, int64_t o) {
  vf acc[NP];
  const vf b0 = ld(b + k0);
  for (int l = 0; l < NP; ++l) acc[l] = b0 * ld(src[0] + (p + l) * o + k0);
  for (int64_t i = 1; i < kh; ++i) {
    const vf bi = ld(b + i * o + k0);
    const float* s = src[i] + p * o + k0;
    for (int l = 0; l < NP; ++l) acc[l] += bi * ld(s + l * o);
  }
  for (int l = 0; l < NP; ++l) st(mid + (p + l) * o + k0, acc[l]);
}

// The same for stride 1, dilation 1 and KW taps known at compile time: the NP + KW - 1
// input vectors are loaded once and shared by the taps.
template <int NP, int KW>
inline void horizontal_s1(const float* __restrict row, const float* __restrict c, const float* __restrict bias,
                          float* __restrict y, int64_t ox, int64_t k0, int64_t o, bool relu) {
  vf in[NP + KW - 1];
  const float* r = row + ox * o + k0;
  for (int q = 0; q < NP + KW - 1; ++q) in[q] = ld(r + q * o);
  vf acc[NP];
  const vf bb = bias ? ld(bias + k0) : vf{};
  for (int l = 0; l < NP; ++l) acc[l] = bb;
  for (int j = 0; j < KW; ++j) {
    const vf cj = ld(c + j * o + k0);
    for (int l = 0; l < NP; ++l) acc[l] += cj * in[l + j];
  }
  for (int l = 0; l < NP; ++l) st_out(y + (ox + l) * o + k0, acc[l], relu);
}

// Horizontal taps and the bias for outputs ox .. ox + NP of channels k0 .. k0 + VL.
template <int NP>
inline void horizontal(const float* __restrict row, const float* __restrict c, const float* __restrict bias,
                       float* __restrict y, int64_t ox, int64_t k0, const Geometry& g, bool relu) {
  const int64_t o = g.o;
  vf acc[NP];
  const vf bb = bias ? ld(bias + k0) : vf{};
  for (int l = 0; l < NP; ++l) acc[l] = bb;
  for (int64_t j = 0; j < g.kw; ++j) {
    const vf cj = ld(c + j * o + k0);
    const float* r = row + (ox * g.sw + j * g.dw) * o + k0;
    for (int l = 0; l < NP; ++l) acc[l] += cj * ld(r + l * g.sw * o);
  }
  for (int l = 0; l < NP; ++l) st_out(y + (ox + l) * o + k0, acc[l], relu);
}

// One output row `oy` of the 1x1 output `z` (h x w x o, one image) into `y` (wo x o).
// `zero` is a row of zeros standing for the padding rows; `row` holds
// (pl + w + right) x o floats whose padding columns are zero. Pixels outer, channels
// inner, so each cache line of z and y is used whole while it is in L1 (channel
// blocks outermost thrashed the cache at power-of-two row lengths: 10x slower).
void spatial_row(const float* __restrict z, const float* __restrict zero, const float* __restrict b,
                 const float* __restrict c, const float* __restrict bias, float* __restrict row, float* __restrict y,
                 int64_t oy, const Geometry& g, bool relu) {
  const int64_t o = g.o, len = g.w * o, ov = o / VL * VL;
  const float* src[kMaxTaps];
  for (int64_t i = 0; i < g.kh; ++i) {
    const int64_t iy = oy * g.sh - g.pt + i * g.dh;
    src[i] = (iy < 0 || iy >= g.h) ? zero : z + iy * len;
  }
  float* __restrict mid = row + g.pl * o;  // column 0 of the input row
  int64_t p = 0;
  for (; p + kBlock <= g.w; p += kBlock)
    for (int64_t k0 = 0; k0 < ov; k0 += VL) vertical<kBlock>(src, b, mid, p, k0, g.kh, o);
  for (; p < g.w; ++p)
    for (int64_t k0 = 0; k0 < ov; k0 += VL) vertical<1>(src, b, mid, p, k0, g.kh, o);
  int64_t ox = 0;
  if (g.sw == 1 && g.dw == 1 && (g.kw == 3 || g.kw == 5)) {
    for (; ox + kBlock <= g.wo; ox += kBlock)
      for (int64_t k0 = 0; k0 < ov; k0 += VL) {
        if (g.kw == 3) horizontal_s1<kBlock, 3>(row, c, bias, y, ox, k0, o, relu);
        else horizontal_s1<kBlock, 5>(row, c, bias, y, ox, k0, o, relu);
      }
  }
  for (; ox + kBlock <= g.wo; ox += kBlock)
    for (int64_t k0 = 0; k0 < ov; k0 += VL) horizontal<kBlock>(row, c, bias, y, ox, k0, g, relu);
  for (; ox < g.wo; ++ox)
    for (int64_t k0 = 0; k0 < ov; k0 += VL) horizontal<1>(row, c, bias, y, ox, k0, g, relu);
  if (ov == o) return;
  // The last o % VL channels, one at a time.
  for (int64_t q = 0; q < g.w; ++q)
    for (int64_t k = ov; k < o; ++k) {
      float acc = 0.0f;
      for (int64_t i = 0; i < g.kh; ++i) acc += b[i * o + k] * src[i][q * o + k];
      mid[q * o + k] = acc;
    }
  for (int64_t q = 0; q < g.wo; ++q)
    for (int64_t k = ov; k < o; ++k) {
      float acc = bias ? bias[k] : 0.0f;
      for (int64_t j = 0; j < g.kw; ++j) acc += c[j * o + k] * row[(q * g.sw + j * g.dw) * o + k];
      y[q * o + k] = relu && acc < 0.0f ? 0.0f : acc;
    }
}

// The 1x1 of one image in registers: z (pixels x o) = x (pixels x c) . aT (c x o). aT is
// packed in panels of kPanel columns (c x kPanel floats each, contiguous: aT's own rows, at a
// power-of-two stride, fell into a quarter of L1's sets and thrashed it), then panels of VL
// columns, then one of the last o % VL. Blocks of kGemmPx pixels take every panel in turn, so
// the pixels' inputs stay in L1 while the panels stream from L2; before, each 32-column block
// swept the whole image, which at 128 channels 32x32 (512 KB) no longer fit in L2 with its
// output. An NCHW block is first copied k-major (its rows are a power of two apart too).
// Measured on the AMD EPYC (2 threads, batch 32): the 1x1 at 128 channels 32x32, 139-152 ->
// 177-192 GFLOP/s channels-last, against ~225 for oneDNN's dense 3x3.
constexpr int kPanel = kGemmVec * VL;

inline int64_t panel_width(int64_t o, int64_t o0) {
  return o - o0 >= kPanel ? kPanel : (o - o0 >= VL ? VL : o - o0);
}

// a (o x c, row-major) into the panels described above; packed holds c x o floats.
void pack_weights(const float* __restrict a, float* __restrict packed, int64_t c, int64_t o) {
  for (int64_t o0 = 0, wb; o0 < o; o0 += wb) {
    wb = panel_width(o, o0);
    float* dst = packed + o0 * c;
    for (int64_t k = 0; k < c; ++k)
      for (int64_t j = 0; j < wb; ++j) dst[k * wb + j] = a[(o0 + j) * c + k];
  }
}

// NP pixels x NV vectors of output channels from one panel w (c x NV * VL).
template <int NP, int NV>
inline void gemm_tile(const float* __restrict x, const float* __restrict w, float* __restrict z, int64_t c,
                      int64_t o, int64_t sp, int64_t sk) {
  vf acc[NP][NV];
  for (int p = 0; p < NP; ++p)
    for (int v = 0; v < NV; ++v) acc[p][v] = vf{};
  for (int64_t k = 0; k < c; ++k) {
    vf wk[NV];
    for (int v = 0; v < NV; ++v) wk[v] = ld(w + (k * NV + v) * VL);
    const float* xk = x + k * sk;
    for (int p = 0; p < NP; ++p) {
      const vf xb = bcast(xk[p * sp]);
      for (int v = 0; v < NV; ++v) acc[p][v] += xb * wk[v];
    }
  }
  for (int p = 0; p < NP; ++p)
    for (int v = 0; v < NV; ++v) st(z + p * o + v * VL, acc[p][v]);
}

// Every output channel of NP pixels, panel by panel.
template <int NP>
inline void gemm_pixels(const float* __restrict x, const float* __restrict packed, float* __restrict z, int64_t c,
                        int64_t o, int64_t sp, int64_t sk) {
  for (int64_t o0 = 0, wb; o0 < o; o0 += wb) {
    wb = panel_width(o, o0);
    const float* w = packed + o0 * c;
    if (wb == kPanel) {
      gemm_tile<NP, kGemmVec>(x, w, z + o0, c, o, sp, sk);
    } else if (wb == VL) {
      gemm_tile<NP, 1>(x, w, z + o0, c, o, sp, sk);
    } else {  // the last o % VL channels
      for (int p = 0; p < NP; ++p)
        for (int64_t j = 0; j < wb; ++j) {
          float acc = 0.0f;
          for (int64_t k = 0; k < c; ++k) acc += x[p * sp + k * sk] * w[k * wb + j];
          z[p * o + o0 + j] = acc;
        }
    }
  }
}

// x: one image, pixel p's channel k at x[p * sp + k * sk] (channels-last: sp = c, sk = 1;
// NCHW: sp = 1, sk = pixels, read as it is: no conversion pass over the input). `xt`:
// kGemmPx x c floats of scratch for an NCHW block.
void gemm_image(const float* __restrict x, const float* __restrict packed, float* __restrict z,
                float* __restrict xt, int64_t pixels, int64_t c, int64_t o, int64_t sp, int64_t sk) {
  int64_t p = 0;
  for (; p + kGemmPx <= pixels; p += kGemmPx) {
    const float* xb = x + p * sp;
    if (sp == 1 && sk != 1) {  // NCHW: the block k-major into xt
      for (int64_t k = 0; k < c; ++k)
        for (int q = 0; q < kGemmPx; ++q) xt[k * kGemmPx + q] = xb[q + k * sk];
      gemm_pixels<kGemmPx>(xt, packed, z + p * o, c, o, 1, kGemmPx);
    } else {
      gemm_pixels<kGemmPx>(xb, packed, z + p * o, c, o, sp, sk);
    }
  }
  for (; p < pixels; ++p) gemm_pixels<1>(x + p * sp, packed, z + p * o, c, o, sp, sk);
}

// One row of a 2x2, stride-2 max pool over `nr` (1 or 2) consecutive output rows in `rows`
// (each wo x o) into `out` (wp x o); the last window of a ceil-mode pool may be one column or
// row. NaN propagates, as in torch's max pool.
void pool_row(const float* __restrict rows, int64_t nr, float* __restrict out, int64_t wo, int64_t wp, int64_t o) {
  const int64_t ov = o / VL * VL, len = wo * o;
  for (int64_t px = 0; px < wp; ++px) {
    const int64_t c0 = 2 * px, nc = std::min<int64_t>(2, wo - c0);
    for (int64_t k = 0; k < ov; k += VL) {
      vf m = ld(rows + c0 * o + k);
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t q = 0; q < nc; ++q) {
          const vf v = ld(rows + r * len + (c0 + q) * o + k);
          m = (v > m) | (v != v) ? v : m;
        }
      st(out + px * o + k, m);
    }
    for (int64_t k = ov; k < o; ++k) {
      float m = rows[c0 * o + k];
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t q = 0; q < nc; ++q) {
          const float v = rows[r * len + (c0 + q) * o + k];
          m = (v > m || v != v) ? v : m;
        }
      out[px * o + k] = m;
    }
  }
}

// x: N x C x H x W, channels-last or NCHW (contiguous); a: O x C; b: kh x O and c: kw x O
// (transposed, so channels are contiguous); bias: O or None. Zero padding top/bottom/left/right; `relu`:
// the output is max(y, 0) (the ReLU that follows the layer, fused into its store); `pool` = 2:
// a 2x2, stride-2 max pool that follows it (`pool_ceil`: in ceil mode) applied to the rows
// before they are stored, so the output is a quarter of the size and the pool reads nothing
// back from memory (rank1.autotune.fuse_relus folds nn.MaxPool2d(2) in). The fused path (the 1x1 in registers) is taken up to `fused_weights` = C x O and
// `fused_plane` = H x W x O floats (rank1.kernels.cpp.FUSED_*, which the roofline reads too);
// otherwise the 1x1 is one library call: the library's 1x1 convolution (oneDNN) for a
// channels-last input of at least `library_conv_rows` pixels in all, else a GEMM.
at::Tensor rank1_conv(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                      const std::optional<at::Tensor>& bias, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                      int64_t pl, int64_t pr, int64_t dh, int64_t dw, int64_t fused_weights, int64_t fused_plane,
                      bool relu, int64_t library_conv_rows, int64_t pool, bool pool_ceil,
                      const std::optional<at::Tensor>& packed) {
  // Every message is one string literal: a message built from several values went
  // through std::string across the library boundary and crashed with torch 2.11 and
  // g++ 13 (on the GPU machine's image); the Python side names the values anyway.
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4,
              "rank1 cpp conv: x must be a 4-D float32 CPU tensor");
  // Channels-last, or NCHW read as it is (a layer fed a user's NCHW input converts nothing).
  const bool cl = x.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(cl || x.is_contiguous(), "rank1 cpp conv: x must be channels-last or contiguous NCHW");
  for (const at::Tensor* t : {&a, &b, &c})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 2 && t->is_contiguous(),
                "rank1 cpp conv: a, b and c must be contiguous 2-D float32 CPU tensors");
  TORCH_CHECK(sh > 0 && sw > 0 && dh > 0 && dw > 0, "rank1 cpp conv: stride and dilation must be positive");
  TORCH_CHECK(pt >= 0 && pb >= 0 && pl >= 0 && pr >= 0, "rank1 cpp conv: padding must be non-negative");
  Geometry g{};
  g.n = x.size(0), g.c = x.size(1), g.h = x.size(2), g.w = x.size(3);
  g.o = a.size(0), g.kh = b.size(0), g.kw = c.size(0);
  TORCH_CHECK(a.size(1) == g.c && b.size(1) == g.o && c.size(1) == g.o,
              "rank1 cpp conv: expected a: O x C, b: kh x O, c: kw x O with C = x.size(1)");
  TORCH_CHECK(g.kh >= 1 && g.kh <= kMaxTaps && g.kw >= 1 && g.kw <= kMaxTaps,
              "rank1 cpp conv: kernel sizes must be 1..64");
  g.sh = sh, g.sw = sw, g.pt = pt, g.pl = pl, g.dh = dh, g.dw = dw;
  g.ho = (g.h + pt + pb - dh * (g.kh - 1) - 1) / sh + 1;
  g.wo = (g.w + pl + pr - dw * (g.kw - 1) - 1) / sw + 1;
  TORCH_CHECK(g.h + pt + pb >= dh * (g.kh - 1) + 1 && g.w + pl + pr >= dw * (g.kw - 1) + 1,
              "rank1 cpp conv: the input is too small for this kernel, padding and dilation");
  const float* bias_p = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                    bias->numel() == g.o,
                "rank1 cpp conv: bias must be a contiguous float32 CPU tensor of O elements");
    bias_p = bias->data_ptr<float>();
  }
  TORCH_CHECK(pool == 0 || pool == 2, "rank1 cpp conv: pool must be 0 (none) or 2 (a 2x2, stride-2 max pool)");
  // Stored rows and columns: the conv's, or the pool's (each window starts inside the rows).
  const int64_t hs = pool ? (pool_ceil ? (g.ho + 1) / 2 : g.ho / 2) : g.ho;
  const int64_t ws = pool ? (pool_ceil ? (g.wo + 1) / 2 : g.wo / 2) : g.wo;
  TORCH_CHECK(hs > 0 && ws > 0, "rank1 cpp conv: the 2x2 max pool's output would be empty (a 1-pixel side)");
  auto y = at::empty({g.n, g.o, hs, ws}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  // Plain buffers, not tensors: each ATen call costs about a microsecond of dispatch,
  // and at 32 channels 8x8 the whole layer takes ~40 µs.
  const Buffer zero(static_cast<size_t>(g.w * g.o), 0.0f);
  // Row buffer columns: pl left padding, w inputs, and as many right padding columns
  // as the last output's last tap reaches.
  const int64_t right = std::max<int64_t>(0, (g.wo - 1) * sw + (g.kw - 1) * dw + 1 - pl - g.w);
  const int64_t row_len = (pl + g.w + right) * g.o;
  const float* zerop = zero.data();
  const float* bp = b.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t pixels = g.h * g.w, plane_z = pixels * g.o, row_y = g.wo * g.o;
  const int64_t row_s = ws * g.o, plane_s = hs * row_s;  // a stored row and image
  // Stored row `u` of image z (h x w x o) into ys: a conv output row, or a pooled row of up to
  // two conv rows computed into `two` (2 x wo x o, in L1/L2) first.
  auto store_row = [&](const float* z, float* row, float* two, float* ys, int64_t u) {
    if (!pool) {
      spatial_row(z, zerop, bp, cp, bias_p, row, ys, u, g, relu);
      return;
    }
    const int64_t nr = std::min<int64_t>(2, g.ho - 2 * u);
    for (int64_t r = 0; r < nr; ++r) spatial_row(z, zerop, bp, cp, bias_p, row, two + r * row_y, 2 * u + r, g, relu);
    pool_row(two, nr, ys, g.wo, ws, g.o);
  };
  const float* xp = x.data_ptr<float>();
  // Pixel p's channel k of an image at p * sp + k * sk: channels-last rows of C channels, or NCHW planes.
  const int64_t sp = cl ? g.c : 1, sk = cl ? 1 : pixels;
  if (g.n >= at::get_num_threads() && g.c * g.o <= fused_weights && plane_z <= fused_plane) {
    // Enough images: each thread takes whole images, computes an image's 1x1 in
    // registers into a buffer that stays in its cache, then its rows. One parallel region
    // and no 1x1 output in memory for the whole batch: at 32 channels 8x8 the fork/joins and
    // the round trip of a separate GEMM cost as much as the depthwise work, and at 128
    // channels 56x56 the round trip took 40% of the layer.
    // a transposed, in panels: from the caller, packed once (`pack`: at 512 channels packing
    // took 0.5 ms, more than the whole layer at batch 1 on 4x4), else here.
    Buffer own;
    const float* wp;
    if (packed.has_value() && packed->defined()) {
      TORCH_CHECK(packed->device().is_cpu() && packed->scalar_type() == at::kFloat && packed->is_contiguous() &&
                      packed->numel() == g.c * g.o,
                  "rank1 cpp conv: packed must be pack(a), a contiguous float32 CPU tensor of C x O elements");
      wp = packed->data_ptr<float>();
    } else {
      own.resize(static_cast<size_t>(g.c * g.o));
      pack_weights(a.data_ptr<float>(), own.data(), g.c, g.o);
      wp = own.data();
    }
    at::parallel_for(0, g.n, 1, [&](int64_t n0, int64_t n1) {
      Buffer z(static_cast<size_t>(plane_z));
      Buffer row(static_cast<size_t>(row_len), 0.0f);
      Buffer xt(cl ? 0 : static_cast<size_t>(kGemmPx * g.c));
      Buffer two(pool ? static_cast<size_t>(2 * row_y) : 0);
      for (int64_t n = n0; n < n1; ++n) {
        gemm_image(xp + n * pixels * g.c, wp, z.data(), xt.data(), pixels, g.c, g.o, sp, sk);
        for (int64_t u = 0; u < hs; ++u) store_row(z.data(), row.data(), two.data(), yp + n * plane_s + u * row_s, u);
      }
    });
    return y;
  }
  // Otherwise the 1x1 as one threaded library call over every pixel of the batch, its output
  // channels-last (pixels x O), then the threads split the output rows. An NCHW input is one
  // batched GEMM reading each image transposed (a conversion pass first cost 12% more at
  // 256 channels 8x8 batch 32, and 60% at 128 channels 32x32); a channels-last one the
  // library's 1x1 convolution, 8-21% faster than its GEMM at batch 32 here, and slower at
  // batch 1 (where `library_conv_rows` sends it to the GEMM).
  at::Tensor z;
  if (!cl) {
    z = at::bmm(x.view({g.n, g.c, pixels}).transpose(1, 2), a.t().unsqueeze(0).expand({g.n, g.c, g.o}));
  } else if (g.n * pixels >= library_conv_rows) {
    z = at::conv2d(x, a.view({g.o, g.c, 1, 1})).contiguous(at::MemoryFormat::ChannelsLast);
  } else {
    z = at::mm(x.permute({0, 2, 3, 1}).reshape({g.n * pixels, g.c}), a.t());
  }
  const float* zp = z.data_ptr<float>();
  // Rows per task: enough work (~16k multiply-adds) to outweigh the scheduling.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, (pool ? 2 : 1) * row_y * (g.kh + g.kw)));
  at::parallel_for(0, g.n * hs, grain, [&](int64_t r0, int64_t r1) {
    Buffer row(static_cast<size_t>(row_len), 0.0f);
    Buffer two(pool ? static_cast<size_t>(2 * row_y) : 0);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / hs, u = r % hs;
      store_row(zp + n * plane_z, row.data(), two.data(), yp + n * plane_s + u * row_s, u);
    }
  });
  return y;
}

// a (O x C) packed as the in-register 1x1 reads it (pack_weights), for `conv`'s `packed`.
at::Tensor rank1_pack(const at::Tensor& a) {
  TORCH_CHECK(a.device().is_cpu() && a.scalar_type() == at::kFloat && a.dim() == 2 && a.is_contiguous(),
              "rank1 cpp pack: a must be a contiguous 2-D float32 CPU tensor");
  auto out = at::empty({a.numel()}, a.options());
  pack_weights(a.data_ptr<float>(), out.data_ptr<float>(), a.size(1), a.size(0));
  return out;
}

}  // namespace

// A plain Python binding, not a dispatcher op: a boxed torch.ops call costs ~7 µs
// here, a sixth of a whole layer at 32 channels 8x8, and the module is opaque anyway.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("conv", &rank1_conv,
        "rank-1 layer: 1x1 GEMM, then the kh x 1 and 1 x kw depthwise passes, the bias, (relu) a ReLU and "
        "(pool = 2) a 2x2 max pool",
        pybind11::arg("x"), pybind11::arg("a"), pybind11::arg("b"), pybind11::arg("c"), pybind11::arg("bias"),
        pybind11::arg("sh"), pybind11::arg("sw"), pybind11::arg("pt"), pybind11::arg("pb"), pybind11::arg("pl"),
        pybind11::arg("pr"), pybind11::arg("dh"), pybind11::arg("dw"), pybind11::arg("fused_weights"),
        pybind11::arg("fused_plane"), pybind11::arg("relu") = false, pybind11::arg("library_conv_rows") = 2048,
        pybind11::arg("pool") = 0, pybind11::arg("pool_ceil") = false, pybind11::arg("packed") = pybind11::none());
  m.def("pack", &rank1_pack, "the 1x1's weights packed for conv's in-register path", pybind11::arg("a"));
}
