// Strict parsing of the D2SM_* environment variables the C++ side reads (docs/DESIGN.md §7):
// an unset or empty variable means "not given"; anything that is not a complete, valid value
// raises with the variable's name and what was expected (never a silent 0 from atoll/atof).
#pragma once

#include <c10/util/Exception.h>

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <initializer_list>
#include <optional>
#include <string>

namespace d2sm_ext::env {

inline const char* raw(const char* name) {
  const char* value = std::getenv(name);
  return value && *value ? value : nullptr;
}

// An integer >= minimum.
inline std::optional<int64_t> integer(const char* name, int64_t minimum) {
  const char* text = raw(name);
  if (!text) return std::nullopt;
  char* end = nullptr;
  errno = 0;
  const long long value = std::strtoll(text, &end, 10);
  TORCH_CHECK(errno == 0 && end != text && *end == '\0' && value >= minimum, name, " must be an integer >= ",
              minimum, ", got '", text, "'");
  return static_cast<int64_t>(value);
}

// A finite number > 0.
inline std::optional<double> positive_number(const char* name) {
  const char* text = raw(name);
  if (!text) return std::nullopt;
  char* end = nullptr;
  errno = 0;
  const double value = std::strtod(text, &end);
  TORCH_CHECK(errno == 0 && end != text && *end == '\0' && std::isfinite(value) && value > 0, name,
              " must be a number > 0, got '", text, "'");
  return value;
}

// One of `choices`; `fallback` when unset.
inline std::string choice(const char* name, std::initializer_list<const char*> choices, const char* fallback) {
  const char* text = raw(name);
  if (!text) return fallback;
  std::string allowed;
  for (const char* c : choices) {
    if (std::string(text) == c) return text;
    allowed += allowed.empty() ? c : std::string(", ") + c;
  }
  TORCH_CHECK(false, name, " must be one of ", allowed, ", got '", text, "'");
}

}  // namespace d2sm_ext::env
