// numpy's keyed permutation, compiled: Generator(PCG64(SeedSequence(words))).permutation(n), bit for bit.
//
// Why hand-write what numpy does: every rank seeds one generator per shuffle chunk and block it reads, and
// one per global batch for the batch order, so seeding is on every rank's per-batch path. numpy's
// SeedSequence mixes its pool in Python-level code (about 12 us per generator, most of a 15 us call), which
// sets a floor under the per-rank time that does not fall with the world size. The loader's global stream
// must stay bit-identical, so this file computes the very same permutation in a microsecond or two;
// tikmix_loader/data/_compiled.py checks it against numpy at first use and falls back to numpy if they ever
// differ. Each step follows numpy 2.x's sources (named below) operation for operation.

#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace tikmix_data {

namespace py = pybind11;

using uint128 = unsigned __int128;

// numpy/random/bit_generator.pyx: SeedSequence's constants (pool of 4 uint32 words).
constexpr int kPoolSize = 4;
constexpr uint32_t kInitA = 0x43b0d7e5u;
constexpr uint32_t kMultA = 0x931e8875u;
constexpr uint32_t kInitB = 0x8b51f9ddu;
constexpr uint32_t kMultB = 0x58f38dedu;
constexpr uint32_t kMixMultL = 0xca01f9ddu;
constexpr uint32_t kMixMultR = 0x4973f715u;
constexpr int kXShift = 16;  // half the bits of a uint32

// The largest n whose Fisher-Yates draws all take random_interval's 32-bit branch (max = i <= n - 1).
constexpr int64_t kMaxLength = int64_t{1} << 32;

inline uint32_t hashmix(uint32_t value, uint32_t& hash_const) {
  value ^= hash_const;
  hash_const *= kMultA;
  value *= hash_const;
  value ^= value >> kXShift;
  return value;
}

inline uint32_t mix(uint32_t x, uint32_t y) {
  uint32_t result = kMixMultL * x - kMixMultR * y;
  result ^= result >> kXShift;
  return result;
}

// The uint32 words SeedSequence makes of non-negative ints (bit_generator.pyx, _int_to_uint32_array): each
// value's words, least significant first, and one word 0 for a zero.
inline std::vector<uint32_t> entropy_words(const std::vector<uint64_t>& values) {
  std::vector<uint32_t> words;
  words.reserve(2 * values.size());
  for (uint64_t value : values) {
    do {
      words.push_back(static_cast<uint32_t>(value));
      value >>= 32;
    } while (value != 0);
  }
  return words;
}

// SeedSequence(words).generate_state(4, np.uint64): SeedSequence.mix_entropy, then generate_state's 8 uint32
// words paired little-endian into 4 uint64.
inline std::array<uint64_t, 4> seed_state(const std::vector<uint32_t>& entropy) {
  std::array<uint32_t, kPoolSize> pool;
  uint32_t hash_const = kInitA;
  for (int i = 0; i < kPoolSize; ++i) {
    pool[i] = hashmix(static_cast<size_t>(i) < entropy.size() ? entropy[i] : 0u, hash_const);
  }
  for (int src = 0; src < kPoolSize; ++src) {
    for (int dst = 0; dst < kPoolSize; ++dst) {
      if (src != dst) pool[dst] = mix(pool[dst], hashmix(pool[src], hash_const));
    }
  }
  for (size_t src = kPoolSize; src < entropy.size(); ++src) {
    for (int dst = 0; dst < kPoolSize; ++dst) pool[dst] = mix(pool[dst], hashmix(entropy[src], hash_const));
  }
  std::array<uint32_t, 8> words;
  hash_const = kInitB;
  for (int i = 0; i < 8; ++i) {
    uint32_t value = pool[i % kPoolSize];
    value ^= hash_const;
    hash_const *= kMultB;
    value *= hash_const;
    value ^= value >> kXShift;
    words[i] = value;
  }
  std::array<uint64_t, 4> state;
  for (int i = 0; i < 4; ++i) state[i] = words[2 * i] | (static_cast<uint64_t>(words[2 * i + 1]) << 32);
  return state;
}

// numpy/random/src/pcg64/pcg64.h and pcg64.c: PCG64 (XSL-RR 128/64) with its buffered 32-bit draws.
class Pcg64 {
 public:
  // pcg64_set_seed: state and increment are (high, low) pairs of the seed words; pcg_setseq_128_srandom_r.
  explicit Pcg64(const std::array<uint64_t, 4>& seed) {
    const uint128 initstate = (static_cast<uint128>(seed[0]) << 64) | seed[1];
    const uint128 initseq = (static_cast<uint128>(seed[2]) << 64) | seed[3];
    state_ = 0;
    inc_ = (initseq << 1) | 1;
    step();
    state_ += initstate;
    step();
  }

  // pcg_setseq_128_xsl_rr_64_random_r: step, then output the new state.
  uint64_t next64() {
    step();
    const uint64_t folded = static_cast<uint64_t>(state_ >> 64) ^ static_cast<uint64_t>(state_);
    const unsigned rot = static_cast<unsigned>(state_ >> 122);
    return (folded >> rot) | (folded << ((-rot) & 63u));
  }

  // pcg64_next32: the low half of a 64-bit draw now, the high half on the next call.
  uint32_t next32() {
    if (has_uint32_) {
      has_uint32_ = false;
      return uinteger_;
    }
    const uint64_t next = next64();
    has_uint32_ = true;
    uinteger_ = static_cast<uint32_t>(next >> 32);
    return static_cast<uint32_t>(next);
  }

 private:
  void step() { state_ = state_ * kMultiplier + inc_; }

  static constexpr uint128 kMultiplier =
      (static_cast<uint128>(2549297995355413924ULL) << 64) | 4865540595714422341ULL;
  uint128 state_;
  uint128 inc_;
  bool has_uint32_ = false;
  uint32_t uinteger_ = 0;
};

// numpy/random/src/distributions/distributions.c, random_interval for max <= 0xffffffff: masked rejection
// on 32-bit draws. (Larger max would take 64-bit draws; kMaxLength keeps every call below that.)
inline uint32_t random_interval(Pcg64& rng, uint32_t max) {
  if (max == 0) return 0;
  uint32_t mask = max;
  mask |= mask >> 1;
  mask |= mask >> 2;
  mask |= mask >> 4;
  mask |= mask >> 8;
  mask |= mask >> 16;
  uint32_t value;
  while ((value = (rng.next32() & mask)) > max) {
  }
  return value;
}

// np.random.Generator(np.random.PCG64(np.random.SeedSequence(values))).permutation(n) for values in
// [0, 2**64) and n in [0, 2**32], as an int64 array.
inline py::array_t<int64_t> permutation(const std::vector<uint64_t>& values, int64_t n) {
  if (values.empty()) throw py::value_error("permutation needs at least one key value");
  if (n < 0 || n > kMaxLength) {
    throw py::value_error("permutation length must be in [0, 2**32], got " + std::to_string(n));
  }
  Pcg64 rng(seed_state(entropy_words(values)));
  py::array_t<int64_t> out(static_cast<py::ssize_t>(n));
  int64_t* data = out.mutable_data();
  for (int64_t i = 0; i < n; ++i) data[i] = i;  // np.arange(n)
  // numpy/random/_generator.pyx, Generator.shuffle -> _shuffle_raw(first=1): Fisher-Yates from the end.
  for (int64_t i = n - 1; i >= 1; --i) {
    const int64_t j = random_interval(rng, static_cast<uint32_t>(i));
    const int64_t held = data[j];
    data[j] = data[i];
    data[i] = held;
  }
  return out;
}

}  // namespace tikmix_data
