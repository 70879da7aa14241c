// The algorithms by name, parsed in one place for the kernels and the hook.
#pragma once

#include <c10/util/Exception.h>

#include <string_view>

namespace ef21 {

enum class Algorithm { EF21, EF21_SGDM, EF, PLAIN, DENSE };

inline Algorithm parse_algorithm(std::string_view name) {
  if (name == "ef21") return Algorithm::EF21;
  if (name == "ef21-sgdm") return Algorithm::EF21_SGDM;
  if (name == "ef") return Algorithm::EF;
  if (name == "plain") return Algorithm::PLAIN;
  if (name == "dense") return Algorithm::DENSE;
  TORCH_CHECK(false, "algorithm='", name, "' is not supported; allowed: 'ef21', 'ef21-sgdm', 'ef', 'plain', 'dense'");
}

// g_i (and g) are kept and a dense step initialises them.
inline bool keeps_estimate(Algorithm a) { return a == Algorithm::EF21 || a == Algorithm::EF21_SGDM; }

// Bytes of one packed Top-k message: k int32 indices then k values.
inline int64_t packed_bytes(int64_t k, int64_t value_bytes) { return k * (4 + value_bytes); }

}  // namespace ef21
