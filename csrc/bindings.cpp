// pybind11 module trp_kernels._C. Python-facing checks live here so the kernels can trust
// their arguments: nothing below touches a data pointer until every shape, dtype, layout
// and hyper-parameter has been validated.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <array>
#include <climits>
#include <cstdint>
#include <sstream>
#include <string>

#include "build_info.h"
#include "conv2d_direct.h"

namespace py = pybind11;

namespace {

// Bounds every spatial size and hyper-parameter so that conv2d_out_size cannot overflow
// int64 (dil * (k - 1) < 2^62). Nothing real comes near it.
constexpr int64_t kMaxDim = (int64_t{1} << 31) - 1;

[[noreturn]] void value_error(const std::string& msg) {
    throw py::value_error("conv2d_direct: " + msg);
}

[[noreturn]] void type_error(const std::string& msg) {
    throw py::type_error("conv2d_direct: " + msg);
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

py::array_t<float> conv2d_direct(py::handle input_obj, py::handle weight_obj,
                                 py::handle bias_obj, py::handle stride_obj,
                                 py::handle padding_obj, py::handle dilation_obj) {
    py::array input = require_f32(input_obj, "input", 4, "(batch, channels, height, width)");
    py::array weight = require_f32(weight_obj, "weight", 4, "(out, in, kh, kw)");
    py::array bias;
    const bool has_bias = !bias_obj.is_none();
    if (has_bias) bias = require_f32(bias_obj, "bias", 1, "(out,)");

    const auto stride = parse_pair(stride_obj, "stride");
    const auto padding = parse_pair(padding_obj, "padding");
    const auto dilation = parse_pair(dilation_obj, "dilation");
    check_range(stride, "stride", 1, stride_obj);
    check_range(padding, "padding", 0, padding_obj);
    check_range(dilation, "dilation", 1, dilation_obj);

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
    m.def("conv2d_direct", &conv2d_direct, py::arg("input"), py::arg("weight"),
          py::arg("bias").none(true), py::arg("stride"), py::arg("padding"),
          py::arg("dilation"),
          "Naive direct 2-D convolution (reference order, double accumulation).\n\n"
          "input: float32 C-contiguous ndarray (batch, channels, height, width); weight: "
          "(out, in, kh, kw); bias: (out,) or None; stride, padding, dilation: 2-tuples of "
          "ints. Symmetric zero padding, groups=1. Returns a new float32 array. Nothing is "
          "converted or copied: any other dtype or layout raises ValueError.");
}
