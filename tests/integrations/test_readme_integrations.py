"""The README's integration sections (HF Trainer, Lightning, StatefulDataLoader), run exactly as written."""

import re
from pathlib import Path

import pytest
import torch
from testkit.corpus import make_text_corpus

README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_block(marker: str) -> str:
    block = re.search(
        rf"<!-- {marker}:start -->\s*```python\n(.*?)```\s*<!-- {marker}:end -->", README.read_text(), re.S
    )
    assert block, f"README.md lost its {marker} code block"
    return block.group(1)


@pytest.fixture
def run_readme_block(tmp_path, monkeypatch):
    make_text_corpus(tmp_path)  # writes tmp_path/corpus, where the README code looks
    monkeypatch.chdir(tmp_path)

    def run(marker: str) -> dict:
        namespace = {"__name__": "readme"}
        exec(compile(_readme_block(marker), "README.md", "exec"), namespace)
        return namespace

    return run


def test_readme_hf_trainer_trains_gpt2_with_online_tikmix_and_resumes(run_readme_block):
    namespace = run_readme_block("hf-trainer")
    first, resumed = namespace["first"].controller, namespace["resumed"].controller
    assert first.decisions == resumed.decisions == 3
    history = first.loader.state_dict()["weight_history"]
    assert len(history) == 4 and resumed.loader.state_dict()["weight_history"] == history
    assert Path("hf-run/checkpoint-6/tikmix_state.pt").exists()


def test_readme_lightning_fits_and_resumes(run_readme_block):
    namespace = run_readme_block("lightning")
    first, resumed = namespace["first"], namespace["resumed"]
    history = first.state_dict()["weight_history"]
    assert len(history) == 4 and resumed.state_dict() == first.state_dict()


def test_readme_stateful_dataloader_resumes_with_workers_and_a_weight_change(run_readme_block):
    namespace = run_readme_block("stateful-dataloader")
    expected = next(namespace["batches"])  # the uninterrupted run's batch at step 6
    got = namespace["next_batch"]
    assert all(torch.equal(expected[key], got[key]) for key in expected)
    assert namespace["resumed"].state_dict()["weight_history"][-1][0] == 3 + 2 * 2
