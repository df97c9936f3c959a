// How this extension was compiled and what the CPU running it can do.
#pragma once

#include <string>

namespace trp {

struct BuildInfo {
    std::string version;           // trp_kernels version baked in by CMake
    std::string compiler_id;       // CMake's CMAKE_CXX_COMPILER_ID, e.g. "GNU"
    std::string compiler_version;  // CMake's CMAKE_CXX_COMPILER_VERSION, e.g. "12.2.0"
    long cplusplus;                // the __cplusplus value, e.g. 201703
    int cxx_standard;              // the same as a short number, e.g. 17
    std::string build_type;        // CMake configuration, e.g. "Release"
    bool native;                   // built with -march=native (TRP_NATIVE=ON)
    bool compiled_avx2;            // __AVX2__ was defined: the code may use AVX2 anywhere
    bool compiled_avx512f;         // __AVX512F__ was defined
    bool openmp;                   // OpenMP parallelism compiled in
    int openmp_max_threads;        // omp_get_max_threads() now, 1 without OpenMP
    std::string arch;              // "x86_64", "x86", "aarch64", ... or "unknown"
    std::string cpu_detection;     // how cpu_* were found: "builtin_cpu_supports" or "unknown"
    bool cpu_avx2;                 // the running CPU has AVX2 (false when undetectable)
    bool cpu_avx512f;              // the running CPU has AVX-512F (false when undetectable)
};

BuildInfo build_info();

}  // namespace trp
