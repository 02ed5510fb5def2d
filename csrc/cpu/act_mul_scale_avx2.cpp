// The CPU row kernel compiled for the AVX2 capability (see act_mul_scale_vec.h).
// The target must be set before any header, so every function here, inline ones from the
// headers included, is compiled for it.
#pragma GCC target("avx2,fma,f16c")
// g++ does not define the feature macros for a target pragma in C++; headers (sleef.h) test them.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY AVX2
#include "act_mul_scale_vec.h"

SGM_EXT_DEFINE_VEC_ROWS(select_vec_rows_AVX2)
