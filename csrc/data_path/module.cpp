// The data path's compiled helpers, one pybind11 module: built by torch.utils.cpp_extension on first use
// (tikmix_loader/data/_compiled.py), a plain Python module rather than a torch op, whose dispatcher would
// cost about what these save. Nothing here uses torch.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "keyed_permutation.h"
#include "token_ranges.h"
#include "window_pieces.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tikmix-loader's compiled data-path helpers: keyed permutation, window cutting, token ranges.";
  m.def("permutation", &tikmix_data::permutation, py::arg("values"), py::arg("n"),
        "np.random.Generator(np.random.PCG64(np.random.SeedSequence(values))).permutation(n) for values "
        "in [0, 2**64) and n in [0, 2**32], as an int64 array.");
  m.def("window_pieces", &tikmix_data::window_pieces, py::arg("starts"), py::arg("width"),
        py::arg("first_blocks"), py::arg("block_index"),
        "(docs, lows, highs, eos_at) of the packed windows at starts, as DomainStream._window_pieces.");
  m.def("gather_ranges", &tikmix_data::gather_ranges, py::arg("tokens"), py::arg("offsets"), py::arg("docs"),
        py::arg("lows"), py::arg("highs"),
        "Tokens lows[i]..highs[i]-1 of document docs[i], concatenated; None when a range is out of bounds.");
}
