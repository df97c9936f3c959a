#include "build_info.h"

#ifdef TRP_HAS_OPENMP
#include <omp.h>
#endif

// CMake passes these; the fallbacks keep a hand-rolled compile (e.g. a quick g++ check)
// working.
#ifndef TRP_KERNELS_VERSION
#define TRP_KERNELS_VERSION "unknown"
#endif
#ifndef TRP_COMPILER_ID
#define TRP_COMPILER_ID "unknown"
#endif
#ifndef TRP_COMPILER_VERSION
#define TRP_COMPILER_VERSION "unknown"
#endif
#ifndef TRP_BUILD_TYPE
#define TRP_BUILD_TYPE "unknown"
#endif

#if defined(__x86_64__) || defined(_M_X64)
#define TRP_ARCH "x86_64"
#elif defined(__i386__) || defined(_M_IX86)
#define TRP_ARCH "x86"
#elif defined(__aarch64__) || defined(_M_ARM64)
#define TRP_ARCH "aarch64"
#elif defined(__arm__) || defined(_M_ARM)
#define TRP_ARCH "arm"
#elif defined(__powerpc64__)
#define TRP_ARCH "ppc64"
#else
#define TRP_ARCH "unknown"
#endif

// __builtin_cpu_supports exists only for x86 targets of GCC and Clang.
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define TRP_CAN_DETECT_CPU 1
#endif

namespace trp {

BuildInfo build_info() {
    BuildInfo info;
    info.version = TRP_KERNELS_VERSION;
    info.compiler_id = TRP_COMPILER_ID;
    info.compiler_version = TRP_COMPILER_VERSION;
    info.cplusplus = static_cast<long>(__cplusplus);
    info.cxx_standard = static_cast<int>((__cplusplus / 100) % 100);
    info.build_type = TRP_BUILD_TYPE;

#ifdef TRP_NATIVE
    info.native = true;
#else
    info.native = false;
#endif

#ifdef __AVX2__
    info.compiled_avx2 = true;
#else
    info.compiled_avx2 = false;
#endif
#ifdef __AVX512F__
    info.compiled_avx512f = true;
#else
    info.compiled_avx512f = false;
#endif

#ifdef TRP_HAS_OPENMP
    info.openmp = true;
    info.openmp_max_threads = omp_get_max_threads();
#else
    info.openmp = false;
    info.openmp_max_threads = 1;
#endif

    info.arch = TRP_ARCH;
#ifdef TRP_CAN_DETECT_CPU
    __builtin_cpu_init();
    info.cpu_detection = "builtin_cpu_supports";
    info.cpu_avx2 = __builtin_cpu_supports("avx2") != 0;
    info.cpu_avx512f = __builtin_cpu_supports("avx512f") != 0;
#else
    info.cpu_detection = "unknown";
    info.cpu_avx2 = false;
    info.cpu_avx512f = false;
#endif
    return info;
}

}  // namespace trp
