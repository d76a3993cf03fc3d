"""The README's plain-PyTorch training loop, run exactly as written, on a small corpus of the same layout."""

import re
from pathlib import Path

from tikmix_loader.data.corpus import corpus_from_text
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
    sources = tmp_path / "text"
    for domain, text in {
        "prose": "the quick brown fox jumps over the lazy dog. ",
        "code": "def f(x):\n    return x\n",
    }.items():
        for index in range(30):
            path = sources / domain / f"{index}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text * (20 + index))
    corpus_from_text(
        tmp_path / "corpus", {"prose": sources / "prose", "code": sources / "code"}, progress=False
    )
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(_plain_loop_code(), "README.md", "exec"), namespace)
    loader, controller = namespace["loader"], namespace["controller"]
    assert controller.decisions == 3
    assert loader.weights != loader.natural_weights()
    assert verify(tmp_path / "ledger.jsonl").num_records == 3
    assert str(loader.weights) in capsys.readouterr().out
