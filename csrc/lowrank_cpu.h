// Fused low-rank layers on the CPU: both factors of a factored conv (or linear layer) in
// one pass over tiles of output pixels, the r-wide intermediate kept in a per-thread
// buffer that stays in L1/L2, then the epilogue (bias, residual, ReLU); only the output is
// written to memory.
//
// Everything is NHWC (channels last) and float32. Each factor is read in place as a
// row-major GEMM panel [taps * K][cols]: a conv weight (cols, K, kh, kw) stored kh, kw, K,
// cols ("HWIO"), the layout trp's modules keep their factors in (trp_kernels/cpp.py), so
// what the kernels read is always the parameters' current values.
//
// The kernels are compiled once per instruction set (AVX-512, AVX2+FMA, and a portable
// build) from lowrank_kernels.inc; lowrank_cpu.cpp picks one at run time.
#pragma once

#include <cstdint>

namespace trp {

struct LowRankConvArgs {
    const float* x;           // input, NHWC contiguous: [batch][in_h][in_w][in_c]
    int64_t batch, in_h, in_w, in_c;
    const float* w1;          // first factor: [taps1][in_c][rank]
    int64_t rank;
    const float* w2;          // second factor: [taps2][rank][out_c] (tucker: the core [taps][rank][rank2];
                              // dense: null)
    const float* w3;          // tucker only: the last 1x1 [rank2][out_c]; null otherwise
    int64_t rank2;            // tucker only: the core's output channels
    int64_t out_c;
    const float* bias;        // [out_c] or null
    const float* residual;    // NHWC contiguous [batch][out_h][out_w][out_c] or null
    float* out;               // NHWC contiguous [batch][out_h][out_w][out_c]
    int64_t out_h, out_w;
    int64_t kh, kw;           // the original kernel; the scheme says how it splits
    int64_t stride_h, stride_w, pad_top, pad_left, dil_h, dil_w;
    bool relu;
    int threads;              // OpenMP threads (torch.get_num_threads() on the Python side)
    bool stream = false;      // the output is stored past the caches (streaming stores, whole
                              // aligned vectors); the lowrank_conv_* entry points decide
                              // (lowrank_stream_bytes), whatever the caller set
    bool w1_oi = false;       // dense 1x1 only: w1 is [out_c][in_c] (PyTorch's own layout), not [in_c][out_c]
    bool winograd = false;    // a 3x3 stride-1 first stage (channel, dense) runs as Winograd
                              // F(2x2, 3x3); the entry points decide (lowrank_winograd)
    const int64_t* kept = nullptr;  // dense only, tap-sparse (SPP): the im2col columns kept,
                              // each (ki * kw + kj) * in_c + c, ascending; w1 is then their
                              // rows [n_kept][out_c]
    int64_t n_kept = 0;
};

// channel scheme: kh x kw conv in_c -> rank, then 1x1 rank -> out_c.
//   w1 taps1 = kh*kw (tap t = i*kw + j), w2 taps2 = 1.
// Both return false only when scratch memory cannot be allocated: per thread a few hundred
// KiB, plus, for a factor whose column count is not a multiple of the vector width, a
// zero-padded copy of its last columns (rows x at most 2 vectors: taps x in_channels x 128 B
// for the first factor with AVX-512).
bool lowrank_conv_channel(const LowRankConvArgs& a);

// spatial scheme: kh x 1 conv in_c -> rank (vertical geometry), then 1 x kw rank -> out_c
// (horizontal geometry). w1 taps1 = kh, w2 taps2 = kw.
bool lowrank_conv_spatial(const LowRankConvArgs& a);

// tucker (three stages): 1x1 conv in_c -> rank, the kh x kw core rank -> rank2 (with the
// geometry), 1x1 rank2 -> out_c, then the epilogue. w1 taps = 1, w2 taps = kh*kw, w3 taps = 1.
// Each thread takes bands of whole output rows of one image: the first 1x1 runs once over
// the band's input rows (its halo rows recomputed only where two bands meet), then the core
// and the last 1x1 run over tiles of the band's output pixels; neither intermediate leaves
// the thread's scratch.
bool lowrank_conv_tucker(const LowRankConvArgs& a);

// dense (one stage): kh x kw conv in_c -> out_c (w1: [kh*kw][in_c][out_c], or for a 1x1
// conv with w1_oi [out_c][in_c]) and the epilogue. rank is unused.
bool lowrank_conv_dense(const LowRankConvArgs& a);

// Floats per vector of the kernels this CPU runs (16 AVX-512, 8 AVX2, 4 portable) and
// the name of that build.
int lowrank_vector_width();
const char* lowrank_isa();
// Switch to the named build ("generic", "avx2", "avx512"); false if this CPU (or this
// build of the extension) lacks it. For tests.
bool lowrank_set_isa(const char* name);
// Outputs of at least this many bytes (0: none) are written by streaming stores, past the
// caches (lowrank_cpu.cpp, for_build: when, why, and what it bought). The default is
// measured; a test sets it low to run that path on small shapes, a benchmark to 0 to time
// without it.
int64_t lowrank_stream_bytes();
void lowrank_set_stream_bytes(int64_t bytes);
// Calls whose output was stored so, since the extension was loaded (for tests).
int64_t lowrank_streamed_calls();
// When a 3x3 stride-1 first stage (the channel scheme's, a dense conv's) runs as Winograd
// F(2x2, 3x3) (lowrank_kernels.inc, winograd_stage): 0 never, 1 (the default) where it is
// measured to win (lowrank_cpu.cpp, winograd_wins), 2 always. Returns false for another value.
int lowrank_winograd_mode();
bool lowrank_set_winograd_mode(int mode);
// Calls that ran it, since the extension was loaded (for tests).
int64_t lowrank_winograd_calls();
// Tucker calls that ran the stride-1 kernel with the padded band buffer (lowrank_kernels.inc,
// tucker_flat), since the extension was loaded (for tests: which layers take it), and the
// count's increment, called by that kernel.
int64_t lowrank_flat_tucker_calls();
void lowrank_count_flat_tucker();

// The whole-model program's other steps (bindings.cpp, Program), NHWC float32.
struct PoolArgs {
    const float* x;           // [batch][in_h][in_w][c]
    float* out;               // max pool: [batch][out_h][out_w][c]; global average: [batch][c]
    int64_t batch, in_h, in_w, c;
    int64_t out_h, out_w, kh, kw, stride_h, stride_w, pad_top, pad_left;  // max pool only
    bool relu;                // max pool: ReLU after (the same as before: both are monotone)
    int threads;
};
// Max over each window's input pixels (every window must hold one: padding <= kernel / 2,
// as torch.nn.MaxPool2d requires; dilation 1, floor mode), NaN if any is NaN.
void nhwc_max_pool(const PoolArgs& a);
// The mean of each image's pixels, per channel.
void nhwc_global_avg_pool(const PoolArgs& a);
// out = x + y (y may be null: out = x), then ReLU if relu; n floats (out may be x or y).
void elementwise_add_relu(const float* x, const float* y, float* out, int64_t n, bool relu, int threads);

namespace isa_avx512 {
void max_pool(const PoolArgs& a);
void global_avg_pool(const PoolArgs& a);
void add_relu(const float* x, const float* y, float* out, int64_t n, bool relu, int threads);
bool conv_channel(const LowRankConvArgs& a);
bool conv_spatial(const LowRankConvArgs& a);
bool conv_tucker(const LowRankConvArgs& a);
bool conv_dense(const LowRankConvArgs& a);
}
namespace isa_avx2 {
void max_pool(const PoolArgs& a);
void global_avg_pool(const PoolArgs& a);
void add_relu(const float* x, const float* y, float* out, int64_t n, bool relu, int threads);
bool conv_channel(const LowRankConvArgs& a);
bool conv_spatial(const LowRankConvArgs& a);
bool conv_tucker(const LowRankConvArgs& a);
bool conv_dense(const LowRankConvArgs& a);
}
namespace isa_generic {
void max_pool(const PoolArgs& a);
void global_avg_pool(const PoolArgs& a);
void add_relu(const float* x, const float* y, float* out, int64_t n, bool relu, int threads);
bool conv_channel(const LowRankConvArgs& a);
bool conv_spatial(const LowRankConvArgs& a);
bool conv_tucker(const LowRankConvArgs& a);
bool conv_dense(const LowRankConvArgs& a);
}

}  // namespace trp
