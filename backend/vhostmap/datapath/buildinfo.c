/* The build's instruction set, from the compiler's own macros for the -march it was given. */
#include "kernels.h"

const char *vhu_build_isa(void)
{
#if defined(__AVX512F__)
    return "avx512f";
#elif defined(__AVX2__)
    return "avx2";
#elif defined(__SSE4_2__)
    return "sse4.2";
#else
    return "baseline";
#endif
}
