#include "conv2d_direct.h"

namespace trp {

int64_t conv2d_out_size(int64_t in, int64_t k, int64_t stride, int64_t pad, int64_t dil) {
    const int64_t span = in + 2 * pad - dil * (k - 1) - 1;
    // C++ division truncates toward zero; a negative span means "does not fit" either way.
    if (span < 0) return 0;
    return span / stride + 1;
}

void conv2d_direct(const float* input, const float* weight, const float* bias, float* out,
                   const Conv2dShape& s) {
    const int64_t in_plane = s.in_h * s.in_w;
    const int64_t out_plane = s.out_h * s.out_w;
    const int64_t w_per_out = s.in_channels * s.kh * s.kw;
    const int64_t planes = s.batch * s.out_channels;

    // One (batch, out-channel) plane per iteration: planes are independent and each
    // writes a disjoint slice of `out`, so no synchronisation is needed.
#ifdef TRP_HAS_OPENMP
#pragma omp parallel for schedule(static)
#endif
    for (int64_t p = 0; p < planes; ++p) {
        const int64_t b = p / s.out_channels;
        const int64_t o = p % s.out_channels;
        const float* in_b = input + b * s.in_channels * in_plane;
        const float* w_o = weight + o * w_per_out;
        float* out_p = out + p * out_plane;

        for (int64_t y = 0; y < s.out_h; ++y) {
            const int64_t y0 = y * s.stride_h - s.pad_h;
            for (int64_t x = 0; x < s.out_w; ++x) {
                const int64_t x0 = x * s.stride_w - s.pad_w;
                double acc = 0.0;
                for (int64_t c = 0; c < s.in_channels; ++c) {
                    const float* in_c = in_b + c * in_plane;
                    const float* w_c = w_o + c * s.kh * s.kw;
                    for (int64_t i = 0; i < s.kh; ++i) {
                        const int64_t iy = y0 + i * s.dil_h;
                        if (iy < 0 || iy >= s.in_h) continue;
                        for (int64_t j = 0; j < s.kw; ++j) {
                            const int64_t ix = x0 + j * s.dil_w;
                            if (ix < 0 || ix >= s.in_w) continue;
                            acc += static_cast<double>(w_c[i * s.kw + j]) *
                                   static_cast<double>(in_c[iy * s.in_w + ix]);
                        }
                    }
                }
                if (bias != nullptr) acc += static_cast<double>(bias[o]);
                out_p[y * s.out_w + x] = static_cast<float>(acc);
            }
        }
    }
}

}  // namespace trp
