// The CPU row kernel compiled for the DEFAULT capability (see act_mul_scale_vec.h).
// The target must be set before any header, so every function here, inline ones from the
// headers included, is compiled for it.

#define CPU_CAPABILITY DEFAULT
#include "act_mul_scale_vec.h"

SGM_EXT_DEFINE_VEC_ROWS(select_vec_rows_DEFAULT)
