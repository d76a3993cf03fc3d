// Cutting a few packed windows into document pieces: DomainStream._window_pieces_scalar, compiled.
//
// A rank at large world size reads a few windows per domain and batch, and cutting them in Python (a
// bisect and a handful of int conversions per document piece, the same walk as below, which still runs
// when the compiled helpers are unavailable) was the largest piece of a sparse read's cost. The numpy
// version, DomainStream._window_pieces (vectorised over windows), is the reference: it cuts the same
// pieces in the same order (tests/data/test_stream.py compares them).

#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace tikmix_data {

namespace py = pybind11;

using IndexArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

// One block's index: its documents' storage ids in shuffled order, and where each starts and ends (after
// its EOS) in the epoch's packed stream.
struct BlockIndex {
  int64_t block;
  IndexArray ids, starts, ends;
};

// The pieces of the windows of `width` tokens at `starts` (token offsets in the epoch's packed stream):
// (docs, lows, highs, eos_at), piece i being tokens lows[i] .. highs[i]-1 of document docs[i], in window
// order, and eos_at the flat positions (row * width + column) of the EOS tokens. `first_blocks[row]` is
// the block (position in the epoch's block order) holding the window's first token; `block_index(block)`
// returns that block's (ids, starts, ends), and is called once per block the windows touch.
inline py::tuple window_pieces(const std::vector<int64_t>& starts, int64_t width,
                               const std::vector<int64_t>& first_blocks, const py::function& block_index) {
  if (first_blocks.size() != starts.size()) {
    throw py::value_error("window_pieces needs one first block per window start");
  }
  std::vector<int64_t> docs, lows, highs, eos_at;
  std::vector<BlockIndex> met;  // the block indexes met so far (a few)
  for (size_t row = 0; row < starts.size(); ++row) {
    const int64_t start = starts[row], stop = start + width;
    int64_t cursor = start, block = first_blocks[row];
    while (cursor < stop) {  // one block per pass (a block of documents with 0 copies adds nothing)
      auto found =
          std::find_if(met.begin(), met.end(), [&](const BlockIndex& index) { return index.block == block; });
      if (found == met.end()) {
        py::tuple index = block_index(block);
        met.push_back({block, index[0].cast<IndexArray>(), index[1].cast<IndexArray>(),
                       index[2].cast<IndexArray>()});
        found = met.end() - 1;
      }
      const int64_t count = found->ids.size();
      const int64_t* ids = found->ids.data();
      const int64_t* doc_starts = found->starts.data();
      const int64_t* ends = found->ends.data();
      // The first document ending after the cursor, then each document under the rest of the window.
      for (int64_t doc = std::upper_bound(ends, ends + count, cursor) - ends; doc < count && cursor < stop;
           ++doc) {
        const int64_t piece_stop = std::min(stop, ends[doc]);
        docs.push_back(ids[doc]);
        lows.push_back(cursor - doc_starts[doc]);
        if (piece_stop == ends[doc]) {  // the document's EOS is inside the window
          highs.push_back(ends[doc] - 1 - doc_starts[doc]);
          eos_at.push_back(static_cast<int64_t>(row) * width + ends[doc] - 1 - start);
        } else {
          highs.push_back(piece_stop - doc_starts[doc]);
        }
        cursor = piece_stop;
      }
      ++block;
    }
  }
  auto as_array = [](const std::vector<int64_t>& values) {
    py::array_t<int64_t> out(static_cast<py::ssize_t>(values.size()));
    std::copy(values.begin(), values.end(), out.mutable_data());
    return out;
  };
  return py::make_tuple(as_array(docs), as_array(lows), as_array(highs), as_array(eos_at));
}

}  // namespace tikmix_data
