// Naive direct 2-D convolution: the C++ reference that faster CPU kernels are checked against.
#pragma once

#include <cstdint>

namespace trp {

// Every size the loop nest needs. Filled and validated by the caller (bindings.cpp), so
// the kernel itself trusts it completely.
struct Conv2dShape {
    int64_t batch;
    int64_t in_channels;
    int64_t in_h, in_w;
    int64_t out_channels;
    int64_t kh, kw;
    int64_t stride_h, stride_w;
    int64_t pad_h, pad_w;
    int64_t dil_h, dil_w;
    int64_t out_h, out_w;
};

// floor((in + 2 pad - dil (k - 1) - 1) / stride) + 1, or a value < 1 when the dilated
// kernel does not fit in the padded input. Arguments must be small enough (< 2^31) that
// nothing overflows int64; bindings.cpp guarantees that.
int64_t conv2d_out_size(int64_t in, int64_t k, int64_t stride, int64_t pad, int64_t dil);

// out[b,o,y,x] = bias[o] + sum_{c,i,j} w[o,c,i,j] * in[b,c, y*sh - ph + i*dh, x*sw - pw + j*dw]
// with zeros outside the input. All arrays fp32, NCHW / OIHW, C-contiguous; bias may be
// null. The sum runs over c, then i, then j, accumulated in double and rounded to float
// once: this function is an oracle, so it should be as close to exact as cheaply possible,
// not mimic any particular fp32 summation order.
void conv2d_direct(const float* input, const float* weight, const float* bias, float* out,
                   const Conv2dShape& s);

}  // namespace trp
