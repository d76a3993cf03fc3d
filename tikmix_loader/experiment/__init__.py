"""``tikmix experiment``: the paired mixture-quality protocol (see ``protocol`` for what it measures).

Modules, one job each: ``config`` (``ExperimentConfig`` and its nested per-method options), ``methods`` (the
registry: how each method is wired), ``corpus_splits`` (the corpus's splits and the val targets), ``runs``
(train one method on one seed), ``regmix`` (RegMix's proxy sweep), ``stats`` (paired statistics and
the table), ``results`` (results files and merging), ``protocol`` (every method on every seed) and ``cli``.
This module re-exports the names other code imports.
"""

from tikmix_loader.experiment.cli import add_config_arguments, apply_threads, config_from_args, register
from tikmix_loader.experiment.config import FLAG_NAMES, FLAGS, ExperimentConfig
from tikmix_loader.experiment.corpus_splits import CorpusSplits, ensure_corpus, load_splits, val_targets
from tikmix_loader.experiment.methods import (
    ADAPTIVE,
    INFLUENCE,
    METHOD_BUILDERS,
    METHODS,
    MethodInputs,
    MethodSetup,
    get_method_builder,
)
from tikmix_loader.experiment.protocol import run_experiment
from tikmix_loader.experiment.regmix import regmix_sweep
from tikmix_loader.experiment.results import RESULTS_FILE, TABLE_FILE, merge_results, write_results
from tikmix_loader.experiment.runs import MethodRun, build_model, train_method
from tikmix_loader.experiment.stats import BASELINE, markdown_table, mean_std, paired_differences, summarize

__all__ = [
    "ADAPTIVE",
    "BASELINE",
    "FLAGS",
    "FLAG_NAMES",
    "INFLUENCE",
    "METHODS",
    "METHOD_BUILDERS",
    "RESULTS_FILE",
    "TABLE_FILE",
    "CorpusSplits",
    "ExperimentConfig",
    "MethodInputs",
    "MethodRun",
    "MethodSetup",
    "add_config_arguments",
    "apply_threads",
    "build_model",
    "config_from_args",
    "ensure_corpus",
    "get_method_builder",
    "load_splits",
    "markdown_table",
    "mean_std",
    "merge_results",
    "paired_differences",
    "regmix_sweep",
    "register",
    "run_experiment",
    "summarize",
    "train_method",
    "val_targets",
    "write_results",
]
