// The CUDA built-ins that snella's kernels use, for compiling cuda/*.cu with the host C++ compiler: the
// emulated CUDA device (`--device cuda-emu`; the runtime is src/runtime/emu/). Included by common.cuh when
// SNELLA_EMU is defined (build.rs), instead of <cuda_runtime.h>.
//
// Each CUDA thread of a block runs as a fiber on one host thread. Everything that synchronises threads or
// that the sanitizers must see goes through a call into the Rust runtime: thread and block indices, barriers,
// warp intrinsics, atomics and shared memory. Plain loads and stores are seen through the compiler's
// -fsanitize=thread instrumentation (build.rs). The `site` argument names the source line of a call, for the
// checks' messages and to tell one barrier or shuffle from another.
#pragma once
#include <math.h>
#include <stdint.h>

#define __global__ __attribute__((noinline))
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __restrict__ __restrict
#define warpSize 32

struct uint3 {
    unsigned int x, y, z;
};
typedef uint3 dim3;

extern "C" {
uint3 snella_emu_thread_idx(void);
uint3 snella_emu_block_idx(void);
uint3 snella_emu_block_dim(void);
uint3 snella_emu_grid_dim(void);
void snella_emu_syncthreads(const char* site);
// mode: 0 idx, 1 up, 2 down, 3 xor.
unsigned snella_emu_shfl(int mode, unsigned mask, unsigned value, int lane_arg, int width, const char* site);
unsigned snella_emu_match_any(unsigned mask, unsigned long long value, const char* site);
// mode: 0 ballot, 1 any, 2 all.
unsigned snella_emu_vote(int mode, unsigned mask, int predicate, const char* site);
void* snella_emu_shared(unsigned long bytes, unsigned long align, const char* name, const char* site);
void* snella_emu_dynamic_shared(const char* name, const char* site);
// op: 0 add, 1 or, 2 and, 3 max, 4 min, 5 exchange.
unsigned snella_emu_atomic_u32(int op, void* addr, unsigned value, int is_signed, const char* site);
unsigned snella_emu_atomic_cas_u32(void* addr, unsigned compare, unsigned value, const char* site);
float snella_emu_atomic_add_f32(float* addr, float value, const char* site);
}

#define SNELLA_EMU_STR2(x) #x
#define SNELLA_EMU_STR(x) SNELLA_EMU_STR2(x)
#define SNELLA_EMU_SITE __FILE__ ":" SNELLA_EMU_STR(__LINE__)

#define threadIdx (snella_emu_thread_idx())
#define blockIdx (snella_emu_block_idx())
#define blockDim (snella_emu_block_dim())
#define gridDim (snella_emu_grid_dim())

#define __syncthreads() snella_emu_syncthreads(SNELLA_EMU_SITE)

// Shared memory: each block has its own; the runtime knows every array's extent (memcheck) and tracks each
// word's readers and writer between barriers (racecheck). common.cuh defines these for nvcc as plain
// __shared__ declarations.
template <typename T>
__forceinline__ T* snella_emu_shared_array(const char* name, const char* site) {
    return (T*)snella_emu_shared(sizeof(T), alignof(T), name, site);
}
#define SHARED_ARRAY(type, name, dims) type(&name) dims = *snella_emu_shared_array<type dims>(#name, SNELLA_EMU_SITE)
#define DYNAMIC_SHARED(type, name) type* const name = (type*)snella_emu_dynamic_shared(#name, SNELLA_EMU_SITE)

// ---- warp intrinsics: 32-bit values (float, int, unsigned) ----
template <typename T>
__forceinline__ T snella_emu_shfl_t(int mode, const char* site, unsigned mask, T v, int arg, int width = 32) {
    static_assert(sizeof(T) == 4, "the emulator shuffles 32-bit values");
    return __builtin_bit_cast(T, snella_emu_shfl(mode, mask, __builtin_bit_cast(unsigned, v), arg, width, site));
}
#define __shfl_sync(...) snella_emu_shfl_t(0, SNELLA_EMU_SITE, __VA_ARGS__)
#define __shfl_up_sync(...) snella_emu_shfl_t(1, SNELLA_EMU_SITE, __VA_ARGS__)
#define __shfl_down_sync(...) snella_emu_shfl_t(2, SNELLA_EMU_SITE, __VA_ARGS__)
#define __shfl_xor_sync(...) snella_emu_shfl_t(3, SNELLA_EMU_SITE, __VA_ARGS__)

template <typename T>
__forceinline__ unsigned snella_emu_match_any_t(const char* site, unsigned mask, T v) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "match takes 32- or 64-bit values");
    if constexpr (sizeof(T) == 4) {
        return snella_emu_match_any(mask, __builtin_bit_cast(unsigned, v), site);
    } else {
        return snella_emu_match_any(mask, __builtin_bit_cast(unsigned long long, v), site);
    }
}
#define __match_any_sync(...) snella_emu_match_any_t(SNELLA_EMU_SITE, __VA_ARGS__)
#define __ballot_sync(mask, pred) snella_emu_vote(0, (mask), (pred) != 0, SNELLA_EMU_SITE)
#define __any_sync(mask, pred) ((int)snella_emu_vote(1, (mask), (pred) != 0, SNELLA_EMU_SITE))
#define __all_sync(mask, pred) ((int)snella_emu_vote(2, (mask), (pred) != 0, SNELLA_EMU_SITE))

// ---- atomics ----
__forceinline__ unsigned snella_emu_atomic_add(const char* s, unsigned* a, unsigned v) {
    return snella_emu_atomic_u32(0, a, v, 0, s);
}
__forceinline__ int snella_emu_atomic_add(const char* s, int* a, int v) {
    return (int)snella_emu_atomic_u32(0, a, (unsigned)v, 1, s);
}
__forceinline__ float snella_emu_atomic_add(const char* s, float* a, float v) { return snella_emu_atomic_add_f32(a, v, s); }
__forceinline__ unsigned snella_emu_atomic_or(const char* s, unsigned* a, unsigned v) {
    return snella_emu_atomic_u32(1, a, v, 0, s);
}
__forceinline__ unsigned snella_emu_atomic_and(const char* s, unsigned* a, unsigned v) {
    return snella_emu_atomic_u32(2, a, v, 0, s);
}
__forceinline__ unsigned snella_emu_atomic_max(const char* s, unsigned* a, unsigned v) {
    return snella_emu_atomic_u32(3, a, v, 0, s);
}
__forceinline__ int snella_emu_atomic_max(const char* s, int* a, int v) {
    return (int)snella_emu_atomic_u32(3, a, (unsigned)v, 1, s);
}
__forceinline__ unsigned snella_emu_atomic_min(const char* s, unsigned* a, unsigned v) {
    return snella_emu_atomic_u32(4, a, v, 0, s);
}
__forceinline__ int snella_emu_atomic_min(const char* s, int* a, int v) {
    return (int)snella_emu_atomic_u32(4, a, (unsigned)v, 1, s);
}
__forceinline__ unsigned snella_emu_atomic_exch(const char* s, unsigned* a, unsigned v) {
    return snella_emu_atomic_u32(5, a, v, 0, s);
}
__forceinline__ unsigned snella_emu_atomic_cas(const char* s, unsigned* a, unsigned c, unsigned v) {
    return snella_emu_atomic_cas_u32(a, c, v, s);
}
#define atomicAdd(...) snella_emu_atomic_add(SNELLA_EMU_SITE, __VA_ARGS__)
#define atomicOr(...) snella_emu_atomic_or(SNELLA_EMU_SITE, __VA_ARGS__)
#define atomicAnd(...) snella_emu_atomic_and(SNELLA_EMU_SITE, __VA_ARGS__)
#define atomicMax(...) snella_emu_atomic_max(SNELLA_EMU_SITE, __VA_ARGS__)
#define atomicMin(...) snella_emu_atomic_min(SNELLA_EMU_SITE, __VA_ARGS__)
#define atomicExch(...) snella_emu_atomic_exch(SNELLA_EMU_SITE, __VA_ARGS__)
#define atomicCAS(...) snella_emu_atomic_cas(SNELLA_EMU_SITE, __VA_ARGS__)

// ---- CUDA's min and max for integers (floats use fminf/fmaxf) ----
__forceinline__ int min(int a, int b) { return a < b ? a : b; }
__forceinline__ int max(int a, int b) { return a > b ? a : b; }
__forceinline__ unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
__forceinline__ unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
__forceinline__ long min(long a, long b) { return a < b ? a : b; }
__forceinline__ long max(long a, long b) { return a > b ? a : b; }

// ---- bit casts and integer intrinsics ----
__forceinline__ unsigned __float_as_uint(float x) { return __builtin_bit_cast(unsigned, x); }
__forceinline__ float __uint_as_float(unsigned x) { return __builtin_bit_cast(float, x); }
__forceinline__ int __float_as_int(float x) { return __builtin_bit_cast(int, x); }
__forceinline__ float __int_as_float(int x) { return __builtin_bit_cast(float, x); }
__forceinline__ int __ffs(int x) { return __builtin_ffs(x); }
__forceinline__ int __ffsll(long long x) { return __builtin_ffsll(x); }
__forceinline__ int __popc(unsigned x) { return __builtin_popcount(x); }
__forceinline__ int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
__forceinline__ int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }

// ---- IEEE single-precision intrinsics: the host compile has no FMA contraction (-ffp-contract=off), so each
// operation is rounded on its own, as the _rn intrinsics are on the GPU ----
__forceinline__ float __fadd_rn(float a, float b) { return a + b; }
__forceinline__ float __fsub_rn(float a, float b) { return a - b; }
__forceinline__ float __fmul_rn(float a, float b) { return a * b; }
__forceinline__ float __fdiv_rn(float a, float b) { return a / b; }
__forceinline__ float __fsqrt_rn(float a) { return sqrtf(a); }
__forceinline__ float __frcp_rn(float a) { return 1.0f / a; }
__forceinline__ float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
