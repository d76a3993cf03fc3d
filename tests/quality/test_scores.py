"""Quality score storage: sidecars in every format, Parquet columns, and every bad input named."""

import numpy as np
import pytest
from testkit.formats import FORMATS, make_domain_files, random_docs

from tikmix_loader.data.domain import Domain
from tikmix_loader.errors import ScoreError
from tikmix_loader.quality import list_criteria, read_scores, scores_dir, write_scores


@pytest.mark.parametrize("fmt", FORMATS)
def test_scores_round_trip_in_every_format(tmp_path, fmt):
    path = make_domain_files(tmp_path, fmt, random_docs(40, seed=1))
    domain = Domain("web", path)
    values = np.linspace(-1, 1, 40)
    written = write_scores(path, "ref_ppl", values, num_docs=domain.num_docs)
    assert written.parent == scores_dir(path) and written.is_file()
    assert list_criteria(domain) == ["ref_ppl"]
    read = read_scores(Domain("web", path), ["ref_ppl"])["ref_ppl"]
    np.testing.assert_allclose(read, values.astype(np.float32))  # stored as float32


def test_parquet_column_is_a_criterion(tmp_path):
    docs = random_docs(30, seed=2)
    path = make_domain_files(tmp_path, "parquet", docs, rows_per_group=7)
    scores = read_scores(Domain("web", path), ["num_tokens"])["num_tokens"]
    np.testing.assert_array_equal(scores, [len(doc) for doc in docs])


def test_missing_criterion_names_domain_and_what_exists(tmp_path):
    path = make_domain_files(tmp_path, "mds", random_docs(10, seed=3))
    domain = Domain("code", path)
    write_scores(path, "compression", np.zeros(10), num_docs=10)
    with pytest.raises(ScoreError, match=r"'code'.*'ref_ppl'.*\['compression'\]"):
        read_scores(domain, ["ref_ppl"])


@pytest.mark.parametrize(
    ("values", "message"),
    [(np.zeros(9), "one value per document"), (np.array([np.nan] + [0.0] * 9), "first at document 0")],
)
def test_bad_scores_are_refused_before_writing(tmp_path, values, message):
    path = make_domain_files(tmp_path, "memmap", random_docs(10, seed=4))
    with pytest.raises(ScoreError, match=message):
        write_scores(path, "x", values, num_docs=10)
    assert not (scores_dir(path) / "x.npy").exists()


def test_stale_scores_of_other_data_are_refused(tmp_path):
    path = make_domain_files(tmp_path, "parquet", random_docs(10, seed=5))
    write_scores(path, "x", np.zeros(10), num_docs=10)
    other = make_domain_files(tmp_path, "parquet", random_docs(12, seed=5), name="other")
    scores_dir(other).mkdir()
    (scores_dir(path) / "x.npy").rename(scores_dir(other) / "x.npy")
    with pytest.raises(ScoreError, match=r"\(12 documents\), got shape \(10,\)"):
        read_scores(Domain("other", other), ["x"])


@pytest.mark.parametrize("name", ["", "../evil", "a/b", "x.npy", 3])
def test_unusable_criterion_names(tmp_path, name):
    path = make_domain_files(tmp_path, "memmap", random_docs(3, seed=6))
    with pytest.raises(ScoreError, match="criterion name"):
        write_scores(path, name, np.zeros(3), num_docs=3)
