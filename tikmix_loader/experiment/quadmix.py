"""QuaDMix's decision at the experiment's scale, and ``tikmix quadmix search``, which runs it on a corpus.

``quadmix_sweep`` samples ``quadmix.proxies`` parameter sets over the experiment's criteria, trains one
``quadmix.model`` proxy under each (its loader samples documents with the set's copies and takes the domain
weights the set implies) for ``quadmix.fraction`` of the steps, scores it by its mean val loss over domains,
and hands the table to ``quality/search.py`` (LightGBM, cross-validated, 100k candidates, top-10 mean). Only
sets that keep ``MIN_SAMPLES`` samples' worth of tokens in every domain are trained or chosen. The FLOPs of
every proxy's training and scoring are counted, as RegMix's are.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

from tikmix_loader.data.domain import Domain
from tikmix_loader.errors import ConfigError
from tikmix_loader.experiment.config import FLAG_NAMES, ExperimentConfig
from tikmix_loader.experiment.proxies import ProxySpec
from tikmix_loader.experiment.quality import ScoredDomains, parse_criteria
from tikmix_loader.quality import QualityConfig, QualityParams
from tikmix_loader.quality.search import SearchSpace, read_quadmix_params, run_quadmix_search

SEARCH_FILE = "quadmix.json"
# A parameter set is searched only if every domain keeps this many samples' worth of tokens per epoch: the
# loader refuses fewer than one, and a proxy that sees a handful of documents over and over tells little.
MIN_SAMPLES = 4
# The options `quadmix_sweep` reads, so the flags `tikmix quadmix search --help` lists: the proxies' batch,
# sequence length, schedule, device and scoring, and the search's own (not `quadmix_params`, its output, nor
# `topk_keep`, which the top-k filters read).
SEARCH_FLAGS = (
    "steps",
    "batch_size",
    "seq_len",
    "lr",
    "device",
    "eval_batch_size",
    "num_workers",
    "quadmix_criteria",
    "quadmix_proxies",
    "quadmix_model",
    "quadmix_fraction",
    "quadmix_val_samples",
    "quadmix_candidates",
    "quadmix_top_k",
    "quadmix_omega_scale",
)


def quadmix_sweep(
    config: ExperimentConfig,
    *,
    train_domains: Sequence[Domain],
    val_domains: Sequence[Domain],
    seed: int,
    progress: bool = True,
) -> dict:
    """QuaDMix's search at small scale (module docstring).

    Returns:
        dict: ``QuaDMixSearch.to_dict()`` (``params`` per domain, ``decision_flops``, ``cv_spearman``,
        ``cv_rmse``, the proxy table...) plus ``criteria``, ``weights`` (the domain shares the chosen set
        implies), ``kept`` (share of each domain's documents within the cut-off: expected copies >= 1),
        ``proxy_steps`` and ``seconds``.
    """
    started = time.perf_counter()
    options = config.quadmix
    criteria = parse_criteria(options.criteria)
    names = [domain.name for domain in train_domains]
    space = SearchSpace(tuple(names), tuple(criteria), omega_scale=options.omega_scale)
    proxy = ProxySpec.of(
        config, model=options.model, fraction=options.fraction, val_samples=options.val_samples
    )

    scored = ScoredDomains(train_domains, criteria)
    min_tokens = MIN_SAMPLES * (config.seq_len + 1)

    def train_proxy(params: dict[str, QualityParams]) -> float:
        return proxy.train(
            config,
            train_domains=train_domains,
            val_domains=val_domains,
            seed=seed,
            weights=scored.implied_weights(params),
            quality=QualityConfig(criteria=criteria, params=params),
        )

    search = run_quadmix_search(
        train_proxy,
        space,
        num_proxies=options.proxies,
        flops_per_run=proxy.flops_per_run(config, val_domains),
        seed=seed,
        num_candidates=options.candidates,
        top_k=options.top_k,
        feasible=lambda params: scored.keeps(params, min_tokens),
        progress=progress,
    )
    copies = scored.expected_copies(search.params)
    return {
        **search.to_dict(),
        "criteria": criteria,
        "weights": scored.implied_weights(search.params),
        "kept": {name: float((values >= 1).mean()) for name, values in copies.items()},
        "proxy_steps": proxy.steps,
        "seconds": time.perf_counter() - started,
    }


def quadmix_decision(
    config: ExperimentConfig,
    train_domains: Sequence[Domain],
    val_domains: Sequence[Domain],
    *,
    seed: int,
    progress: bool = True,
) -> dict:
    """The QuaDMix methods' parameters: read from ``quadmix.params`` (a ``tikmix quadmix search`` JSON) when
    given, else searched with :func:`quadmix_sweep`.

    Raises:
        ConfigError: the JSON is unreadable or was searched over other domains or criteria.
    """
    if config.quadmix.params is None:
        return quadmix_sweep(
            config, train_domains=train_domains, val_domains=val_domains, seed=seed, progress=progress
        )
    path = Path(config.quadmix.params)
    read_quadmix_params(path)  # validates the parameters
    decision = json.loads(path.read_text())
    names = [domain.name for domain in train_domains]
    criteria = parse_criteria(config.quadmix.criteria)
    space = decision.get("space", {})
    if space.get("domains") != names or space.get("criteria") != list(criteria):
        raise ConfigError(
            f"{path}: searched over domains {space.get('domains')} and criteria {space.get('criteria')}; "
            f"this experiment trains on {names} with criteria {list(criteria)} (--quadmix-criteria)."
        )
    return {**decision, "source": str(path)}


def _rounded(params: dict, criteria: Sequence[str]) -> str:
    """A domain's searched parameters (``QualityParams.to_dict()``) to 3 significant digits, ``alpha`` by
    criterion: for the summary ``tikmix quadmix search`` prints (its JSON keeps full precision)."""
    alpha = " / ".join(
        f"{criterion} {weight:.3g}" for criterion, weight in zip(criteria, params["alpha"], strict=True)
    )
    shape = ", ".join(f"{key} {params[key]:.3g}" for key in ("lam", "omega", "eta", "eps"))
    return f"alpha {alpha}, {shape}"


def _search(args: argparse.Namespace) -> int:
    from tikmix_loader.experiment.cli import apply_threads, config_from_args
    from tikmix_loader.experiment.corpus_splits import load_splits

    apply_threads(args.threads)
    config = config_from_args(args)
    splits = load_splits(args.corpus)
    result = quadmix_sweep(
        config,
        train_domains=splits.train,
        val_domains=splits.val,
        seed=args.seed,
        progress=not args.no_progress,
    )
    result["config"] = config.to_dict()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    spearman = result["cv_spearman"]  # None when the out-of-fold predictions are all equal
    print(
        f"QuaDMix search: {result['num_proxies']} proxies ({result['decision_flops']:.3g} FLOPs, "
        f"{result['seconds']:.0f} s); regression out-of-fold Spearman "
        f"{'undefined' if spearman is None else f'{spearman:.2f}'}, RMSE "
        f"{result['cv_rmse']:.4f} (proxy loss std {result['proxy_loss_std']:.4f}); predicted loss "
        f"{result['predicted_loss']:.4f}"
    )
    for name, params in result["params"].items():
        print(
            f"  {name}: weight {result['weights'][name]:.3f}, kept {result['kept'][name]:.2f}; "
            f"{_rounded(params, result['criteria'])}"
        )
    print(f"wrote {out}")
    return 0


def register(subparsers) -> None:
    """Add ``tikmix quadmix search``."""
    from tikmix_loader.experiment.cli import add_config_arguments

    parser = subparsers.add_parser("quadmix", help="QuaDMix: search the quality parameters with proxy runs")
    commands = parser.add_subparsers(dest="quadmix_command", required=True, metavar="COMMAND")
    search = commands.add_parser(
        "search",
        help="sample parameter sets, train a proxy under each, fit LightGBM, write the best set as JSON",
        description=__doc__,
        # Wrapped by hand: the raw-description formatter prints the epilog as it is.
        epilog="The search also accepts, and ignores, the other options of `tikmix experiment` but its\n"
        "methods and seeds, so that one set of flags can serve both commands.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    search.add_argument(
        "--corpus", default="corpus", help="scored corpus directory DIR/<domain>/{train,val,test}/"
    )
    search.add_argument(
        "--out", default=f"out/{SEARCH_FILE}", help=f"JSON to write (default: out/{SEARCH_FILE})"
    )
    search.add_argument("--seed", type=int, default=0, help="seeds the sampling, the proxies and the fit")
    search.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    search.add_argument("--no-progress", action="store_true", help="hide progress bars")
    unread = set(FLAG_NAMES) - set(SEARCH_FLAGS) - {"methods", "seeds"}
    add_config_arguments(search, ExperimentConfig(), skip=("methods", "seeds"), hidden=unread)
    search.set_defaults(func=_search)
