"""The README's plain-PyTorch training loop, run exactly as written, on a small corpus of the same layout."""

import re
from pathlib import Path

from testkit.corpus import make_text_corpus

from tikmix_loader import MixtureLoader
from tikmix_loader.ledger import verify

README = Path(__file__).resolve().parents[1] / "README.md"


def _plain_loop_code() -> str:
    text = README.read_text()
    block = re.search(
        r"<!-- plain-loop:start -->\s*```python\n(.*?)```\s*<!-- plain-loop:end -->", text, re.S
    )
    assert block, "README.md lost its plain-loop code block"
    return block.group(1)


def test_readme_training_loop_runs_and_adapts_the_mixture(tmp_path, monkeypatch, capsys):
    make_text_corpus(tmp_path)  # writes tmp_path/corpus, where the README code looks
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(_plain_loop_code(), "README.md", "exec"), namespace)
    loader, controller = namespace["loader"], namespace["controller"]
    assert controller.decisions == 3
    assert loader.weights != loader.natural_weights()
    assert verify(tmp_path / "ledger.jsonl").num_records == 3
    assert str(loader.weights) in capsys.readouterr().out


def test_readme_quality_sampling_snippet_runs_and_drops_the_short_documents(tmp_path, monkeypatch):
    make_text_corpus(tmp_path)
    monkeypatch.chdir(tmp_path)
    block = re.search(
        r"<!-- quality:start -->\s*```python\n(.*?)```\s*<!-- quality:end -->", README.read_text(), re.S
    )
    assert block, "README.md lost its quality-sampling code block"
    namespace = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    loader, served = namespace["loader"], namespace["served"]
    assert loader.quality_params == {"code": namespace["longest_half"]}
    assert all(tokens.sum() > 0 for tokens in served.values())
    # Until the change, prose serves only its longer half of tokens: the shortest document never.
    again = MixtureLoader(namespace["domains"], batch_size=8, seq_len=64, quality=namespace["quality"])
    for _ in range(11):
        again.next_batch()
    prose = again.served_document_tokens()["prose"]
    assert prose[int(again.domains[again.domain_names.index("prose")].doc_lengths.argmin())] == 0
    assert prose.sum() > 0
