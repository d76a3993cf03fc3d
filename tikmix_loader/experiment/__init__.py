"""``tikmix experiment``: the paired mixture-quality protocol (see ``protocol`` for what it measures).

Modules, one job each: ``config`` (``ExperimentConfig`` and its nested per-method options), ``methods`` (the
registry: how each method is wired), ``corpus_splits`` (the corpus's splits and the val targets), ``runs``
(train one method on one seed), ``regmix`` (RegMix's proxy sweep), ``targets`` (what a run trains on,
targets and is scored on), ``stats`` (paired statistics and the table), ``results`` (results files and
merging), ``protocol`` (every method on every seed), ``leave_one_out`` (every hold-out, pooled) and ``cli``.
This module re-exports the names other code imports.
"""

from tikmix_loader.experiment.cli import add_config_arguments, apply_threads, config_from_args, register
from tikmix_loader.experiment.config import FLAG_NAMES, FLAGS, ExperimentConfig
from tikmix_loader.experiment.corpus_splits import CorpusSplits, ensure_corpus, load_splits, val_targets
from tikmix_loader.experiment.leave_one_out import loo_markdown, pool_leave_one_out, run_leave_one_out
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
from tikmix_loader.experiment.targets import TargetSet, select_targets

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
    "TargetSet",
    "add_config_arguments",
    "apply_threads",
    "build_model",
    "config_from_args",
    "ensure_corpus",
    "get_method_builder",
    "load_splits",
    "loo_markdown",
    "markdown_table",
    "mean_std",
    "merge_results",
    "paired_differences",
    "pool_leave_one_out",
    "regmix_sweep",
    "register",
    "run_experiment",
    "run_leave_one_out",
    "select_targets",
    "summarize",
    "train_method",
    "val_targets",
    "write_results",
]
