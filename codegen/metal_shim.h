// A small stand-in for <metal_stdlib> that lets clang type-check generated Metal Shading Language as C++17 on
// machines without Metal (codegen/metal.py: check_msl). It models what dzc's Metal kernels use, strictly enough
// to catch wrong types, address-space mixups and bad vector constructors; it cannot run anything, and it does
// not model MSL-only overload rules. [[attribute]] spellings are checked by check_msl before parsing.
#pragma once

// address spaces
#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
#define threadgroup __attribute__((address_space(3)))
#define thread
#define kernel

#define INFINITY __builtin_inff()
#define NAN __builtin_nanf("")

typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;
typedef _Float16 half;

namespace metal {
template <class T> struct lanes_of { static constexpr int n = 1; typedef T elem; };
template <class T, int N> struct lanes_of<T __attribute__((ext_vector_type(N)))> {
  static constexpr int n = N; typedef T elem;
};
template <class T> struct is_floating { static constexpr bool value = false; };
template <> struct is_floating<float> { static constexpr bool value = true; };
template <> struct is_floating<half> { static constexpr bool value = true; };
template <class T> constexpr bool floating_v = is_floating<typename lanes_of<T>::elem>::value;
template <class T> struct is_arith { static constexpr bool value = __is_arithmetic(T); };

// Vector constructors: MSL's `float4(a, b)` spelled through a function-like macro per type (below). The lane
// counts of the arguments must add up to the vector's, or a single scalar splats, or a single vector of the
// same length converts.
template <class V, class... A> inline V make(A... a) {
  constexpr int total = (0 + ... + lanes_of<A>::n);
  static_assert(total == lanes_of<V>::n || (sizeof...(A) == 1 && total == 1),
                "MSL vector constructor: the arguments' lanes must add up to the vector's");
  static_assert((... && is_arith<typename lanes_of<A>::elem>::value), "MSL vector constructor: non-numeric argument");
  return V{};
}

template <class T, class U> inline T as_type(U x) {
  static_assert(sizeof(T) == sizeof(U), "as_type: sizes differ");
  return __builtin_bit_cast(T, x);
}

#define DZC_FLOAT1(name) template <class T> inline T name(T x) { \
  static_assert(floating_v<T>, #name ": needs float or half"); return x; }
DZC_FLOAT1(exp) DZC_FLOAT1(log) DZC_FLOAT1(sqrt) DZC_FLOAT1(sin) DZC_FLOAT1(cos) DZC_FLOAT1(rsqrt)
DZC_FLOAT1(exp2) DZC_FLOAT1(log2) DZC_FLOAT1(fabs) DZC_FLOAT1(rint)
#undef DZC_FLOAT1
template <class T> inline T fma(T a, T b, T c) { static_assert(floating_v<T>, "fma: needs float or half"); return a; }
template <class T> inline T fmax(T a, T b) { static_assert(floating_v<T>, "fmax: needs float or half"); return a; }
template <class T> inline T fmin(T a, T b) { static_assert(floating_v<T>, "fmin: needs float or half"); return a; }
template <class T> inline T fmod(T a, T b) { static_assert(floating_v<T>, "fmod: needs float or half"); return a; }
template <class T> inline T max(T a, T b) { static_assert(!floating_v<T>, "max: use fmax for floats"); return a; }
template <class T> inline T min(T a, T b) { static_assert(!floating_v<T>, "min: use fmin for floats"); return a; }
template <class T, class M> inline T select(T a, T b, M c) {
  static_assert(lanes_of<T>::n == lanes_of<M>::n, "select: condition lanes differ");
  return a;
}
template <class T> inline T simd_sum(T x) { return x; }
template <class T> inline T simd_max(T x) { return x; }

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }
inline void threadgroup_barrier(mem_flags) {}
inline void simdgroup_barrier(mem_flags) {}
}  // namespace metal

// vector types (booleans as int masks: clang's bool vectors have no swizzles), packed types, constructors
#define DZC_VEC(T, N) \
  typedef T T##N __attribute__((ext_vector_type(N))); \
  typedef T packed_##T##N __attribute__((ext_vector_type(N), aligned(sizeof(T))));
#define DZC_VECS(T) DZC_VEC(T, 2) DZC_VEC(T, 3) DZC_VEC(T, 4)
DZC_VECS(char) DZC_VECS(uchar) DZC_VECS(short) DZC_VECS(ushort) DZC_VECS(int) DZC_VECS(uint) DZC_VECS(long)
DZC_VECS(ulong) DZC_VECS(half) DZC_VECS(float)
typedef int bool2 __attribute__((ext_vector_type(2)));
typedef int bool3 __attribute__((ext_vector_type(3)));
typedef int bool4 __attribute__((ext_vector_type(4)));
#undef DZC_VECS
#undef DZC_VEC

#define char2(...) ::metal::make<::char2>(__VA_ARGS__)
#define char3(...) ::metal::make<::char3>(__VA_ARGS__)
#define char4(...) ::metal::make<::char4>(__VA_ARGS__)
#define uchar2(...) ::metal::make<::uchar2>(__VA_ARGS__)
#define uchar3(...) ::metal::make<::uchar3>(__VA_ARGS__)
#define uchar4(...) ::metal::make<::uchar4>(__VA_ARGS__)
#define short2(...) ::metal::make<::short2>(__VA_ARGS__)
#define short3(...) ::metal::make<::short3>(__VA_ARGS__)
#define short4(...) ::metal::make<::short4>(__VA_ARGS__)
#define ushort2(...) ::metal::make<::ushort2>(__VA_ARGS__)
#define ushort3(...) ::metal::make<::ushort3>(__VA_ARGS__)
#define ushort4(...) ::metal::make<::ushort4>(__VA_ARGS__)
#define int2(...) ::metal::make<::int2>(__VA_ARGS__)
#define int3(...) ::metal::make<::int3>(__VA_ARGS__)
#define int4(...) ::metal::make<::int4>(__VA_ARGS__)
#define uint2(...) ::metal::make<::uint2>(__VA_ARGS__)
#define uint3(...) ::metal::make<::uint3>(__VA_ARGS__)
#define uint4(...) ::metal::make<::uint4>(__VA_ARGS__)
#define long2(...) ::metal::make<::long2>(__VA_ARGS__)
#define long3(...) ::metal::make<::long3>(__VA_ARGS__)
#define long4(...) ::metal::make<::long4>(__VA_ARGS__)
#define half2(...) ::metal::make<::half2>(__VA_ARGS__)
#define half3(...) ::metal::make<::half3>(__VA_ARGS__)
#define half4(...) ::metal::make<::half4>(__VA_ARGS__)
#define float2(...) ::metal::make<::float2>(__VA_ARGS__)
#define float3(...) ::metal::make<::float3>(__VA_ARGS__)
#define float4(...) ::metal::make<::float4>(__VA_ARGS__)
#define bool2(...) ::metal::make<::bool2>(__VA_ARGS__)
#define bool3(...) ::metal::make<::bool3>(__VA_ARGS__)
#define bool4(...) ::metal::make<::bool4>(__VA_ARGS__)
