"""``tikmix experiment``: train the same model with each mixing method on paired seeds and score test loss.

Protocol (issue 6, section 4):

- Every method trains the same ``TinyGPT`` preset for the same steps, batch and sequence length (so the same
  training tokens), with one LR schedule (``TrainConfig``: AdamW, linear warmup, cosine decay). The seed fixes
  the initialisation and every domain's data order (the loader reads each domain in an order keyed by
  ``(seed, domain)``, independent of the weights), so runs with equal seeds are paired.
- Mixers and targets read only the train and val splits: the loader holds the train split, the targets are
  samples of the target val split (equally weighted), and ``train_method`` is never given the test split.
  Test is read once per run, after training, by ``evaluate``.
- Targets (``targets.py``): by default every domain's val split, scored on every domain's test split;
  ``--hold-out NAME`` trains on the other domains, targets NAME's val split and scores its test split;
  ``--targets DIR`` targets the val half of a directory of text and scores its test half;
  ``--leave-one-out`` runs every hold-out in turn and pools the paired differences (``leave_one_out.py``).
- Metric: test loss in nats/token over the scored domains, averaged with equal weights, and the worst one's.
- Decision compute, in FLOPs: tokens through the influence engine's extra passes (``InfluenceMatrix.
  processed_tokens``) times the model's training FLOPs per token; for TiKMiX-M also its look-ahead passes;
  for RegMix the proxy sweep (training and val scoring of every proxy). Statistics collected from the
  ordinary training backward (online mode) cost nothing extra. Training FLOPs are reported beside them.

Methods (``--methods``): ``stratified`` (uniform), ``natural`` (token shares), ``temperature`` (shares **
``tau``, 0.5), ``regmix`` (proxy sweep, LightGBM fit, simulated optimum, then a static run), ``odm`` (EXP3
on training loss), ``tikmix-d`` (online Group Influence, a decision every ``every`` steps),
``tikmix-d-fresh`` (the same schedule, each decision on a fresh observation pass instead of the online EMA),
``tikmix-d-stage`` (observation mode at token milestones, the paper's stage-wise schedule) and ``tikmix-m``
(TiKMiX-D anchor refined by a LightGBM surrogate of a measured look-ahead label). On a scored corpus
(``tikmix score``), the quality methods (``docs/quadmix.md``, "Experiment"): ``uniform-docs`` (stratified
domains, every document once), ``topk-<criterion>`` (stratified domains, each keeping its best ``topk_keep``
share of tokens by one criterion), ``quadmix`` (searched quality parameters and the domain weights they
imply; the search runs once, seeded by the first seed, or is read from ``--quadmix-params``, and its FLOPs
are counted like RegMix's) and ``quadmix+tikmix-d`` (the same parameters, online TiKMiX-D moving the
weights). With ``uniform-docs`` run and ``stratified`` not, the paired differences are against
``uniform-docs``. On a corpus with injected noise, every run records the share of each noise kind in the
tokens it served.

Choices of ours: the adaptive methods start from ``init`` (default ``stratified``, so they are compared with
the baseline they start from); RegMix sweeps once (proxies seeded with the first seed) and every seed's
final run uses the mixture found, so its decision FLOPs are counted once; paired differences are
``method - stratified`` per seed with standard error ``std(ddof=1) / sqrt(n)``. The TiKMiX-D defaults (a
decision every 100 steps, EMA half-life 200 steps, 64 val samples per domain per target, a trust region of
2x per decision and a floor of 0.1 per weight) come from the investigation in ``benchmarks/RESULTS.md``;
``--max-step none --min-weight 0`` gives the paper's unbounded solve.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from tikmix_loader.experiment.config import ExperimentConfig
from tikmix_loader.experiment.corpus_splits import load_splits
from tikmix_loader.experiment.methods import QUADMIX
from tikmix_loader.experiment.quadmix import quadmix_decision
from tikmix_loader.experiment.quality import served_noise
from tikmix_loader.experiment.regmix import regmix_sweep
from tikmix_loader.experiment.results import empty_entry, record_run, write_results
from tikmix_loader.experiment.runs import train_method
from tikmix_loader.experiment.stats import summarize
from tikmix_loader.experiment.targets import select_targets
from tikmix_loader.quality import QualityParams
from tikmix_loader.train import evaluate, resolve_device


def run_experiment(
    config: ExperimentConfig,
    corpus: str | os.PathLike,
    out: str | os.PathLike,
    *,
    progress: bool = True,
) -> dict:
    """Run every method on every seed, score test loss, write ``results.json`` and ``results.md`` to ``out``.

    Seeds are the outer loop, so an interrupted experiment leaves complete paired seeds behind; the files are
    rewritten after every seed.

    Returns:
        dict: The ``results.json`` content: ``methods`` {name: {avg_test_loss, worst_test_loss, test_loss
        {domain: [...]}, decision_flops, decision_flops_per_seed, train_flops, final_weights, initial_weights,
        wall_seconds, train_loss, decisions, ledgers, served_noise}} (``test_loss`` over the scored
        domains), ``summary``, ``domains`` (trained on, the order of the weights), ``targets``
        (``TargetSet.describe()``: the mode and the trained, target and scored domains), ``seeds``,
        ``config``, ``regmix`` (the sweep, when run), ``quadmix`` (QuaDMix's search, when used), ``device``,
        ``wall_seconds``.
    """
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    targets = select_targets(
        load_splits(corpus),
        hold_out_name=config.hold_out,
        directory=config.targets,
        corpus=corpus,
        out=out,
        seq_len=config.seq_len,
    )
    entries = {method: empty_entry([domain.name for domain in targets.test]) for method in config.methods}
    results = {
        "config": config.to_dict(),
        "corpus": str(corpus),
        "device": str(resolve_device(config.device)),
        "domains": [domain.name for domain in targets.train],
        "targets": targets.describe(),
        "seeds": [],
        "methods": entries,
        "regmix": None,
        "quadmix": None,
    }
    for seed in config.seeds:
        for method in config.methods:
            run_started = time.perf_counter()
            static = None
            if method == "regmix":
                if results["regmix"] is None:
                    results["regmix"] = regmix_sweep(
                        config,
                        train_domains=targets.train,
                        val_domains=targets.val,
                        seed=config.seeds[0],
                        progress=progress,
                    )
                static = results["regmix"]["weights"]
            quality_params = None
            if method in QUADMIX:
                if results["quadmix"] is None:
                    results["quadmix"] = quadmix_decision(
                        config, targets.train, targets.val, seed=config.seeds[0], progress=progress
                    )
                quality_params = {
                    name: QualityParams.from_dict(values)
                    for name, values in results["quadmix"]["params"].items()
                }
            ledger = out / "ledgers" / f"{method}-seed{seed}.jsonl"
            run = train_method(
                method,
                seed,
                config=config,
                train_domains=targets.train,
                val_domains=targets.val,
                static_weights=static,
                quality_params=quality_params,
                ledger=ledger,
                progress=progress,
            )
            test = evaluate(
                run.model,
                targets.test,
                seq_len=config.seq_len,
                batch_size=config.eval_batch_size,
                max_samples=config.eval_samples,
            )
            searched = (
                results["regmix"] if method == "regmix" else results["quadmix"] if method in QUADMIX else None
            )
            decision_flops = run.decision_flops + (searched["decision_flops"] if searched else 0.0)
            noise = served_noise(corpus, targets.train, run.served_tokens)
            record_run(entries[method], run, test, decision_flops, time.perf_counter() - run_started, noise)
        results["seeds"].append(seed)
        results["summary"] = summarize(entries)
        results["wall_seconds"] = time.perf_counter() - started
        write_results(results, out)
    return results
