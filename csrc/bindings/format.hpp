// Numbers in error messages: the shortest form that reads back to the same value ("1e-300",
// "-2.5e-07" for a float32), not std::to_string's fixed six decimals (1e-300 as "0.000000").
#pragma once
#include <charconv>
#include <string>

namespace pyzeroq {
template <typename T>
std::string number_repr(T v) {
  char buf[64];
  const auto res = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, res.ptr);
}
}  // namespace pyzeroq
