"""Benchmark: does Group Influence predict what a mixture does? Paired counterfactual branches (issue 14).

A base run trains on the stratified mixture. At each checkpoint it is branched M times (model and AdamW state
copied, the schedule continued), and each branch trains ``--branch-steps`` more steps on one mixture:
stratified, one "leaning" mixture per domain (``--lean`` on it, the rest spread evenly) and ``--dirichlet``
draws from ``Dirichlet(1)``. Every branch reads the same data: at branch step j, domain d contributes the
first ``n_d(w)`` rows of one fixed sample of d drawn for (checkpoint, j), so two branches differ only in how
many rows each domain gives, not in which (``--branch-data sampled``). Rows are whole, so a branch resolves
``w`` only to ``1 / batch_size``, and moving one row between domains also swaps which sequences are seen, an
effect of the particular rows, not of the mixture. ``--branch-data weighted`` removes both: every branch
trains on the same ``--weighted-rows`` rows of every domain per step with the loss ``sum_d w_d L_d`` (``L_d``
the mean loss per token of domain d's rows), the expected loss of a batch drawn with mixture w, so branches
differ in w alone, continuously. The measured outcome is each target's loss change (mean loss per
token on fixed val samples after minus before); the targets are every domain's val split, or, with
``--hold-out NAME``, NAME's val split alone while the base run and every branch train on the other domains
(the experiment's ``--hold-out``, ``tikmix_loader.experiment.targets``). ``--leave-one-out`` runs every
hold-out in turn and pools the (hold-out, checkpoint) cases in one report (``--pool`` re-reports saved runs,
e.g. several seeds).

Predictors (each an ``S`` [targets, domains], higher = more helpful): the online EMA matrices of engines that
observed every base training step (one per preconditioner, at ``--k``), and fresh matrices measured at the
checkpoint from ``--observation-samples`` per domain (each preconditioner at each of ``--ks``), and, as the
floor any of them must beat, ``own domain (S = I)``: each target is helped by its own domain only, so its
ranking is that of the domain's weight. A held-out target is no training domain, so ``S = I`` has nothing to
say there; its floor is ``fitted on other checkpoints``: the least-squares linear ``S`` of the branches
measured at the other checkpoints of the same run, later ones included (what measuring, rather than
predicting, would know; not a rule a run could follow as it goes), and every checkpoint also branches the
natural mixture (token shares), a second fixed reference beside stratified. A predictor's prediction for
mixture w is ``S w`` (first order: a step on w lowers target b by about ``eta (S w)_b``). ``--exact`` adds
fresh predictors computed with plain autograd over every trainable parameter, unprojected, on the same
observation and target samples (``exact_influence``): ``adam-exact`` = ``g_t^T D g_d`` with AdamW's own
``D = 1 / (sqrt(v_hat) + eps)`` at the checkpoint (the first-order effect of an AdamW step on ``sum_d w_d
L_d``), and ``gradient-exact`` = ``g_t^T g_d``; together they separate Adam's preconditioning from the
engine's projection and its restriction to Linear weights. ``--exact branch-rows`` adds an oracle no run
could follow, ``adam-exact`` with each domain's gradient taken on the very rows the branches train on
(``branch_rows_influence``). Every checkpoint also scores two fits to its own branches, no extra training:
the ``linear ceiling``, each branch predicted by the least-squares linear ``S`` of the other branches, and
the in-sample ``linear fit``; if they stay below a goal, no linear ``S`` can reach it on these branches.

Per checkpoint and target it reports Spearman and Pearson (``scipy.stats``) between ``S w`` and the measured
loss drop over the M branches, and the regret of the branch each predictor would pick by mean predicted drop
over targets: its measured mean loss change minus the best branch's. The named baseline is stratified (the
branch every method starts from), whose regret is printed in the same table.

Then the decision itself: from every predictor at ``--k``, TiKMiX-D (the experiment's defaults: trust region
``--max-step``, floor ``--min-weight``, prior stratified) solves a mixture, and each partial step ``t`` of
``--solve-steps`` towards it (``w = w_prior + t (w* - w_prior)``, TiKMiX-D's ``step``) gets its own branch on
the same data; the second table gives its measured mean change minus stratified's (negative: the decision
helped) and its regret against the best of the M branches. The third fits the step on measured branches: per
predictor, the step of ``--solve-steps`` that did best at the *other* checkpoints (leave one checkpoint out),
scored at the held-out one, beside stratified's regret.

Usage (the issue-14 records; 15-30 minutes on a shared 2-core CPU)::

    nice .venv/bin/python benchmarks/bench_counterfactual.py --corpus corpus --threads 1 \
        [--checkpoints 100 200 300] [--branch-steps 10] [--branch-data weighted] [--ks 32] \
        [--hold-out NAME | --leave-one-out] [--json out/counterfactual.json]
    .venv/bin/python benchmarks/bench_counterfactual.py --pool out/seed0.json out/seed1.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import json
import platform
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import stats

from tikmix_loader.data.loader import MixtureLoader
from tikmix_loader.errors import ConfigError
from tikmix_loader.experiment import apply_threads, build_model, load_splits, val_targets
from tikmix_loader.experiment.targets import all_domains, hold_out
from tikmix_loader.influence import PRECONDITIONERS, GroupInfluence
from tikmix_loader.losses import IGNORE_INDEX, per_token_loss
from tikmix_loader.mixing import MixingContext, get_mixer
from tikmix_loader.train import TrainConfig, make_optimizer, resolve_device

BRANCH_DATA = ("sampled", "weighted")
OWN_DOMAIN = "own domain (S = I)"
FITTED = "fitted on other checkpoints"
EXACT = ("adam", "gradient", "branch-rows")
BRANCH_ROWS = "branch rows adam-exact (oracle)"
CEILING = "linear ceiling (same checkpoint, LOO branch)"
IN_SAMPLE = "linear fit (same checkpoint, in-sample)"


@dataclass(frozen=True)
class CounterfactualConfig:
    """Settings of one counterfactual check (the base run, the branches and the predictors)."""

    model: str = field(default="tiny", metadata={"help": "TinyGPT preset"})
    seed: int = field(default=0, metadata={"help": "initialisation, data order and projections"})
    steps: int = field(default=300, metadata={"help": "length of the base run's LR schedule"})
    checkpoints: tuple[int, ...] = field(default=(100, 200, 300), metadata={"help": "steps to branch at"})
    branch_steps: int = field(default=10, metadata={"help": "training steps of every branch"})
    dirichlet: int = field(default=6, metadata={"help": "Dirichlet(1) branch mixtures"})
    lean: float = field(default=0.6, metadata={"help": "weight of a leaning mixture's domain"})
    batch_size: int = field(default=16, metadata={"help": "sequences per step"})
    seq_len: int = field(default=128, metadata={"help": "tokens per sequence"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate"})
    branch_data: str = field(
        default="sampled", metadata={"help": "'sampled' (rows per domain) or 'weighted' (loss weights)"}
    )
    weighted_rows: int = field(
        default=4, metadata={"help": "rows per domain per step, --branch-data weighted"}
    )
    target_samples: int = field(default=32, metadata={"help": "val samples per domain per target"})
    observation_samples: int = field(default=32, metadata={"help": "fresh S: samples per domain"})
    target_batch_size: int = field(default=16, metadata={"help": "batch size of influence passes"})
    k: int = field(default=32, metadata={"help": "projection width of the online engines"})
    ks: tuple[int, ...] = field(default=(16, 32, 64), metadata={"help": "projection widths of fresh S"})
    preconditioners: tuple[str, ...] = field(
        default=("identity", "kfac", "ekfac"), metadata={"help": "preconditioners compared"}
    )
    exact: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "exact fresh predictors, every trainable parameter, no projection: 'adam' (g_t^T D g_d, "
            "D from AdamW's second moments), 'gradient' (g_t^T g_d), 'branch-rows' (adam with g_d taken on "
            "the rows the branches train on: an oracle)"
        },
    )
    half_life: float = field(default=200.0, metadata={"help": "online EMA half-life in steps"})
    max_step: float = field(default=2.0, metadata={"help": "TiKMiX-D trust region of the solved branches"})
    min_weight: float = field(default=0.1, metadata={"help": "TiKMiX-D floor of the solved branches"})
    solve_steps: tuple[float, ...] = field(
        default=(0.25, 0.5, 1.0), metadata={"help": "TiKMiX-D partial steps branched per predictor"}
    )
    device: str = field(default="cpu", metadata={"help": "cpu, cuda or auto"})

    def __post_init__(self):
        for name in ("checkpoints", "ks", "preconditioners", "exact", "solve_steps"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        checkpoints = self.checkpoints
        if not checkpoints or list(checkpoints) != sorted(set(checkpoints)) or checkpoints[0] < 1:
            raise ConfigError(
                "CounterfactualConfig: `checkpoints` must be increasing positive steps, got "
                f"{list(checkpoints)}"
            )
        if checkpoints[-1] > self.steps:
            raise ConfigError(
                f"CounterfactualConfig: the last checkpoint {checkpoints[-1]} is past `steps` {self.steps}; "
                "raise --steps or branch earlier"
            )
        unknown = [name for name in self.preconditioners if name not in PRECONDITIONERS]
        if unknown or not self.preconditioners:
            raise ConfigError(
                f"CounterfactualConfig: unknown `preconditioners` {unknown}; valid: {sorted(PRECONDITIONERS)}"
            )
        if not set(self.exact) <= set(EXACT):
            raise ConfigError(
                f"CounterfactualConfig: unknown `exact` predictors {sorted(set(self.exact) - set(EXACT))}; "
                f"valid: {list(EXACT)}"
            )
        if not 0 < self.lean < 1:
            raise ConfigError(f"CounterfactualConfig: `lean` must be in (0, 1), got {self.lean!r}")
        if self.branch_data not in BRANCH_DATA:
            raise ConfigError(
                f"CounterfactualConfig: `branch_data` must be one of {BRANCH_DATA}, got {self.branch_data!r}"
            )
        if not self.solve_steps or not all(0 < t <= 1 for t in self.solve_steps):
            raise ConfigError(
                f"CounterfactualConfig: `solve_steps` must be in (0, 1], got {list(self.solve_steps)}"
            )

    @property
    def train_config(self) -> TrainConfig:
        # The branches run past the last checkpoint, so the schedule covers them too.
        return TrainConfig(steps=self.steps + self.branch_steps, lr=self.lr)


# -- branches ------------------------------------------------------------------------------------


def branch_mixtures(names: list[str], *, dirichlet: int, lean: float, seed: int) -> dict[str, np.ndarray]:
    """The branch mixtures by label: ``stratified``, ``lean:<domain>`` per domain, ``dirichlet:<i>``."""
    m = len(names)
    mixtures = {"stratified": np.full(m, 1.0 / m)}
    for index, name in enumerate(names):
        w = np.full(m, (1.0 - lean) / (m - 1))
        w[index] = lean
        mixtures[f"lean:{name}"] = w
    draws = np.random.default_rng(seed).dirichlet(np.ones(m), size=dirichlet)
    mixtures.update({f"dirichlet:{i}": w for i, w in enumerate(draws)})
    return mixtures


def quotas(weights: np.ndarray, batch_size: int) -> np.ndarray:
    """Rows per domain, ``round(w * batch_size)`` by largest remainder so they sum to ``batch_size``; ties go
    to the first domain, after rounding ``w * batch_size`` to 9 decimals so a mixture within 1e-9 of another
    gets the same rows (a solver's "uniform" is not bit-exact)."""
    exact = np.round(np.asarray(weights, dtype=np.float64) * batch_size, 9)
    rows = np.floor(exact).astype(int)
    rows[np.argsort(rows - exact, kind="stable")[: batch_size - rows.sum()]] += 1
    return rows


def branch_data(loader: MixtureLoader, *, steps: int, batch_size: int, key: int) -> list[list[dict]]:
    """Per branch step, one sample of ``batch_size`` rows of every domain (shared by every branch; the
    weighted mode passes ``--weighted-rows`` as ``batch_size``)."""
    return [
        [loader.sample_domain(name, batch_size, seed=key * 10_000 + step) for name in loader.domain_names]
        for step in range(steps)
    ]


def _train_step(model, optimizer, batch: dict, *, lr: float, grad_clip: float | None, weights=None) -> None:
    """One step on the batch's mean loss per token, or with ``weights`` on ``sum_d w_d L_d`` (``L_d`` the
    mean loss per token of the rows of domain d)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    per_token = per_token_loss(model, batch)
    mask = batch["labels"] != IGNORE_INDEX
    if weights is None:
        loss = per_token.sum() / mask.sum().clamp(min=1)
    else:
        zeros = per_token.new_zeros(len(weights))
        sums = zeros.index_add(0, batch["domain"], per_token.sum(1))
        tokens = zeros.index_add(0, batch["domain"], mask.sum(1).to(per_token.dtype))
        loss = (per_token.new_tensor(weights) * sums / tokens.clamp(min=1)).sum()
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run_branch(model, optimizer, weights: np.ndarray, data, *, config: CounterfactualConfig, start: int):
    """A copy of ``model`` and ``optimizer`` trained on ``data`` at mixture ``weights``, from step ``start``
    of the schedule; the originals are left as they were."""
    branch = copy.deepcopy(model)
    branch_optimizer, _ = make_optimizer(branch, config.train_config)
    branch_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    weighted = config.branch_data == "weighted"
    rows = [None] * len(weights) if weighted else quotas(weights, config.batch_size)  # None: every row
    device = next(model.parameters()).device
    for step, samples in enumerate(data):
        batch = {
            key: torch.cat([sample[key][:n] for sample, n in zip(samples, rows, strict=True)]).to(device)
            for key in samples[0]
        }
        lr = config.train_config.lr_at(start + step)
        _train_step(
            branch,
            branch_optimizer,
            batch,
            lr=lr,
            grad_clip=config.train_config.grad_clip,
            weights=weights if weighted else None,
        )
    return branch


@torch.no_grad()
def target_losses(model, targets: dict[str, list[dict]]) -> np.ndarray:
    """Mean loss per token of every target, in ``targets`` order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for batches in targets.values():
        total, count = 0.0, 0
        for batch in batches:
            batch = {key: value.to(device) for key, value in batch.items()}
            total += float(per_token_loss(model, batch).double().sum())
            count += int((batch["labels"] != IGNORE_INDEX).sum())
        out.append(total / count)
    model.train(was_training)
    return np.asarray(out)


# -- scoring -------------------------------------------------------------------------------------


def score_predictor(S: np.ndarray, mixtures: np.ndarray, change: np.ndarray, *, baseline: int = 0) -> dict:
    """How well ``S`` [targets, domains] predicts the measured loss ``change`` [branches, targets]: the
    ``score_prediction`` of ``S w``."""
    return score_prediction(mixtures @ S.T, change, baseline=baseline)


def score_prediction(predicted: np.ndarray, change: np.ndarray, *, baseline: int = 0) -> dict:
    """How well ``predicted`` [branches, targets] (higher = larger predicted drop) ranks the measured loss
    ``change`` [branches, targets].

    Returns:
        dict: per target ``spearman`` and ``pearson`` of the prediction with the loss drop over branches; the
        ``pick`` (branch index with the highest mean predicted drop) and its ``regret`` (its measured mean
        change minus the best branch's); ``baseline_regret`` of branch ``baseline``.
    """
    drop = -change
    spearman = [float(stats.spearmanr(predicted[:, b], drop[:, b]).statistic) for b in range(drop.shape[1])]
    pearson = [float(stats.pearsonr(predicted[:, b], drop[:, b]).statistic) for b in range(drop.shape[1])]
    mean_change = change.mean(axis=1)
    pick = int(np.argmax(predicted.mean(axis=1)))
    return {
        "spearman": spearman,
        "pearson": pearson,
        "spearman_mean_target": float(stats.spearmanr(predicted.mean(axis=1), -mean_change).statistic),
        "pick": pick,
        "regret": float(mean_change[pick] - mean_change.min()),
        "baseline_regret": float(mean_change[baseline] - mean_change.min()),
    }


# -- the check -----------------------------------------------------------------------------------


def _fresh_influence(
    model, optimizer, loader, targets, *, config: CounterfactualConfig, key: int
) -> dict[str, np.ndarray]:
    observation = {
        name: loader.sample_batches(
            name, config.observation_samples, batch_size=config.target_batch_size, seed=key
        )
        for name in loader.domain_names
    }
    out = {}
    for kind in config.preconditioners:
        for k in config.ks:
            engine = GroupInfluence(model, k=k, preconditioner=kind, seed=config.seed, optimizer=optimizer)
            out[f"fresh {kind} k={k}"] = engine.compute(domains=observation, targets=targets).values
    exact = [kind for kind in config.exact if kind != "branch-rows"]  # the oracle needs the branch data
    if exact:
        out.update(exact_influence(model, optimizer, observation, targets, kinds=exact))
    return out


def mean_loss_gradient(model, batches: list[dict], params: list[torch.Tensor]) -> torch.Tensor:
    """The gradient of the mean loss per token over every row of ``batches`` (one group, as ``GroupInfluence``
    pools a domain's or target's samples) with respect to ``params``, flattened into one float64 vector."""
    device = next(model.parameters()).device
    total = [torch.zeros(p.numel(), dtype=torch.float64, device=device) for p in params]
    tokens = 0
    for batch in batches:
        batch = {key: value.to(device) for key, value in batch.items()}
        loss = per_token_loss(model, batch).sum()  # masked positions are 0
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for into, grad in zip(total, grads, strict=True):
            if grad is not None:
                into += grad.reshape(-1).double()
        tokens += int((batch["labels"] != IGNORE_INDEX).sum())
    return torch.cat(total) / max(tokens, 1)


def adam_preconditioner(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> torch.Tensor:
    """AdamW's elementwise step preconditioner ``D = 1 / (sqrt(v / (1 - beta2^step)) + eps)`` of ``params``,
    flattened in their order (what ``torch.optim.AdamW`` divides the first moment by at its next step).

    Raises:
        ConfigError: a parameter is not in ``optimizer`` or has no ``exp_avg_sq`` yet (no step taken).
    """
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    out = []
    for index, param in enumerate(params):
        state = optimizer.state.get(param, {})
        if id(param) not in groups or "exp_avg_sq" not in state:
            raise ConfigError(
                f"adam_preconditioner: parameter {index} {tuple(param.shape)} has no AdamW second moment "
                "(not in the optimizer, or before its first step)"
            )
        group = groups[id(param)]
        correction = 1.0 - group["betas"][1] ** float(state["step"])
        v_hat = state["exp_avg_sq"].double() / correction
        out.append((1.0 / (v_hat.sqrt() + group["eps"])).reshape(-1))
    return torch.cat(out)


def exact_influence(
    model, optimizer, domains: dict[str, list[dict]], targets: dict[str, list[dict]], *, kinds
) -> dict[str, np.ndarray]:
    """Unprojected fresh ``S`` over every trainable parameter, with plain autograd (``config.exact``):
    ``fresh gradient-exact`` = ``g_t^T g_d`` and ``fresh adam-exact`` = ``g_t^T D g_d`` with AdamW's full
    bias-corrected ``D`` (``adam_preconditioner``), ``g_d`` the gradient of domain d's mean loss per token
    (a branch trains on ``sum_d w_d L_d``) and ``g_t`` that of the target's. To first order an AdamW step on
    mixture w changes target t by ``-lr (1 - beta1) sum_d w_d g_t^T D g_d`` plus terms that do not depend on w
    (the momentum already held), so the branches follow ``adam-exact`` as far as the first order holds;
    ``gradient-exact`` separates Adam's preconditioning from the engine's projection and layer restriction.
    Passes run in ``eval()`` mode, as ``GroupInfluence``'s observation passes do."""
    params = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.eval()
    try:
        g_domains = torch.stack([mean_loss_gradient(model, batches, params) for batches in domains.values()])
        g_targets = torch.stack([mean_loss_gradient(model, batches, params) for batches in targets.values()])
    finally:
        model.train(was_training)
    out = {}
    for kind in kinds:
        scale = adam_preconditioner(optimizer, params) if kind == "adam" else torch.ones_like(g_domains[0])
        out[f"fresh {kind}-exact"] = ((g_targets * scale) @ g_domains.T).cpu().numpy()
    return out


def decides(name: str, config: CounterfactualConfig) -> bool:
    """Whether TiKMiX-D decisions are branched from predictor ``name``: the engines' at ``config.k`` and the
    exact fresh ones (not the oracle)."""
    return name.endswith(f" k={config.k}") or (name.startswith("fresh ") and name.endswith("-exact"))


def branch_rows_influence(model, optimizer, data, names: list[str], targets) -> np.ndarray:
    """The ``BRANCH_ROWS`` oracle: ``adam-exact`` with ``g_d`` the gradient on the rows every branch trains on
    (``data``, all steps pooled; in the weighted mode exactly the rows of ``L_d``) instead of an independent
    sample of d. No run could know these rows in advance; the gap between it and ``fresh adam-exact`` is
    what the particular rows, not the mixture, do to the outcome."""
    rows = {name: [samples[index] for samples in data] for index, name in enumerate(names)}
    return exact_influence(model, optimizer, rows, targets, kinds=("adam",))["fresh adam-exact"]


def measured_branch(weights: np.ndarray, branch_change: np.ndarray, change: np.ndarray) -> dict:
    """A branch measured beside the M ranked ones: its ``weights``, ``change`` per target, its mean change
    minus stratified's (``vs_stratified``, branch 0 of ``change``) and minus the best branch's (``regret``).
    """
    return {
        "weights": np.asarray(weights).tolist(),
        "change": branch_change.tolist(),
        "vs_stratified": float(branch_change.mean() - change[0].mean()),
        "regret": float(branch_change.mean() - change.mean(axis=1).min()),
    }


def fitted_influence(mixtures: np.ndarray, changes: list[np.ndarray]) -> np.ndarray:
    """The linear ``S`` [targets, domains] that fits measured outcomes best: least squares of the loss drop on
    ``w`` over every branch of ``changes`` (each [branches, targets], branches in ``mixtures`` order). The
    weights sum to one, so no intercept is needed: a constant shift of every drop is a shift of every S entry.
    """
    drops = -np.concatenate(changes)
    coef, *_ = np.linalg.lstsq(np.concatenate([mixtures] * len(changes)), drops, rcond=None)
    return coef.T


def linear_ceiling(mixtures: np.ndarray, change: np.ndarray, *, leave_one_out: bool = True) -> np.ndarray:
    """The predicted drop [branches, targets] of the best linear ``S`` fitted on one checkpoint's own
    branches (``fitted_influence``): each branch predicted by the fit on the *other* branches
    (``leave_one_out``; a linear ``S`` learnt from this checkpoint's measurements), or by the fit on all of
    them (in-sample; no linear ``S`` fits this checkpoint better in least squares)."""
    predicted = np.empty_like(change)
    for index in range(len(mixtures)):
        keep = np.arange(len(mixtures)) != index if leave_one_out else slice(None)
        predicted[index] = mixtures[index] @ fitted_influence(mixtures[keep], [change[keep]]).T
    return predicted


def add_linear_ceiling(result: dict) -> None:
    """Score, at every checkpoint of ``result`` that lacks them, ``CEILING`` and ``IN_SAMPLE``
    (``linear_ceiling`` of its own branches): whether any linear ``S`` could rank this checkpoint's branches,
    needing no extra training (runs saved before they existed get them on ``--pool``)."""
    mixtures = np.array(list(result["mixtures"].values()))
    for record in result["checkpoints"]:
        change = np.array(record["change"])
        for name, leave_one_out in ((CEILING, True), (IN_SAMPLE, False)):
            if name not in record["scores"]:
                predicted = linear_ceiling(mixtures, change, leave_one_out=leave_one_out)
                record["scores"][name] = score_prediction(predicted, change)


def add_fitted_floor(result: dict) -> None:
    """Score, at every checkpoint of ``result``, the ``FITTED`` predictor: ``fitted_influence`` of the
    branches measured at the *other* checkpoints of the same run. It is the floor when the target is not a
    training domain (``S = I`` then says nothing): a predictor that knows which domains helped this target
    before, at the price of measured branches, as a RegMix-like search would. Needs two checkpoints or more.
    """
    records = result["checkpoints"]
    if len(records) < 2:
        return
    mixtures = np.array(list(result["mixtures"].values()))
    for index, record in enumerate(records):
        others = [np.array(other["change"]) for j, other in enumerate(records) if j != index]
        S = fitted_influence(mixtures, others)
        record["influence"][FITTED] = S.tolist()
        record["scores"][FITTED] = score_predictor(S, mixtures, np.array(record["change"]))


def run_check(
    config: CounterfactualConfig, corpus: str, *, hold_out_name: str | None = None, progress: bool = False
) -> dict:
    """Train the base run, branch at every checkpoint, and score every predictor (see the module docstring).

    With ``hold_out_name`` the run trains on every other domain, and the only target is that domain's val
    split (the experiment's ``--hold-out``); each checkpoint then also measures the natural mixture's branch,
    and the floor predictor is ``FITTED`` (``add_fitted_floor``) instead of ``S = I``.

    Returns:
        dict: ``hold_out``, ``domains`` (trained on), ``targets``, ``mixtures`` {label: weights},
        ``checkpoints``: per checkpoint its ``step``, ``before`` (target losses), ``change`` [branches,
        targets], ``influence`` {predictor: S} and ``scores`` {predictor: ``score_predictor``},
        ``decisions`` {"<predictor> step=<t>": ``measured_branch`` of TiKMiX-D's mixture at that partial
        step} and, held out, ``natural`` (``measured_branch``); ``seconds``.
    """
    started = time.perf_counter()
    device = resolve_device(config.device)
    splits = load_splits(corpus)
    target_set = all_domains(splits) if hold_out_name is None else hold_out(splits, hold_out_name)
    model = build_model(config.model, seed=config.seed, seq_len=config.seq_len).to(device)
    loader = MixtureLoader(
        list(target_set.train),
        batch_size=config.batch_size,
        seq_len=config.seq_len,
        seed=config.seed,
        num_workers=0,
    )
    names = loader.domain_names
    loader.set_weights(dict.fromkeys(names, 1.0))
    targets = val_targets(
        target_set.val,
        samples=config.target_samples,
        batch_size=config.target_batch_size,
        seq_len=config.seq_len,
        seed=config.seed,
    )
    labelled = branch_mixtures(names, dirichlet=config.dirichlet, lean=config.lean, seed=config.seed)
    mixtures = np.stack(list(labelled.values()))
    online = {
        kind: GroupInfluence(
            model,
            k=config.k,
            preconditioner=kind,
            seed=config.seed,
            half_life=config.half_life,
            domains=names,
        )
        for kind in config.preconditioners
    }
    optimizer, _ = make_optimizer(model, config.train_config)
    for engine in online.values():  # the "adam" preconditioner reads its second moments
        engine.bind_optimizer(optimizer)
    train_config = config.train_config
    batches = iter(loader)
    records, step = [], 0
    try:
        for checkpoint in config.checkpoints:
            while step < checkpoint:
                batch = {key: value.to(device) for key, value in next(batches).items()}
                with contextlib.ExitStack() as stack:
                    for engine in online.values():
                        stack.enter_context(engine.observe(batch))
                    for group in optimizer.param_groups:
                        group["lr"] = train_config.lr_at(step)
                    per_token = per_token_loss(model, batch)
                    loss = per_token.sum() / (batch["labels"] != IGNORE_INDEX).sum().clamp(min=1)
                    loss.backward()
                if train_config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
            influence = {
                f"online {kind} k={config.k}": e.influence(targets).values for kind, e in online.items()
            }
            influence.update(
                _fresh_influence(model, optimizer, loader, targets, config=config, key=checkpoint)
            )
            if list(targets) == [f"{name}/val" for name in names]:
                influence[OWN_DOMAIN] = np.eye(len(names))
            before = target_losses(model, targets)
            rows = config.weighted_rows if config.branch_data == "weighted" else config.batch_size
            data = branch_data(loader, steps=config.branch_steps, batch_size=rows, key=checkpoint)
            if "branch-rows" in config.exact:
                influence[BRANCH_ROWS] = branch_rows_influence(model, optimizer, data, names, targets)
            change = np.stack(
                [
                    target_losses(run_branch(model, optimizer, w, data, config=config, start=step), targets)
                    - before
                    for w in mixtures
                ]
            )
            prior = dict.fromkeys(names, 1.0)
            decisions = {}
            for name, S in influence.items():
                if not decides(name, config):
                    continue
                for t in config.solve_steps:
                    solver = get_mixer(
                        "tikmix_d", max_step=config.max_step, min_weight=config.min_weight, step=t
                    )
                    solved = solver.propose(
                        MixingContext(domains=tuple(names), w_prior=prior, influence=S)
                    ).weights
                    branch = run_branch(model, optimizer, solved, data, config=config, start=step)
                    solved_change = target_losses(branch, targets) - before
                    decisions[f"{name} step={t:g}"] = measured_branch(solved, solved_change, change)
            record = {
                "step": checkpoint,
                "decisions": decisions,
                "before": before.tolist(),
                "change": change.tolist(),
                "influence": {name: S.tolist() for name, S in influence.items()},
                "scores": {name: score_predictor(S, mixtures, change) for name, S in influence.items()},
            }
            if hold_out_name is not None:
                natural = np.array(list(loader.natural_weights().values()))
                branch = run_branch(model, optimizer, natural, data, config=config, start=step)
                record["natural"] = measured_branch(natural, target_losses(branch, targets) - before, change)
            records.append(record)
            if progress:
                print(f"checkpoint {checkpoint}: {time.perf_counter() - started:.0f} s", flush=True)
    finally:
        loader.close()
    result = {
        "hold_out": hold_out_name,
        "domains": names,
        "targets": list(targets),
        "mixtures": {label: w.tolist() for label, w in labelled.items()},
        "checkpoints": records,
        "seconds": time.perf_counter() - started,
    }
    if hold_out_name is not None:
        add_fitted_floor(result)
    add_linear_ceiling(result)
    return result


def report(result: dict) -> str:
    """Markdown: per predictor, median Spearman/Pearson over targets x checkpoints, mean-target Spearman,
    and regret per checkpoint beside stratified's (the baseline)."""
    steps = [record["step"] for record in result["checkpoints"]]
    regret_heads = " | ".join(f"regret @{s}" for s in steps)
    lines = [
        f"| predictor | median Spearman | median Pearson | Spearman of mean target | {regret_heads} |",
        "|---|---|---|---|" + "---|" * len(steps),
    ]
    predictors = list(result["checkpoints"][0]["scores"])
    for name in predictors:
        scores = [record["scores"][name] for record in result["checkpoints"]]
        spearman = np.median([value for s in scores for value in s["spearman"]])
        pearson = np.median([value for s in scores for value in s["pearson"]])
        mean_target = np.median([s["spearman_mean_target"] for s in scores])
        regrets = " | ".join(f"{s['regret']:.4f}" for s in scores)
        lines.append(f"| {name} | {spearman:.2f} | {pearson:.2f} | {mean_target:.2f} | {regrets} |")
    baseline = " | ".join(
        f"{record['scores'][predictors[0]]['baseline_regret']:.4f}" for record in result["checkpoints"]
    )
    lines.append(f"| stratified (baseline) | — | — | — | {baseline} |")
    if "natural" in result["checkpoints"][0]:
        natural = " | ".join(f"{record['natural']['regret']:.4f}" for record in result["checkpoints"])
        lines.append(f"| natural | — | — | — | {natural} |")
    spread = " | ".join(
        f"{np.ptp(np.mean(record['change'], axis=1)):.4f}" for record in result["checkpoints"]
    )
    lines.append(f"| spread of branches' mean change (max - min) | — | — | — | {spread} |")
    lines += [
        "",
        "| TiKMiX-D solved from | "
        + " | ".join(f"Δ vs stratified @{s}" for s in steps)
        + " | mean Δ | mean regret |",
        "|---|" + "---|" * (len(steps) + 2),
    ]
    for name in result["checkpoints"][0]["decisions"]:
        decisions = [record["decisions"][name] for record in result["checkpoints"]]
        deltas = [decision["vs_stratified"] for decision in decisions]
        cells = " | ".join(f"{delta:+.4f}" for delta in deltas)
        regret = np.mean([decision["regret"] for decision in decisions])
        lines.append(f"| {name} | {cells} | {np.mean(deltas):+.4f} | {regret:.4f} |")
    baseline = np.mean(
        [record["scores"][predictors[0]]["baseline_regret"] for record in result["checkpoints"]]
    )
    lines += [
        "",
        "| step fitted on the other checkpoints, from | "
        + " | ".join(f"step, Δ @{s}" for s in steps)
        + " | mean Δ | mean regret (stratified's) |",
        "|---|" + "---|" * (len(steps) + 2),
    ]
    for name, fitted in held_out_steps(result).items():
        cells = " | ".join(f"{pick['step']:g}, {pick['vs_stratified']:+.4f}" for pick in fitted)
        delta = np.mean([pick["vs_stratified"] for pick in fitted])
        regret = np.mean([pick["regret"] for pick in fitted])
        lines.append(f"| {name} | {cells} | {delta:+.4f} | {regret:.4f} ({baseline:.4f}) |")
    return "\n".join(lines)


def pooled_report(results: dict[str, dict]) -> str:
    """Markdown pooled over every (hold-out, checkpoint) of ``results`` ({held-out domain: ``run_check``}):
    per predictor the median Spearman/Pearson, how often Spearman reaches 0.8, and the mean regret of its
    pick beside stratified's and natural's; then every TiKMiX-D decision's and natural's mean difference from
    stratified with its standard error over the cases (``scipy.stats.sem``, treating cases as independent),
    the wins (below stratified) and mean regret, and the same for the step fitted on the other checkpoints."""
    records = [record for result in results.values() for record in result["checkpoints"]]
    n = len(records)
    predictors = [name for name in records[0]["scores"] if all(name in r["scores"] for r in records)]
    lines = [
        f"Pooled over {len(results)} hold-out(s) x {n // len(results)} checkpoints = {n} cases.",
        "",
        "| predictor | median Spearman | median Pearson | Spearman >= 0.8 | mean regret of its pick |",
        "|---|---|---|---|---|",
    ]
    for name in predictors:
        spearman = [value for r in records for value in r["scores"][name]["spearman"]]
        pearson = [value for r in records for value in r["scores"][name]["pearson"]]
        regret = np.mean([r["scores"][name]["regret"] for r in records])
        lines.append(
            f"| {name} | {np.median(spearman):.2f} | {np.median(pearson):.2f} | "
            f"{sum(value >= 0.8 for value in spearman)}/{len(spearman)} | {regret:.4f} |"
        )
    baseline = np.mean([r["scores"][predictors[0]]["baseline_regret"] for r in records])
    lines.append(f"| stratified (baseline) | — | — | — | {baseline:.4f} |")
    if all("natural" in r for r in records):
        lines.append(f"| natural | — | — | — | {np.mean([r['natural']['regret'] for r in records]):.4f} |")
    lines += [
        "",
        "| median Spearman over checkpoints, held out: | " + " | ".join(results) + " |",
        "|---|" + "---|" * len(results),
    ]
    for name in predictors:
        cells = " | ".join(
            f"{np.median([v for r in result['checkpoints'] for v in r['scores'][name]['spearman']]):.2f}"
            for result in results.values()
        )
        lines.append(f"| {name} | {cells} |")
    lines += [
        "",
        "| branch | mean Δ vs stratified ± SE | below stratified | mean regret |",
        "|---|---|---|---|",
    ]
    rows = {f"TiKMiX-D from {key}": [r["decisions"][key] for r in records] for key in records[0]["decisions"]}
    if all("natural" in r for r in records):
        rows["natural"] = [r["natural"] for r in records]
    fitted: dict[str, list[dict]] = {}
    for result in results.values():
        for name, picks in held_out_steps(result).items():
            fitted.setdefault(f"TiKMiX-D from {name}, step fitted on other checkpoints", []).extend(picks)
    rows.update(fitted)
    for name, measured in rows.items():
        deltas = [m["vs_stratified"] for m in measured]
        regret = np.mean([m["regret"] for m in measured])
        error = stats.sem(deltas) if len(deltas) > 1 else float("nan")
        lines.append(
            f"| {name} | {np.mean(deltas):+.4f} ± {error:.4f} | {sum(d < 0 for d in deltas)}/{len(deltas)} | "
            f"{regret:.4f} |"
        )
    return "\n".join(lines)


def held_out_steps(result: dict) -> dict[str, list[dict]]:
    """The partial step fitted on measured branches, judged on a checkpoint it was not fitted on.

    Per predictor and checkpoint: the step whose decisions had the lowest mean ``vs_stratified`` over the
    *other* checkpoints (ties: the smaller step), and that step's ``vs_stratified`` and ``regret`` at this
    one. With one checkpoint there is nothing to fit on, so the result is empty.
    """
    records = result["checkpoints"]
    if len(records) < 2:
        return {}
    by_predictor: dict[str, dict[float, str]] = {}
    for key in records[0]["decisions"]:
        name, _, step = key.rpartition(" step=")
        by_predictor.setdefault(name, {})[float(step)] = key
    out = {}
    for name, keys in by_predictor.items():
        picks = []
        for index, record in enumerate(records):
            others = [other for j, other in enumerate(records) if j != index]
            fitted = min(
                sorted(keys),
                key=lambda t: np.mean([other["decisions"][keys[t]]["vs_stratified"] for other in others]),
            )
            picks.append(
                {
                    "step": fitted,
                    **{k: record["decisions"][keys[fitted]][k] for k in ("vs_stratified", "regret")},
                }
            )
        out[name] = picks
    return out


def saved_hold_outs(paths: list[str]) -> dict[str, dict]:
    """The held-out runs saved in ``paths`` (``--json`` of ``--hold-out`` or ``--leave-one-out``), keyed
    ``<hold-out> (seed <s>)``.

    Raises:
        ConfigError: a file holds no held-out run (the default targets are not pooled).
    """
    out = {}
    for path in paths:
        with open(path) as handle:
            saved = json.load(handle)
        runs = saved["hold_outs"] if saved.get("mode") == "leave-one-out" else {saved.get("hold_out"): saved}
        if None in runs:
            raise ConfigError(f"--pool {path}: not a --hold-out or --leave-one-out run; nothing to pool.")
        for run in runs.values():
            add_linear_ceiling(run)
        out.update({f"{name} (seed {saved['config']['seed']})": run for name, run in runs.items()})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default="corpus", help="corpus directory DIR/<domain>/{train,val,test}/")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", default=None, help="write every checkpoint's record here")
    parser.add_argument("--progress", action="store_true", help="print the time at every checkpoint")
    held_out = parser.add_mutually_exclusive_group()
    held_out.add_argument(
        "--hold-out", default=None, metavar="NAME", help="train on the other domains; target NAME's val split"
    )
    held_out.add_argument(
        "--leave-one-out", action="store_true", help="--hold-out every domain in turn, pooled in one report"
    )
    defaults = CounterfactualConfig()
    for item in dataclasses.fields(CounterfactualConfig):
        default = getattr(defaults, item.name)
        flag = f"--{item.name.replace('_', '-')}"
        if isinstance(default, tuple):
            kind = {"preconditioners": str, "exact": str, "solve_steps": float}.get(item.name, int)
            parser.add_argument(flag, nargs="+", type=kind, default=list(default), help=item.metadata["help"])
        else:
            parser.add_argument(flag, type=type(default), default=default, help=item.metadata["help"])
    parser.add_argument(
        "--pool",
        nargs="+",
        default=None,
        metavar="JSON",
        help="run nothing: pool the hold-outs of saved runs",
    )
    args = parser.parse_args(argv)
    if args.pool:
        print(pooled_report(saved_hold_outs(args.pool)))
        return
    apply_threads(args.threads)
    config = CounterfactualConfig(
        **{item.name: getattr(args, item.name) for item in dataclasses.fields(defaults)}
    )
    if args.leave_one_out:
        hold_outs = load_splits(args.corpus).names
    else:
        hold_outs = [args.hold_out]
    results = {}
    for name in hold_outs:
        result = run_check(config, args.corpus, hold_out_name=name, progress=args.progress)
        print(
            f"{'' if name is None else f'held out {name}: '}{len(result['mixtures'])} branches x "
            f"{config.branch_steps} steps at steps {list(config.checkpoints)} ({config.model}, "
            f"{config.batch_size} x {config.seq_len}, seed {config.seed}); {result['seconds']:.0f} s; "
            f"torch {torch.__version__}, {platform.machine()}, {datetime.date.today()}"
        )
        print(report(result), flush=True)
        results[name] = result
    if args.leave_one_out:
        print(pooled_report(results))
        saved = {"mode": "leave-one-out", "hold_outs": results}
    elif args.hold_out is not None:
        print(pooled_report(results))
        saved = results[args.hold_out]
    else:
        saved = results[None]
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"config": dataclasses.asdict(config), **saved}, handle, indent=1)


if __name__ == "__main__":
    main()
