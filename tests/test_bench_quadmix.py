"""`tikmix bench quadmix --run` searches, runs the QuaDMix experiment, reports served noise and goals."""

import json

from testkit.corpus import make_scored_noisy_corpus

from tikmix_loader.cli import main


def test_bench_quadmix_smoke(tmp_path, capsys):
    corpus = make_scored_noisy_corpus(tmp_path)
    out = tmp_path / "out"
    tiny = "--steps 8 --batch-size 4 --seq-len 32 --model micro --device cpu --eval-samples 8 --num-workers 0"
    search = "--quadmix-proxies 10 --quadmix-candidates 200 --quadmix-val-samples 4"
    argv = [
        *f"--run --corpus {corpus} --out {out} --seeds 0 1 {tiny} {search}".split(),
        *"--quadmix-criteria compression,repetition --methods uniform-docs topk-compression quadmix".split(),
    ]
    assert main(["bench", "quadmix", *argv]) == 0
    printed = capsys.readouterr().out
    assert "| quadmix |" in printed and "Δ avg vs uniform-docs" in printed
    assert "QuaDMix search: 10 proxies of 2 steps" in printed
    assert "Goal: QuaDMix beats uniform-docs by > 2 SE over >= 5 seeds" in printed and "not met" in printed
    # The filter drops exactly the labelled noise: 0.00% of its served tokens in the noise table.
    row = next(line for line in printed.splitlines() if line.startswith("| topk-compression | 0.00%"))
    assert row.endswith("| 0.000 |")
    assert json.loads((out / "results.json").read_text())["quadmix"]["num_proxies"] == 10
