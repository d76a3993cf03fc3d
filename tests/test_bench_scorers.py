"""`tikmix bench scorers` runs end to end on a tiny noisy corpus and prints an AUC per scorer and kind."""

import re

from tikmix_loader.cli import main
from tikmix_loader.data.noise import NOISE_KINDS
from tikmix_loader.quality.scorers import DEFAULT_CRITERIA


def test_bench_scorers_smoke(tmp_path, capsys):
    argv = ["--corpus", str(tmp_path / "c"), "--max-mb-per-domain", "0.05", "--rate", "0.3", "--repeats", "1"]
    assert main(["bench", "scorers", *argv]) == 0
    out = capsys.readouterr().out
    assert all(kind in out for kind in NOISE_KINDS) and "2 workers" in out
    rows = {
        line.split()[0]: line
        for line in out.splitlines()
        if line.split()[:1] in ([c] for c in DEFAULT_CRITERIA)
    }
    assert list(rows) == list(DEFAULT_CRITERIA)
    for row in rows.values():
        aucs = [float(a) for a in re.findall(r"(\d\.\d{3}) \(", row)]
        assert aucs and all(0 <= a <= 1 for a in aucs)
