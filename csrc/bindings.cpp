// pybind11 module trp_kernels._C. Python-facing checks live here so the kernels can trust
// their arguments: nothing below touches a data pointer until every shape, dtype, layout
// and hyper-parameter has been validated.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>
#include <sstream>
#include <string>

#include "build_info.h"
#include "conv2d_direct.h"
#include "lowrank_cpu.h"

namespace py = pybind11;

namespace {

// Bounds every spatial size and hyper-parameter so that conv2d_out_size cannot overflow
// int64 (dil * (k - 1) < 2^62). Nothing real comes near it.
constexpr int64_t kMaxDim = (int64_t{1} << 31) - 1;

// The fused kernels keep a row pointer per tap and tile pixel: kernels up to 64 x 64 taps
// (exported as MAX_KERNEL, which the Python dispatch reads so that it never picks these
// kernels for a layer they refuse).
constexpr int64_t kMaxKernel = 64;

// The entry point whose arguments are being checked, named in every error.
thread_local const char* t_function = "conv2d_direct";

struct Checking {
    explicit Checking(const char* fn) { t_function = fn; }
};

[[noreturn]] void value_error(const std::string& msg) {
    throw py::value_error(std::string(t_function) + ": " + msg);
}

[[noreturn]] void type_error(const std::string& msg) {
    throw py::type_error(std::string(t_function) + ": " + msg);
}

std::string repr_str(py::handle h) { return py::repr(h).cast<std::string>(); }

std::string pair_str(int64_t a, int64_t b) {
    std::ostringstream os;
    os << "(" << a << ", " << b << ")";
    return os.str();
}

std::string shape_str(const py::array& a) {
    std::ostringstream os;
    os << "(";
    for (py::ssize_t d = 0; d < a.ndim(); ++d) os << (d ? ", " : "") << a.shape(d);
    os << (a.ndim() == 1 ? ",)" : ")");
    return os.str();
}

// Accepts `obj` only if it already is what the kernel reads: a float32 (native byte order),
// C-contiguous, aligned ndarray of the given rank. Never converts: a silent copy would hide
// a caller's layout bug and cost a full pass over the data.
py::array require_f32(py::handle obj, const char* name, py::ssize_t ndim, const char* dims) {
    if (!py::isinstance<py::array>(obj)) {
        type_error(std::string(name) + " must be a numpy.ndarray of float32, got " +
                   Py_TYPE(obj.ptr())->tp_name);
    }
    auto arr = py::reinterpret_borrow<py::array>(obj);
    if (!py::isinstance<py::array_t<float>>(obj)) {
        value_error(std::string(name) + " must have dtype float32, got " +
                    py::str(arr.dtype()).cast<std::string>());
    }
    if (arr.ndim() != ndim) {
        value_error(std::string(name) + " must have " + std::to_string(ndim) +
                    (ndim == 1 ? " dim " : " dims ") + dims + ", got " +
                    std::to_string(arr.ndim()));
    }
    if (!(arr.flags() & py::array::c_style)) {
        std::ostringstream strides;
        for (py::ssize_t d = 0; d < arr.ndim(); ++d) strides << (d ? ", " : "") << arr.strides(d);
        value_error(std::string(name) + " must be C-contiguous (use numpy.ascontiguousarray)"
                    ", got byte strides (" + strides.str() + ") for shape " + shape_str(arr));
    }
    if (reinterpret_cast<std::uintptr_t>(arr.data()) % alignof(float) != 0) {
        value_error(std::string(name) + " data must be aligned to " +
                    std::to_string(alignof(float)) + " bytes");
    }
    return arr;
}

// A 2-tuple (or 2-list) of integers; anything with __index__ counts as an integer, so numpy
// integers work. Range checks are the caller's, which knows what each argument means.
std::array<int64_t, 2> parse_pair(py::handle obj, const char* name) {
    const bool seq = py::isinstance<py::tuple>(obj) || py::isinstance<py::list>(obj);
    if (!seq || py::len(obj) != 2) {
        type_error(std::string(name) + " must be a tuple of 2 ints, got " + repr_str(obj));
    }
    std::array<int64_t, 2> out{};
    auto items = py::reinterpret_borrow<py::sequence>(obj);
    for (size_t k = 0; k < 2; ++k) {
        py::object item = items[k];
        if (PyBool_Check(item.ptr()) || !PyIndex_Check(item.ptr())) {
            type_error(std::string(name) + " must be a tuple of 2 ints, got " + repr_str(obj));
        }
        PyObject* index = PyNumber_Index(item.ptr());
        if (index == nullptr) throw py::error_already_set();
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(index, &overflow);
        Py_DECREF(index);
        if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
        // Out-of-range values become the matching extreme and fail the range check below.
        if (overflow != 0) v = overflow > 0 ? LLONG_MAX : LLONG_MIN;
        out[k] = static_cast<int64_t>(v);
    }
    return out;
}

void check_range(const std::array<int64_t, 2>& v, const char* name, int64_t lo,
                 py::handle original) {
    for (int64_t x : v) {
        if (x < lo) {
            value_error(std::string(name) + " must be >= " + std::to_string(lo) +
                        " in both dims, got " + repr_str(original));
        }
        if (x > kMaxDim) {
            value_error(std::string(name) + " must be <= " + std::to_string(kMaxDim) +
                        ", got " + repr_str(original));
        }
    }
}

// Stride (>= 1), padding (>= 0) and dilation (>= 1), each a pair, checked.
std::array<std::array<int64_t, 2>, 3> parse_geometry(py::handle stride_obj, py::handle padding_obj,
                                                     py::handle dilation_obj) {
    const auto stride = parse_pair(stride_obj, "stride");
    const auto padding = parse_pair(padding_obj, "padding");
    const auto dilation = parse_pair(dilation_obj, "dilation");
    check_range(stride, "stride", 1, stride_obj);
    check_range(padding, "padding", 0, padding_obj);
    check_range(dilation, "dilation", 1, dilation_obj);
    return {stride, padding, dilation};
}

py::array_t<float> conv2d_direct(py::handle input_obj, py::handle weight_obj,
                                 py::handle bias_obj, py::handle stride_obj,
                                 py::handle padding_obj, py::handle dilation_obj) {
    Checking checking("conv2d_direct");
    py::array input = require_f32(input_obj, "input", 4, "(batch, channels, height, width)");
    py::array weight = require_f32(weight_obj, "weight", 4, "(out, in, kh, kw)");
    py::array bias;
    const bool has_bias = !bias_obj.is_none();
    if (has_bias) bias = require_f32(bias_obj, "bias", 1, "(out,)");

    const auto [stride, padding, dilation] = parse_geometry(stride_obj, padding_obj, dilation_obj);

    trp::Conv2dShape s{};
    s.batch = input.shape(0);
    s.in_channels = input.shape(1);
    s.in_h = input.shape(2);
    s.in_w = input.shape(3);
    s.out_channels = weight.shape(0);
    s.kh = weight.shape(2);
    s.kw = weight.shape(3);

    if (weight.shape(1) != s.in_channels) {
        value_error("weight has " + std::to_string(weight.shape(1)) +
                    " input channels (weight.shape[1]) but input has " +
                    std::to_string(s.in_channels) + " channels (input.shape[1]); weight " +
                    shape_str(weight) + ", input " + shape_str(input));
    }
    if (s.kh < 1 || s.kw < 1) {
        value_error("weight kernel size must be >= 1 in both dims, got " +
                    pair_str(s.kh, s.kw) + " from weight " + shape_str(weight));
    }
    if (s.kh > kMaxDim || s.kw > kMaxDim) {
        value_error("weight kernel size must be <= " + std::to_string(kMaxDim) + ", got " +
                    pair_str(s.kh, s.kw));
    }
    if (s.in_h > kMaxDim || s.in_w > kMaxDim) {
        value_error("input height and width must be <= " + std::to_string(kMaxDim) +
                    ", got " + pair_str(s.in_h, s.in_w));
    }
    if (has_bias && bias.shape(0) != s.out_channels) {
        value_error("bias must have " + std::to_string(s.out_channels) +
                    " elements (weight.shape[0]), got " + std::to_string(bias.shape(0)));
    }

    s.stride_h = stride[0];
    s.stride_w = stride[1];
    s.pad_h = padding[0];
    s.pad_w = padding[1];
    s.dil_h = dilation[0];
    s.dil_w = dilation[1];
    s.out_h = trp::conv2d_out_size(s.in_h, s.kh, s.stride_h, s.pad_h, s.dil_h);
    s.out_w = trp::conv2d_out_size(s.in_w, s.kw, s.stride_w, s.pad_w, s.dil_w);
    if (s.out_h < 1 || s.out_w < 1) {
        value_error("output size would be " + pair_str(s.out_h, s.out_w) +
                    ", must be >= 1: the dilated kernel does not fit in the padded input "
                    "(input " + pair_str(s.in_h, s.in_w) + ", kernel " +
                    pair_str(s.kh, s.kw) + ", stride " + pair_str(s.stride_h, s.stride_w) +
                    ", padding " + pair_str(s.pad_h, s.pad_w) + ", dilation " +
                    pair_str(s.dil_h, s.dil_w) + ")");
    }

    py::array_t<float> out({static_cast<py::ssize_t>(s.batch),
                            static_cast<py::ssize_t>(s.out_channels),
                            static_cast<py::ssize_t>(s.out_h),
                            static_cast<py::ssize_t>(s.out_w)});
    if (out.size() == 0) return out;

    const auto* in_ptr = static_cast<const float*>(input.data());
    const auto* w_ptr = static_cast<const float*>(weight.data());
    const float* b_ptr = has_bias ? static_cast<const float*>(bias.data()) : nullptr;
    float* out_ptr = out.mutable_data();
    {
        // The arrays stay referenced by this frame, so their buffers outlive the call.
        py::gil_scoped_release nogil;
        trp::conv2d_direct(in_ptr, w_ptr, b_ptr, out_ptr, s);
    }
    return out;
}

void check_dim(const py::array& a, const char* name, py::ssize_t d, int64_t want, const char* what) {
    if (a.shape(d) != want) {
        value_error(std::string(name) + ".shape[" + std::to_string(d) + "] must be " + std::to_string(want) +
                    " (" + what + "), got " + std::to_string(a.shape(d)) + " in shape " + shape_str(a));
    }
}

// The fused kernels: the two-stage schemes, Tucker-2's three stages, one dense stage.
enum class Kernel { kChannel, kSpatial, kTucker, kDense };

// A fused low-rank conv call, checked: the kernel arguments and the arrays they point
// into (kept referenced, so that their buffers outlive the call or plan).
struct CheckedCall {
    trp::LowRankConvArgs a{};
    Kernel kernel = Kernel::kChannel;
    py::array x, w1, w2, w3, bias, res, out;
    // A tap-sparse conv's kept columns, copied: a kept plan reads its own copy, so nothing the
    // caller later writes into its array can send the kernel out of bounds. a.kept points here
    // (point_kept() after every copy or move of the call).
    std::vector<int64_t> kept;

    void point_kept() {
        static const int64_t kNone = 0;
        if (a.kept) a.kept = kept.empty() ? &kNone : kept.data();  // none kept: still the tap-sparse kernel
    }
};

// What every fused conv call shares: x, out, bias and residual (NHWC float32), the kernel
// size and geometry, checked, and the arguments filled from them (not the weights).
struct ConvIO {
    py::array x, out, bias, res;  // (a default py::array is an empty array, not None: has_bias, has_res say)
    bool has_bias = false, has_res = false;
    trp::LowRankConvArgs a{};
};

ConvIO check_conv_io(py::handle x_obj, py::handle out_obj, py::handle bias_obj, py::handle residual_obj, int64_t kh,
                     int64_t kw, py::handle stride_obj, py::handle pad_obj, py::handle dilation_obj, int threads) {
    ConvIO io;
    io.x = require_f32(x_obj, "x", 4, "(batch, height, width, channels) NHWC");
    io.out = require_f32(out_obj, "out", 4, "(batch, out_h, out_w, out_channels) NHWC");
    if (!io.out.writeable()) value_error("out must be writeable");
    io.has_bias = !bias_obj.is_none();
    io.has_res = !residual_obj.is_none();
    if (io.has_bias) io.bias = require_f32(bias_obj, "bias", 1, "(out_channels,)");
    if (io.has_res) io.res = require_f32(residual_obj, "residual", 4, "(batch, out_h, out_w, out_channels) NHWC");
    const auto [stride, pad, dil] = parse_geometry(stride_obj, pad_obj, dilation_obj);
    if (kh < 1 || kw < 1 || kh > kMaxKernel || kw > kMaxKernel) {
        value_error("kernel size must be within 1.." + std::to_string(kMaxKernel) + ", got " + pair_str(kh, kw));
    }
    if (threads < 1) value_error("threads must be >= 1, got " + std::to_string(threads));
    for (py::ssize_t d = 1; d < 3; ++d) {
        if (io.x.shape(d) > kMaxDim) value_error("x spatial sizes must be <= " + std::to_string(kMaxDim));
    }
    trp::LowRankConvArgs& a = io.a;
    a.batch = io.x.shape(0); a.in_h = io.x.shape(1); a.in_w = io.x.shape(2); a.in_c = io.x.shape(3);
    a.kh = kh; a.kw = kw;
    a.stride_h = stride[0]; a.stride_w = stride[1]; a.pad_top = pad[0]; a.pad_left = pad[1];
    a.dil_h = dil[0]; a.dil_w = dil[1];
    a.out_h = io.out.shape(1); a.out_w = io.out.shape(2); a.out_c = io.out.shape(3);
    a.threads = threads;
    return io;
}

// After the weights' checks: out, bias and residual against each other, and the pointers.
void finish_conv_io(ConvIO& io, bool relu) {
    trp::LowRankConvArgs& a = io.a;
    check_dim(io.out, "out", 0, a.batch, "x's batch");
    // out's size fixes the bottom/right padding; any size is memory-safe, since every input
    // read outside x is replaced by a zero row.
    if (io.has_bias) check_dim(io.bias, "bias", 0, a.out_c, "out channels");
    if (io.has_res) {
        for (py::ssize_t d = 0; d < 4; ++d) check_dim(io.res, "residual", d, io.out.shape(d), "out's shape");
    }
    a.x = static_cast<const float*>(io.x.data());
    a.bias = io.has_bias ? static_cast<const float*>(io.bias.data()) : nullptr;
    a.residual = io.has_res ? static_cast<const float*>(io.res.data()) : nullptr;
    a.out = static_cast<float*>(io.out.mutable_data());
    a.relu = relu;
}

// Fused low-rank conv, NHWC. Everything the kernel reads is checked here first.
CheckedCall check_lowrank_conv(py::handle x_obj, py::handle w1_obj, py::handle w2_obj, py::handle bias_obj,
                               py::handle residual_obj, py::handle out_obj, const std::string& scheme, int64_t kh,
                               int64_t kw, py::handle stride_obj, py::handle pad_obj, py::handle dilation_obj,
                               bool relu, int threads, py::handle w3_obj) {
    Kernel kernel;
    if (scheme == "channel") kernel = Kernel::kChannel;
    else if (scheme == "spatial") kernel = Kernel::kSpatial;
    else if (scheme == "tucker") kernel = Kernel::kTucker;
    else if (scheme == "dense" || scheme == "dense_oi") kernel = Kernel::kDense;
    else value_error("scheme must be 'channel', 'spatial', 'tucker', 'dense' or 'dense_oi', got '" + scheme + "'");
    const bool dense = kernel == Kernel::kDense, tucker = kernel == Kernel::kTucker;
    const bool oi = scheme == "dense_oi";  // a 1x1 conv's weight as PyTorch keeps it: (out_channels, in_channels)
    ConvIO io = check_conv_io(x_obj, out_obj, bias_obj, residual_obj, kh, kw, stride_obj, pad_obj, dilation_obj,
                              threads);
    py::array w1 = require_f32(w1_obj, "w1", 2, oi ? "(out_channels, in_channels)"
                                                : dense ? "(taps * in_channels, out_channels)"
                                                        : "(taps * in_channels, rank)");
    py::array w2, w3;
    if (dense) {
        if (!w2_obj.is_none()) value_error("the dense kernel takes one weight: w2 must be None");
    } else {
        w2 = require_f32(w2_obj, "w2", 2, tucker ? "(taps * rank, rank2)" : "(taps * rank, out_channels)");
    }
    if (tucker) {
        if (w3_obj.is_none()) value_error("the tucker kernel takes three weights: w3 is missing");
        w3 = require_f32(w3_obj, "w3", 2, "(rank2, out_channels)");
    } else if (!w3_obj.is_none()) {
        value_error("w3 must be None for scheme '" + scheme + "' (only tucker has a third weight)");
    }
    trp::LowRankConvArgs& a = io.a;
    if (oi) {
        if (kh != 1 || kw != 1) value_error("scheme 'dense_oi' is for 1x1 convs, got kernel " + pair_str(kh, kw));
        check_dim(w1, "w1", 0, a.out_c, "out's channels");
        check_dim(w1, "w1", 1, a.in_c, "x's channels");
        a.w1_oi = true;
    } else if (dense) {
        check_dim(w1, "w1", 0, kh * kw * a.in_c, "taps x in_channels");
        check_dim(w1, "w1", 1, a.out_c, "out's channels");
    } else {
        a.rank = w1.shape(1);
        const int64_t taps1 = kernel == Kernel::kChannel ? kh * kw : kernel == Kernel::kSpatial ? kh : 1;
        const int64_t taps2 = kernel == Kernel::kChannel ? 1 : kernel == Kernel::kSpatial ? kw : kh * kw;
        if (a.rank < 1) value_error("w1.shape[1] (the rank) must be >= 1, got " + std::to_string(a.rank));
        check_dim(w1, "w1", 0, taps1 * a.in_c, "taps x in_channels");
        check_dim(w2, "w2", 0, taps2 * a.rank, "taps x rank");
        if (tucker) {
            a.rank2 = w2.shape(1);
            if (a.rank2 < 1) value_error("w2.shape[1] (the core's rank) must be >= 1, got " + std::to_string(a.rank2));
            check_dim(w3, "w3", 0, a.rank2, "the core's rank");
            check_dim(w3, "w3", 1, a.out_c, "out's channels");
        } else {
            check_dim(w2, "w2", 1, a.out_c, "out's channels");
        }
    }
    finish_conv_io(io, relu);
    a.w1 = static_cast<const float*>(w1.data());
    a.w2 = dense ? nullptr : static_cast<const float*>(w2.data());
    a.w3 = tucker ? static_cast<const float*>(w3.data()) : nullptr;
    return CheckedCall{a, kernel, io.x, w1, w2, w3, io.bias, io.res, io.out};
}

// The kernel's call (the GIL released by the caller); false when scratch memory ran out.
bool call_kernel(const trp::LowRankConvArgs& a, Kernel kernel) {
    switch (kernel) {
        case Kernel::kChannel: return trp::lowrank_conv_channel(a);
        case Kernel::kSpatial: return trp::lowrank_conv_spatial(a);
        case Kernel::kTucker: return trp::lowrank_conv_tucker(a);
        default: return trp::lowrank_conv_dense(a);
    }
}

void run_lowrank_conv(const trp::LowRankConvArgs& a, Kernel kernel) {
    bool ok;
    {
        py::gil_scoped_release nogil;
        ok = call_kernel(a, kernel);
    }
    if (!ok) throw std::bad_alloc();
}

void lowrank_conv(py::handle x_obj, py::handle w1_obj, py::handle w2_obj, py::handle bias_obj,
                  py::handle residual_obj, py::handle out_obj, const std::string& scheme, int64_t kh,
                  int64_t kw, py::handle stride_obj, py::handle pad_obj, py::handle dilation_obj, bool relu,
                  int threads, py::handle w3_obj) {
    Checking checking("lowrank_conv");
    const CheckedCall call = check_lowrank_conv(x_obj, w1_obj, w2_obj, bias_obj, residual_obj, out_obj, scheme, kh,
                                                kw, stride_obj, pad_obj, dilation_obj, relu, threads, w3_obj);
    run_lowrank_conv(call.a, call.kernel);
}

// A tap-sparse conv (SPP's pruned convs), NHWC: the dense conv over the kept im2col columns
// `kept` (int64, each (ki * kw + kj) * in_c + c, strictly ascending) with their weight rows
// w (n_kept, out_channels). Everything the kernel reads is checked here first.
CheckedCall check_conv_taps(py::handle x_obj, py::handle w_obj, py::handle kept_obj, py::handle bias_obj,
                            py::handle residual_obj, py::handle out_obj, int64_t kh, int64_t kw,
                            py::handle stride_obj, py::handle pad_obj, py::handle dilation_obj, bool relu,
                            int threads) {
    ConvIO io = check_conv_io(x_obj, out_obj, bias_obj, residual_obj, kh, kw, stride_obj, pad_obj, dilation_obj,
                              threads);
    py::array w = require_f32(w_obj, "w", 2, "(kept columns, out_channels)");
    auto kept = py::array_t<int64_t, py::array::c_style>::ensure(kept_obj);
    if (!kept || kept.ndim() != 1) value_error("kept must be a 1-D int64 array of im2col columns");
    trp::LowRankConvArgs& a = io.a;
    a.n_kept = kept.shape(0);
    const int64_t* cols = kept.data();
    for (int64_t k = 0; k < a.n_kept; ++k) {
        if (cols[k] < 0 || cols[k] >= kh * kw * a.in_c || (k > 0 && cols[k] <= cols[k - 1])) {
            value_error("kept must be strictly ascending columns in [0, " + std::to_string(kh * kw * a.in_c) +
                        "), got " + std::to_string(cols[k]) + " at " + std::to_string(k));
        }
    }
    check_dim(w, "w", 0, a.n_kept, "kept columns");
    check_dim(w, "w", 1, a.out_c, "out's channels");
    finish_conv_io(io, relu);
    a.w1 = static_cast<const float*>(w.data());
    CheckedCall call{a, Kernel::kDense, io.x, w, py::array(), py::array(), io.bias, io.res, io.out,
                     std::vector<int64_t>(cols, cols + a.n_kept)};
    call.a.kept = cols;  // (non-null: the tap-sparse kernel)
    call.point_kept();
    return call;
}

void conv_taps(py::handle x_obj, py::handle w_obj, py::handle kept_obj, py::handle bias_obj,
               py::handle residual_obj, py::handle out_obj, int64_t kh, int64_t kw, py::handle stride_obj,
               py::handle pad_obj, py::handle dilation_obj, bool relu, int threads) {
    Checking checking("conv_taps");
    const CheckedCall call = check_conv_taps(x_obj, w_obj, kept_obj, bias_obj, residual_obj, out_obj, kh, kw,
                                             stride_obj, pad_obj, dilation_obj, relu, threads);
    run_lowrank_conv(call.a, call.kernel);
}

// lowrank_conv, checked once on sample buffers and then run on others of the same shapes:
// a layer's per-call cost is then only its data pointers crossing the binding. The caller
// (trp_kernels/cpp.py) guarantees that every buffer it passes has the sample's shape and
// is C-contiguous float32 (NHWC) memory that stays alive for the call.
class LowRankPlan {
public:
    LowRankPlan(py::handle x_obj, py::handle w1_obj, py::handle w2_obj, py::handle bias_obj,
                py::handle residual_obj, py::handle out_obj, const std::string& scheme, int64_t kh, int64_t kw,
                py::handle stride_obj, py::handle pad_obj, py::handle dilation_obj, bool relu, py::handle w3_obj) {
        Checking checking("lowrank_conv");  // the same checks, the same messages
        keep(check_lowrank_conv(x_obj, w1_obj, w2_obj, bias_obj, residual_obj, out_obj, scheme, kh, kw,
                                stride_obj, pad_obj, dilation_obj, relu, 1, w3_obj), residual_obj);
    }

    // conv_taps, checked once the same way (the plan holds its own copy of the kept columns).
    static LowRankPlan taps(py::handle x_obj, py::handle w_obj, py::handle kept_obj, py::handle bias_obj,
                            py::handle residual_obj, py::handle out_obj, int64_t kh, int64_t kw,
                            py::handle stride_obj, py::handle pad_obj, py::handle dilation_obj, bool relu) {
        Checking checking("conv_taps");
        LowRankPlan plan;
        plan.keep(check_conv_taps(x_obj, w_obj, kept_obj, bias_obj, residual_obj, out_obj, kh, kw, stride_obj,
                                  pad_obj, dilation_obj, relu, 1), residual_obj);
        return plan;
    }

    LowRankPlan(const LowRankPlan& other) : call_(other.call_), has_residual_(other.has_residual_) {
        call_.point_kept();
    }
    LowRankPlan(LowRankPlan&& other) noexcept : call_(std::move(other.call_)), has_residual_(other.has_residual_) {
        call_.point_kept();
    }

    void run(std::uintptr_t x, std::uintptr_t out, std::uintptr_t residual, int threads) const {
        Checking checking("LowRankPlan.run");
        if (!x || !out) value_error("x and out must be non-null data pointers");
        if ((residual != 0) != has_residual_) {
            value_error(has_residual_ ? "this plan adds a residual: pass its data pointer"
                                      : "this plan has no residual: pass 0");
        }
        if (threads < 1) value_error("threads must be >= 1, got " + std::to_string(threads));
        trp::LowRankConvArgs a = call_.a;
        a.x = reinterpret_cast<const float*>(x);
        a.out = reinterpret_cast<float*>(out);
        a.residual = has_residual_ ? reinterpret_cast<const float*>(residual) : nullptr;
        a.threads = threads;
        run_lowrank_conv(a, call_.kernel);
    }

    const trp::LowRankConvArgs& args() const { return call_.a; }
    Kernel kernel() const { return call_.kernel; }
    bool has_residual() const { return has_residual_; }

private:
    LowRankPlan() = default;

    void keep(CheckedCall call, py::handle residual_obj) {
        call_ = std::move(call);
        call_.point_kept();
        call_.x = py::array();  // the samples themselves are not kept
        call_.res = py::array();
        call_.out = py::array();
        call_.a.x = nullptr;
        call_.a.residual = nullptr;
        call_.a.out = nullptr;
        has_residual_ = !residual_obj.is_none();
    }

    CheckedCall call_;
    bool has_residual_ = false;
};

// A sequence of steps (kept plans, max pools, global average pools, adds) over numbered
// float32 NHWC slots, run in one call with the GIL released: a stretch of a model that
// trp.program found it can run without Python between its layers. Slots 0 .. n_inputs-1
// are the caller's inputs and the next n_outputs its outputs (data pointers given to run);
// the rest are buffers the program owns. Every step is checked when added: its slots exist,
// hold what it reads and writes (the sizes given at construction), and a conv or pool
// never writes the slot it reads. The caller (trp/program.py) guarantees that the pointers
// it passes to run point to that many floats.
class Program {
public:
    Program(std::vector<int64_t> slot_floats, int n_inputs, int n_outputs)
        : sizes_(std::move(slot_floats)), n_inputs_(n_inputs), n_outputs_(n_outputs) {
        Checking checking("Program");
        if (n_inputs < 0 || n_outputs < 0 || int64_t(n_inputs) + n_outputs > int64_t(sizes_.size())) {
            value_error("n_inputs and n_outputs must be >= 0 and together at most the slots' count (" +
                        std::to_string(sizes_.size()) + "), got " + std::to_string(n_inputs) + " and " +
                        std::to_string(n_outputs));
        }
        for (size_t i = 0; i < sizes_.size(); ++i) {
            if (sizes_[i] < 0) value_error("slot " + std::to_string(i) + " has a negative size");
            if (int64_t(i) >= n_inputs + n_outputs) {
                // Whole 64-byte lines, at least one: aligned_alloc wants a multiple of the alignment.
                const int64_t bytes = (sizes_[i] * int64_t(sizeof(float)) + 63) / 64 * 64 + 64;
                float* p = static_cast<float*>(std::aligned_alloc(64, size_t(bytes)));
                if (!p) throw std::bad_alloc();
                owned_.emplace_back(p, &std::free);
            }
        }
    }

    void add_conv(py::object plan_obj, int x, int residual, int out) {
        Checking checking("Program.add_conv");
        const LowRankPlan& plan = plan_obj.cast<const LowRankPlan&>();
        const trp::LowRankConvArgs& a = plan.args();
        if (plan.has_residual() != (residual >= 0)) {
            value_error(plan.has_residual() ? "this plan adds a residual: give its slot" : "this plan has no residual: pass -1");
        }
        check_slot(x, a.batch * a.in_h * a.in_w * a.in_c, "x");
        check_slot(out, a.batch * a.out_h * a.out_w * a.out_c, "out");
        if (residual >= 0) check_slot(residual, a.batch * a.out_h * a.out_w * a.out_c, "residual");
        if (out == x || out == residual) value_error("out must be another slot than x and residual");
        Step st{};
        st.kind = StepKind::kConv;
        st.conv = a;
        st.kernel = plan.kernel();
        st.x = x; st.y = residual; st.out = out;
        plans_.push_back(std::move(plan_obj));
        steps_.push_back(st);
    }

    void add_max_pool(int x, int out, int64_t batch, int64_t in_h, int64_t in_w, int64_t c, int64_t out_h,
                      int64_t out_w, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, bool relu) {
        Checking checking("Program.add_max_pool");
        for (int64_t v : {batch, in_h, in_w, c, out_h, out_w, kh, kw, sh, sw}) {
            if (v < 1 || v > kMaxDim) value_error("sizes, kernel and stride must be within 1.." + std::to_string(kMaxDim));
        }
        if (ph < 0 || pw < 0 || 2 * ph > kh || 2 * pw > kw) value_error("padding must be within 0..kernel/2");
        // Every window starts inside the padded input and holds one input pixel at least.
        if ((out_h - 1) * sh - ph >= in_h || (out_w - 1) * sw - pw >= in_w) value_error("out_h/out_w too large");
        check_slot(x, batch * in_h * in_w * c, "x");
        check_slot(out, batch * out_h * out_w * c, "out");
        if (out == x) value_error("out must be another slot than x");
        Step st{};
        st.kind = StepKind::kMaxPool;
        st.pool = trp::PoolArgs{nullptr, nullptr, batch, in_h, in_w, c, out_h, out_w, kh, kw, sh, sw, ph, pw, relu, 1};
        st.x = x; st.y = -1; st.out = out;
        steps_.push_back(st);
    }

    void add_global_avg_pool(int x, int out, int64_t batch, int64_t h, int64_t w, int64_t c) {
        Checking checking("Program.add_global_avg_pool");
        for (int64_t v : {batch, h, w, c}) {
            if (v < 1 || v > kMaxDim) value_error("sizes must be within 1.." + std::to_string(kMaxDim));
        }
        check_slot(x, batch * h * w * c, "x");
        check_slot(out, batch * c, "out");
        if (out == x) value_error("out must be another slot than x");
        Step st{};
        st.kind = StepKind::kAvgPool;
        st.pool = trp::PoolArgs{nullptr, nullptr, batch, h, w, c, 1, 1, h, w, 1, 1, 0, 0, false, 1};
        st.x = x; st.y = -1; st.out = out;
        steps_.push_back(st);
    }

    void add_add(int x, int y, int out, int64_t n, bool relu) {
        Checking checking("Program.add_add");
        if (n < 0) value_error("n must be >= 0");
        check_slot(x, n, "x");
        if (y >= 0) check_slot(y, n, "y");
        check_slot(out, n, "out");
        Step st{};
        st.kind = StepKind::kAdd;
        st.n = n; st.relu = relu;
        st.x = x; st.y = y; st.out = out;
        steps_.push_back(st);
    }

    void run(const std::vector<std::uintptr_t>& inputs, const std::vector<std::uintptr_t>& outputs, int threads) {
        Checking checking("Program.run");
        if (int64_t(inputs.size()) != n_inputs_ || int64_t(outputs.size()) != n_outputs_) {
            value_error("takes " + std::to_string(n_inputs_) + " input and " + std::to_string(n_outputs_) +
                        " output pointers, got " + std::to_string(inputs.size()) + " and " + std::to_string(outputs.size()));
        }
        if (threads < 1) value_error("threads must be >= 1, got " + std::to_string(threads));
        std::vector<float*> slot(sizes_.size());
        for (int i = 0; i < n_inputs_; ++i) slot[i] = reinterpret_cast<float*>(inputs[i]);
        for (int i = 0; i < n_outputs_; ++i) slot[n_inputs_ + i] = reinterpret_cast<float*>(outputs[i]);
        for (size_t i = 0; i < owned_.size(); ++i) slot[n_inputs_ + n_outputs_ + i] = owned_[i].get();
        for (size_t i = 0; i < slot.size(); ++i) {
            if (!slot[i] && sizes_[i] > 0) value_error("slot " + std::to_string(i) + " is a null pointer");
        }
        bool ok = true;
        {
            py::gil_scoped_release nogil;
            std::vector<double> times;
            if (profile_) times.reserve(steps_.size());
            auto t0 = std::chrono::steady_clock::now();
            for (const Step& st : steps_) {
                const float* x = slot[st.x];
                const float* y = st.y >= 0 ? slot[st.y] : nullptr;
                float* out = slot[st.out];
                if (st.kind == StepKind::kConv) {
                    trp::LowRankConvArgs a = st.conv;
                    a.x = x; a.residual = y; a.out = out; a.threads = threads;
                    if (a.batch * a.out_h * a.out_w * a.out_c == 0) continue;
                    if (!(ok = call_kernel(a, st.kernel))) break;
                } else if (st.kind == StepKind::kAdd) {
                    trp::elementwise_add_relu(x, y, out, st.n, st.relu, threads);
                } else {
                    trp::PoolArgs p = st.pool;
                    p.x = x; p.out = out; p.threads = threads;
                    if (st.kind == StepKind::kMaxPool) trp::nhwc_max_pool(p);
                    else trp::nhwc_global_avg_pool(p);
                }
                if (profile_) {
                    const auto t1 = std::chrono::steady_clock::now();
                    times.push_back(std::chrono::duration<double>(t1 - t0).count());
                    t0 = t1;
                }
            }
            if (profile_ && ok) samples_.push_back(std::move(times));
        }
        if (!ok) throw std::bad_alloc();
    }

    int64_t steps() const { return int64_t(steps_.size()); }

    // Step times for a diagnosis (benches/program_steps.py): while on, each run records each
    // step's seconds (a clock read between steps); turning it on or off forgets the records.
    void set_profile(bool on) {
        profile_ = on;
        samples_.clear();
    }
    const std::vector<std::vector<double>>& profile() const { return samples_; }

private:
    enum class StepKind { kConv, kMaxPool, kAvgPool, kAdd };
    struct Step {
        StepKind kind;
        trp::LowRankConvArgs conv;
        Kernel kernel;
        trp::PoolArgs pool;
        int64_t n;
        bool relu;
        int x, y, out;
    };

    void check_slot(int s, int64_t floats, const char* what) const {
        if (s < 0 || s >= int64_t(sizes_.size())) {
            value_error(std::string(what) + " slot " + std::to_string(s) + " does not exist (" +
                        std::to_string(sizes_.size()) + " slots)");
        }
        if (s < n_inputs_ && std::string(what) == "out") {
            value_error("out slot " + std::to_string(s) + " is one of the caller's inputs, which a program never writes");
        }
        if (sizes_[s] < floats) {
            value_error(std::string(what) + " slot " + std::to_string(s) + " holds " + std::to_string(sizes_[s]) +
                        " floats, the step needs " + std::to_string(floats));
        }
    }

    std::vector<int64_t> sizes_;
    int n_inputs_, n_outputs_;
    std::vector<std::unique_ptr<float, decltype(&std::free)>> owned_;
    std::vector<py::object> plans_;
    std::vector<Step> steps_;
    bool profile_ = false;
    std::vector<std::vector<double>> samples_;
};

py::dict build_info_dict() {
    const trp::BuildInfo b = trp::build_info();
    py::dict d;
    d["version"] = b.version;
    d["compiler_id"] = b.compiler_id;
    d["compiler_version"] = b.compiler_version;
    d["cplusplus"] = b.cplusplus;
    d["cxx_standard"] = b.cxx_standard;
    d["build_type"] = b.build_type;
    d["native"] = b.native;
    d["compiled_avx2"] = b.compiled_avx2;
    d["compiled_avx512f"] = b.compiled_avx512f;
    d["openmp"] = b.openmp;
    d["openmp_max_threads"] = b.openmp_max_threads;
    d["arch"] = b.arch;
    d["cpu_detection"] = b.cpu_detection;
    d["cpu_avx2"] = b.cpu_avx2;
    d["cpu_avx512f"] = b.cpu_avx512f;
    return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "trp_kernels CPU extension. Use it through trp_kernels.cpp, not directly.";
    m.attr("__version__") = trp::build_info().version;

    m.def("build_info", &build_info_dict,
          "How the extension was built (compiler, flags, OpenMP) and what this CPU supports.");
    m.def("lowrank_conv", &lowrank_conv, py::arg("x"), py::arg("w1"), py::arg("w2").none(true),
          py::arg("bias").none(true), py::arg("residual").none(true), py::arg("out"), py::arg("scheme"),
          py::arg("kh"), py::arg("kw"), py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::arg("relu"),
          py::arg("threads"), py::arg("w3").none(true) = py::none(),
          "Fused conv chain (every stage + bias/residual/ReLU) into `out`, all NHWC float32.\n\n"
          "scheme: 'channel' or 'spatial' (w1, w2), 'tucker' (w1 1x1, w2 the core, w3 1x1; kh, kw and the "
          "geometry are the core's) or 'dense' (w1 only, w2 None). Each weight is a row-major panel "
          "[taps * in][out] (see trp_kernels/cpp.py); padding: (top, left), the bottom/right padding being "
          "implied by out's size. Releases the GIL.");
    py::class_<LowRankPlan>(m, "LowRankPlan",
                            "lowrank_conv checked once, on sample arrays of the shapes it will run on; "
                            "run() then takes only data pointers (the caller guarantees their shapes).")
        .def(py::init<py::handle, py::handle, py::handle, py::handle, py::handle, py::handle, const std::string&,
                      int64_t, int64_t, py::handle, py::handle, py::handle, bool, py::handle>(),
             py::arg("x"), py::arg("w1"), py::arg("w2").none(true), py::arg("bias").none(true),
             py::arg("residual").none(true), py::arg("out"), py::arg("scheme"), py::arg("kh"), py::arg("kw"),
             py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::arg("relu"),
             py::arg("w3").none(true) = py::none())
        .def_static("taps", &LowRankPlan::taps, py::arg("x"), py::arg("w"), py::arg("kept"),
                    py::arg("bias").none(true), py::arg("residual").none(true), py::arg("out"), py::arg("kh"),
                    py::arg("kw"), py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::arg("relu"),
                    "conv_taps checked once (arguments as conv_taps' but threads); the plan keeps its own copy "
                    "of the kept columns.")
        .def("run", &LowRankPlan::run, py::arg("x"), py::arg("out"), py::arg("residual"), py::arg("threads"),
             "Run on the buffers at these addresses (residual: 0 for none). Releases the GIL.");
    m.def("conv_taps", &conv_taps, py::arg("x"), py::arg("w"), py::arg("kept"), py::arg("bias").none(true),
          py::arg("residual").none(true), py::arg("out"), py::arg("kh"), py::arg("kw"), py::arg("stride"),
          py::arg("padding"), py::arg("dilation"), py::arg("relu"), py::arg("threads"),
          "Tap-sparse conv (SPP) into `out`, NHWC float32: the dense conv over the kept im2col columns `kept` "
          "(int64, each (ki * kw + kj) * in_channels + c, strictly ascending) with their weight rows w "
          "(n_kept, out_channels), + bias, + residual, ReLU. padding: (top, left). Releases the GIL.");
    m.attr("MAX_KERNEL") = kMaxKernel;
    py::class_<Program>(m, "Program",
                        "Steps over numbered NHWC float32 slots, run in one call (trp/program.py builds it).")
        .def(py::init<std::vector<int64_t>, int, int>(), py::arg("slot_floats"), py::arg("n_inputs"),
             py::arg("n_outputs"))
        .def("add_conv", &Program::add_conv, py::arg("plan"), py::arg("x"), py::arg("residual"), py::arg("out"))
        .def("add_max_pool", &Program::add_max_pool, py::arg("x"), py::arg("out"), py::arg("batch"), py::arg("in_h"),
             py::arg("in_w"), py::arg("c"), py::arg("out_h"), py::arg("out_w"), py::arg("kh"), py::arg("kw"),
             py::arg("stride_h"), py::arg("stride_w"), py::arg("pad_h"), py::arg("pad_w"), py::arg("relu"))
        .def("add_global_avg_pool", &Program::add_global_avg_pool, py::arg("x"), py::arg("out"), py::arg("batch"),
             py::arg("h"), py::arg("w"), py::arg("c"))
        .def("add_add", &Program::add_add, py::arg("x"), py::arg("y"), py::arg("out"), py::arg("n"), py::arg("relu"))
        .def("run", &Program::run, py::arg("inputs"), py::arg("outputs"), py::arg("threads"))
        .def_property_readonly("steps", &Program::steps)
        .def("set_profile", &Program::set_profile, py::arg("on"))
        .def("profile", &Program::profile, "Per profiled run, each step's seconds.");
    m.def("vector_width", &trp::lowrank_vector_width, "Floats per vector of the active fused-kernel build.");
    m.def("isa", &trp::lowrank_isa, "Name of the active fused-kernel build: generic, avx2 or avx512.");
    m.def("set_isa", [](const std::string& name) { return trp::lowrank_set_isa(name.c_str()); },
          py::arg("name"), "Switch the fused kernels to another build; False if unavailable here.");
    m.def("stream_bytes", &trp::lowrank_stream_bytes,
          "Outputs of at least this many bytes are written past the caches (streaming stores).");
    m.def("set_stream_bytes",
          [](int64_t bytes) {
              if (bytes < 0)
                  throw py::value_error("set_stream_bytes: bytes must be >= 0 (0: never stream), got " +
                                        std::to_string(bytes));
              trp::lowrank_set_stream_bytes(bytes);
          },
          py::arg("bytes"), "Set that threshold (0: never stream). For tests and benchmarks.");
    m.def("streamed_calls", &trp::lowrank_streamed_calls,
          "Kernel calls whose output was stored past the caches, since the extension was loaded.");
    m.def("winograd",
          [](py::object mode) {
              static const char* const names[] = {"never", "auto", "always"};
              if (!mode.is_none()) {
                  const std::string want = py::str(mode);
                  int found = -1;
                  for (int i = 0; i < 3; ++i)
                      if (want == names[i]) found = i;
                  if (found < 0)
                      throw py::value_error("winograd: mode must be 'never', 'auto' or 'always', got '" + want + "'");
                  trp::lowrank_set_winograd_mode(found);
              }
              return std::string(names[trp::lowrank_winograd_mode()]);
          },
          py::arg("mode") = py::none(),
          "When a 3x3 stride-1 first stage runs as Winograd F(2x2, 3x3): 'never', 'auto' (where measured to "
          "win) or 'always'. With a mode, sets it; returns the mode now in force.");
    m.def("winograd_calls", &trp::lowrank_winograd_calls,
          "Kernel calls that ran a Winograd first stage, since the extension was loaded.");
    m.def("flat_tucker_calls", &trp::lowrank_flat_tucker_calls,
          "Tucker kernel calls that took the stride-1 path (padded band buffer), since the extension was loaded.");
    m.def("conv2d_direct", &conv2d_direct, py::arg("input"), py::arg("weight"),
          py::arg("bias").none(true), py::arg("stride"), py::arg("padding"),
          py::arg("dilation"),
          "Naive direct 2-D convolution (reference order, double accumulation).\n\n"
          "input: float32 C-contiguous ndarray (batch, channels, height, width); weight: "
          "(out, in, kh, kw); bias: (out,) or None; stride, padding, dilation: 2-tuples of "
          "ints. Symmetric zero padding, groups=1. Returns a new float32 array. Nothing is "
          "converted or copied: any other dtype or layout raises ValueError.");
}
