"""The README's plain-PyTorch training loop, run exactly as written, on a small corpus of the same layout."""

import re
from pathlib import Path

from testkit.corpus import make_text_corpus

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
