// Run-time choice of the fused kernels' instruction set.
#include "lowrank_cpu.h"

#include <atomic>
#include <cstdint>
#include <cstring>

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define TRP_CAN_DETECT_CPU 1
#endif

namespace trp {

namespace {

enum Isa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };
const char* const kIsaNames[] = {"generic", "avx2", "avx512"};
const int kIsaWidths[] = {4, 8, 16};

bool cpu_has(Isa isa) {
    if (isa == kGeneric) return true;
#ifdef TRP_CAN_DETECT_CPU
    __builtin_cpu_init();
#ifdef TRP_HAVE_AVX512_KERNELS
    if (isa == kAvx512) return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
#endif
#ifdef TRP_HAVE_AVX2_KERNELS
    if (isa == kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
#endif
    return false;
}

Isa best_isa() {
    if (cpu_has(kAvx512)) return kAvx512;
    if (cpu_has(kAvx2)) return kAvx2;
    return kGeneric;
}

std::atomic<int>& current() {
    static std::atomic<int> isa{best_isa()};
    return isa;
}

}  // namespace

int lowrank_vector_width() { return kIsaWidths[current().load()]; }
const char* lowrank_isa() { return kIsaNames[current().load()]; }

bool lowrank_set_isa(const char* name) {
    for (int i = kGeneric; i <= kAvx512; ++i) {
        if (std::strcmp(name, kIsaNames[i]) == 0) {
            if (!cpu_has(static_cast<Isa>(i))) return false;
            current().store(i);
            return true;
        }
    }
    return false;
}

namespace {

// A build's kernels.
struct Kernels {
    bool (*channel)(const LowRankConvArgs&);
    bool (*spatial)(const LowRankConvArgs&);
    bool (*tucker)(const LowRankConvArgs&);
    bool (*dense)(const LowRankConvArgs&);
    void (*max_pool)(const PoolArgs&);
    void (*global_avg_pool)(const PoolArgs&);
    void (*add_relu)(const float*, const float*, float*, int64_t, bool, int);
};

Kernels kernels(int isa) {
    switch (isa) {
#ifdef TRP_HAVE_AVX512_KERNELS
        case kAvx512: return {isa_avx512::conv_channel, isa_avx512::conv_spatial, isa_avx512::conv_tucker, isa_avx512::conv_dense,
                isa_avx512::max_pool, isa_avx512::global_avg_pool, isa_avx512::add_relu};
#endif
#ifdef TRP_HAVE_AVX2_KERNELS
        case kAvx2: return {isa_avx2::conv_channel, isa_avx2::conv_spatial, isa_avx2::conv_tucker, isa_avx2::conv_dense,
                isa_avx2::max_pool, isa_avx2::global_avg_pool, isa_avx2::add_relu};
#endif
        default: return {isa_generic::conv_channel, isa_generic::conv_spatial, isa_generic::conv_tucker, isa_generic::conv_dense,
                isa_generic::max_pool, isa_generic::global_avg_pool, isa_generic::add_relu};
    }
}

// Outputs stored past the caches (streaming stores). An output of several MB (batch 8:
// a 56x56 layer's is 6.4-25.7 MB) does not stay in cache for the next layer anyway, and a
// plain store first reads each line it writes (read for ownership); a streaming store
// does not: a third less memory traffic for a layer that reads a residual. 4 MB: on the
// 2-core AMD EPYC, ResNet-50 tucker+pointwise took 0.91x the time at batch 8 with it
// (0.92x from 1 MB, 0.94x from 8 MB, 0.96x from 16 MB) and 1.00x at batch 1, where no
// output reaches 4 MB; streaming those 1-3 MB outputs too took 1.02x, the next layer no
// longer finding them in L3 (benches/results/streaming-stores.txt, benches/streaming_ab.py).
std::atomic<int64_t>& stream_bytes() {
    static std::atomic<int64_t> bytes{4000000};
    return bytes;
}

std::atomic<int64_t>& streamed() {
    static std::atomic<int64_t> calls{0};
    return calls;
}

std::atomic<int>& winograd_mode() {
    static std::atomic<int> mode{1};
    return mode;
}

std::atomic<int64_t>& winograd_count() {
    static std::atomic<int64_t> calls{0};
    return calls;
}

// Where Winograd F(2x2, 3x3) beats the direct sum for a 3x3 stride-1 first stage of `cols`
// output channels: outputs of at least 14 x 14, or at least 128 tiles of 2 x 2 outputs
// with 64 columns or more. With fewer tiles a call cannot pay for transforming the weights
// on each call (16 x in_c x cols floats, 1.8x the factor), and an odd size computes whole
// tiles past the edge (7 x 7: 64 outputs for 49); with fewer columns the transforms
// weigh more against the GEMMs. Measured on the AMD EPYC, 2 threads, the fused kernel
// with a residual + ReLU epilogue, Winograd time / direct (benches/results/winograd/layers.txt):
// channel scheme at quarter rank 0.67-0.97 from 16x16 to 56x56 and 0.89 at 7x7 batch 8
// (rank 128), 1.07-1.67 at 8x8 (rank 16) and 7x7 batch 1; dense 0.43-0.85 from 14x14,
// 0.61-0.81 at 8x8 and 7x7 batch 8, 1.20-1.82 at 8x8 and 7x7 batch 1.
bool winograd_wins(const LowRankConvArgs& a, int64_t cols) {
    const int64_t tiles = a.batch * ((a.out_h + 1) / 2) * ((a.out_w + 1) / 2);
    return (a.out_h >= 14 && a.out_w >= 14) || (tiles >= 128 && cols >= 64);
}

// The call with its `stream` decided for this build: whole aligned vectors only (the
// output's rows a multiple of the vector, its start aligned to it), and only the vector
// builds have a streaming store (and not the (out, in) 1x1 kernel, which writes a pixel's
// channels one by one).
LowRankConvArgs for_build(const LowRankConvArgs& a, int isa) {
    LowRankConvArgs b = a;
    const int64_t vl = kIsaWidths[isa], threshold = stream_bytes().load();
    const int64_t bytes = a.batch * a.out_h * a.out_w * a.out_c * int64_t(sizeof(float));
    b.stream = isa != kGeneric && !a.w1_oi && threshold > 0 && bytes >= threshold && a.out_c % vl == 0 &&
               reinterpret_cast<uintptr_t>(a.out) % (vl * sizeof(float)) == 0;
    if (b.stream) streamed().fetch_add(1, std::memory_order_relaxed);
    return b;
}

// One of the active build's kernels, on the call as that build takes it.
// stage_cols: the output channels of a first stage that Winograd can take (a 3x3 conv of
// the layer's geometry on the input as it is), 0 for a kernel without one.
bool run_active(bool (*Kernels::*kernel)(const LowRankConvArgs&), const LowRankConvArgs& a, int64_t stage_cols) {
    const int isa = current().load();
    LowRankConvArgs b = for_build(a, isa);
    const int mode = winograd_mode().load();
    b.winograd = stage_cols > 0 && a.kh == 3 && a.kw == 3 && a.stride_h == 1 && a.stride_w == 1 && a.dil_h == 1 &&
                 a.dil_w == 1 && (mode == 2 || (mode == 1 && winograd_wins(a, stage_cols)));
    if (b.winograd) winograd_count().fetch_add(1, std::memory_order_relaxed);
    return (kernels(isa).*kernel)(b);
}

}  // namespace

int64_t lowrank_stream_bytes() { return stream_bytes().load(); }
void lowrank_set_stream_bytes(int64_t bytes) { stream_bytes().store(bytes); }
int64_t lowrank_streamed_calls() { return streamed().load(); }
int lowrank_winograd_mode() { return winograd_mode().load(); }
bool lowrank_set_winograd_mode(int mode) {
    if (mode < 0 || mode > 2) return false;
    winograd_mode().store(mode);
    return true;
}
int64_t lowrank_winograd_calls() { return winograd_count().load(); }

namespace {
std::atomic<int64_t>& flat_tucker() {
    static std::atomic<int64_t> calls{0};
    return calls;
}
}  // namespace
int64_t lowrank_flat_tucker_calls() { return flat_tucker().load(); }
void lowrank_count_flat_tucker() { flat_tucker().fetch_add(1, std::memory_order_relaxed); }

// Only the channel scheme's and a dense conv's first stage is a 3x3 conv of the layer's
// geometry with the input as it is (the spatial scheme's is 3x1, the Tucker core's input
// is the first 1x1's output).
bool lowrank_conv_channel(const LowRankConvArgs& a) { return run_active(&Kernels::channel, a, a.rank); }
bool lowrank_conv_spatial(const LowRankConvArgs& a) { return run_active(&Kernels::spatial, a, 0); }
bool lowrank_conv_tucker(const LowRankConvArgs& a) { return run_active(&Kernels::tucker, a, 0); }
bool lowrank_conv_dense(const LowRankConvArgs& a) { return run_active(&Kernels::dense, a, a.kept ? 0 : a.out_c); }
void nhwc_max_pool(const PoolArgs& a) { kernels(current().load()).max_pool(a); }
void nhwc_global_avg_pool(const PoolArgs& a) { kernels(current().load()).global_avg_pool(a); }
void elementwise_add_relu(const float* x, const float* y, float* out, int64_t n, bool relu, int threads) {
    kernels(current().load()).add_relu(x, y, out, n, relu, threads);
}

}  // namespace trp
