// The fused low-rank kernels for the generic build (see lowrank_kernels.inc; CMakeLists.txt
// gives this file its instruction-set flags).
#include "lowrank_cpu.h"

#define TRP_ISA_NS isa_generic
#define TRP_VL 4
#define TRP_MR 6
#include "lowrank_kernels.inc"
