// The fused low-rank kernels for the avx512 build (see lowrank_kernels.inc; CMakeLists.txt
// gives this file its instruction-set flags).
#include "lowrank_cpu.h"

#define TRP_ISA_NS isa_avx512
#define TRP_VL 16
#define TRP_MR 12
#include "lowrank_kernels.inc"
