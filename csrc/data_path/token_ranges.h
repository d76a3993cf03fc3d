// Reading token ranges of documents out of a flat token array: MemmapSource.read_doc_ranges, compiled.
//
// A rank at large world size reads a few ranges per domain and batch (the pieces of its windows); checking
// and slicing them in Python ints, one numpy slice per range and a concatenate, was the largest piece of a
// sparse read after the window cutting. The Python version stays for the errors: this returns None when a
// range is out of bounds, and the caller's Python path then raises the error that names it.

#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>

namespace tikmix_data {

namespace py = pybind11;

using RangeArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using OffsetArray = py::array_t<int64_t, py::array::c_style>;  // never copied: it may map billions

template <typename Token>
py::object gather_ranges_of(const py::array& tokens, const OffsetArray& offsets, const RangeArray& docs,
                            const RangeArray& lows, const RangeArray& highs) {
  const int64_t count = docs.size(), num_docs = offsets.size() - 1;
  const int64_t* offset = offsets.data();
  const int64_t *doc = docs.data(), *low = lows.data(), *high = highs.data();
  int64_t total = 0;
  for (int64_t i = 0; i < count; ++i) {
    if (doc[i] < 0 || doc[i] >= num_docs || low[i] < 0 || low[i] > high[i] ||
        high[i] > offset[doc[i] + 1] - offset[doc[i]]) {
      return py::none();
    }
    total += high[i] - low[i];
  }
  py::array_t<Token> out(static_cast<py::ssize_t>(total));
  Token* cursor = out.mutable_data();
  const Token* source = static_cast<const Token*>(tokens.data());
  for (int64_t i = 0; i < count; ++i) {
    cursor = std::copy(source + offset[doc[i]] + low[i], source + offset[doc[i]] + high[i], cursor);
  }
  return std::move(out);
}

// Tokens lows[i] .. highs[i]-1 of document docs[i] of `tokens` (1-D, C-contiguous; document d is
// tokens[offsets[d] : offsets[d + 1]]), concatenated, in the tokens' dtype; None when a document or range
// is out of bounds, the three lengths differ, or the dtype is not one of the memmap token dtypes.
inline py::object gather_ranges(const py::array& tokens, const OffsetArray& offsets, const RangeArray& docs,
                                const RangeArray& lows, const RangeArray& highs) {
  if (tokens.ndim() != 1 || !(tokens.flags() & py::array::c_style) || offsets.ndim() != 1 ||
      offsets.size() < 1 || docs.size() != lows.size() || docs.size() != highs.size()) {
    return py::none();
  }
  // isinstance on array_t compares dtypes as numpy does (PyArray_EquivTypes), byte order included.
  if (py::isinstance<py::array_t<uint8_t>>(tokens)) {
    return gather_ranges_of<uint8_t>(tokens, offsets, docs, lows, highs);
  }
  if (py::isinstance<py::array_t<uint16_t>>(tokens)) {
    return gather_ranges_of<uint16_t>(tokens, offsets, docs, lows, highs);
  }
  if (py::isinstance<py::array_t<int32_t>>(tokens)) {
    return gather_ranges_of<int32_t>(tokens, offsets, docs, lows, highs);
  }
  if (py::isinstance<py::array_t<uint32_t>>(tokens)) {
    return gather_ranges_of<uint32_t>(tokens, offsets, docs, lows, highs);
  }
  if (py::isinstance<py::array_t<int64_t>>(tokens)) {
    return gather_ranges_of<int64_t>(tokens, offsets, docs, lows, highs);
  }
  return py::none();
}

}  // namespace tikmix_data
