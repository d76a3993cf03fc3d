"""``GroupInfluence``: how much each data domain helps each target set, from projected per-domain gradients.

``S[b, d] = psi_b^T H^-1 phi_d`` (docs/methods.md §3), positive = helpful, where ``phi_d`` is the gradient of
domain d's mean per-token loss and ``psi_b`` that of target b's mean loss, over the weights of the tracked
layers (``nn.Linear`` and HF ``Conv1D``, as the ``Task`` lists them), Kronecker-projected to ``k_out x k_in``
per layer (LoGra-style; ``k=None`` is exact). Two ways to get ``phi``:

- **Observation mode**, ``compute(domains=..., targets=...)``: extra forward and backward passes over a sample
  of every domain, then over the targets. The curvature factors are estimated on the domain tokens.
- **Online mode**, ``with gi.observe(batch): loss.backward()`` around the ordinary training step: the hooks
  see every tracked layer's ``x`` and ``g`` in the training backward anyway, and the batch's ``domain`` column
  gives every token its segment, so one kernel call per layer yields all domains' projected gradients with no
  extra pass. Sums are kept as an EMA (``half_life`` in steps); ``influence(targets)`` runs the target passes
  only when a decision is due.

Normalisation (ours). The hooks see ``g = dL/dy`` of whatever loss is backpropagated. Observation passes
backpropagate the *sum* of per-token losses, so ``g`` has per-token scale and ``phi_d = sum / tokens_d``. The
training loss in online mode is usually the *mean* over the batch's loss tokens, so its ``g`` is the sum's
``g`` divided by that count; ``observe`` multiplies back by ``1 / loss_scale`` (by default ``loss_scale = 1 /
loss tokens of the batch``; pass your own for gradient accumulation, AMP loss scaling or other reductions)
before summing per domain, and divides by the domain's EMA-weighted token count at decision time. The same
scale goes into the curvature factors (``B`` picks up its square).

Segments (ours). A token is observed (segment id = its row's group) when it or a later token of its row counts
in the loss: under causal attention only those tokens can carry gradient, and a loss-masked token *before* a
counted one still does (later tokens attend to it), so dropping it would make ``phi`` inexact. Padding and
masked tails get -1 and stay out of the curvature factors. Loss tokens (the divisor) are the positions the
task's ``loss_mask`` marks (the batch's labels under its recorded label convention); a ``loss_fn`` returning
one loss per row ([B]) makes rows the unit instead.

Adam (``preconditioner="adam"``, with the training ``optimizer``): ``H^-1`` is AdamW's per-weight step size
``1 / (sqrt(v_hat) + eps)``, rank-1 factored and applied to every token's ``x`` and ``g`` before projection
(``influence/_adam.py`` states what is approximated). The second moments are read when the gradients are
taken: in online mode each ``observe`` step scales its domain gradients by that step's optimizer state (a
step before the optimizer's first ``step()``, when there is none, is not observed) and ``influence`` scales
the targets by the state at the call; ``compute`` scales both by the state at the call.

Passes never touch parameters' ``.grad`` or the optimizer: observation passes use
``torch.autograd.grad(loss, layer outputs)``, run in ``eval()`` mode and give the tracked weights
``requires_grad=True`` temporarily (so frozen models work); online mode only reads the training backward.

Distributed (``torch.distributed`` initialised): per-group sums, token counts and curvature sums are summed
over ranks before use, so the result equals one process that saw the union of every rank's batches. In online
mode, ``state_dict()`` is therefore a collective call (every rank must call it) that returns the union; on
``load_state_dict`` rank 0 takes the union and the other ranks start from zero, so any world size resumes
exactly.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from tikmix_loader import ops
from tikmix_loader.errors import ConfigError, DomainError, StateError
from tikmix_loader.influence._adam import Scales, adam_scales, check_optimizer
from tikmix_loader.influence._capture import Projections, capture, select_layers, tied_uses
from tikmix_loader.influence._statistics import Statistics, distributed_world
from tikmix_loader.influence.config import InfluenceConfig
from tikmix_loader.influence.matrix import InfluenceMatrix
from tikmix_loader.influence.preconditioners import (
    Eigenbasis,
    EKFACPreconditioner,
    get_preconditioner,
)
from tikmix_loader.influence.task import CausalLMTask, Task

logger = logging.getLogger(__name__)

STATE_VERSION = 1
LossFn = Callable[[nn.Module, dict], torch.Tensor]


@dataclass
class _Layout:
    """Which tokens of a [B, T] batch are observed and how many loss units each row holds."""

    live: torch.Tensor  # [B, T] bool: the token can carry gradient to a counted loss
    live_rows: torch.Tensor  # [B] bool: the row has a live token
    units: torch.Tensor  # [B] float64: loss tokens (or 1 per row for per-row losses)
    mask: torch.Tensor  # [B, T] or [B] float: 1 where the loss counts


@dataclass
class _Pass:
    """What the gradient sink does with each tracked layer's (x, g) during one batch or training step."""

    step: Statistics  # float32 sums of this batch's backpropagated g (the caller merges and scales them)
    token_segments: torch.Tensor  # [B * T] int64, -1 = ignored
    row_segments: torch.Tensor  # [B] int64 for layers that see one row per example
    num_segments: int
    live_tokens: torch.Tensor
    live_rows: torch.Tensor
    factors: bool
    accumulate_phi: bool = True
    segment_groups: torch.Tensor | None = None  # group of each kernel segment; None = segment ids are groups
    basis: list[Eigenbasis] | None = None  # accumulate EK-FAC's Lambda in this basis
    scales: Scales | None = None  # per layer (x, g) scales applied before projection ("adam")
    fired: int = 0
    token_calls: list[int] = field(default_factory=list)  # per layer: calls that saw one row per token
    row_calls: list[int] = field(default_factory=list)  # per layer: calls that saw one row per example

    def count(self) -> None:
        """Write the per-layer token and example counts of this pass's calls into ``step``."""
        device = self.step.flat.device
        tokens = torch.tensor(self.token_calls, dtype=torch.float64, device=device)
        rows = torch.tensor(self.row_calls, dtype=torch.float64, device=device)
        examples = (tokens + rows) * self.live_rows
        if self.factors:
            self.step.factor_tokens += tokens * self.live_tokens + rows * self.live_rows
            self.step.factor_examples += examples
        if self.basis is not None:
            self.step.lam_examples += examples


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel's forward arms its gradient all-reduce; observation passes must bypass it.
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _tracked_fraction(model: nn.Module, layers) -> float:
    """Share of ``model``'s parameters (each shared tensor once) held by the tracked layers' weights."""
    total = sum(param.numel() for param in model.parameters())
    weights = {id(layer.module.weight): layer.module.weight for layer in layers}
    tracked = sum(weight.numel() for weight in weights.values())
    return tracked / total if total else 0.0


def _names(groups: Mapping, what: str) -> tuple[str, ...]:
    if not isinstance(groups, Mapping) or not groups:
        raise ConfigError(
            f"GroupInfluence: `{what}` must be a non-empty dict of name -> iterable of batches, "
            f"got {type(groups).__name__}"
        )
    names = tuple(groups)
    bad = [name for name in names if not isinstance(name, str) or not name]
    if bad:
        raise ConfigError(f"GroupInfluence: `{what}` names must be non-empty strings, got {bad}")
    return names


class GroupInfluence:
    """Group Influence of domains on targets over a model's Linear and Conv1D layers (docs/methods.md §2-3,
    §6).

    Args:
        model (nn.Module): The model (a ``DistributedDataParallel`` wrapper is unwrapped).
        task (Task | None): How to run the model: its per-token loss, loss mask and trackable modules.
            ``HFCausalLMTask()`` for Hugging Face causal LMs. Default: None (``CausalLMTask()``:
            ``model(input_ids)`` returning logits or an output with ``.logits``, e.g. TinyGPT).
        k (int | tuple[int, int] | None): Projection width, ``(k_in, k_out)``, or None (exact). Default: 64.
        preconditioner (str): ``"identity"``, ``"kfac"``, ``"ekfac"`` or ``"adam"`` (needs ``optimizer``).
            Default: ``"kfac"``.
        damping (float): Damping relative to the mean eigenvalue (see ``InfluenceConfig``). Default: 0.1.
        layers (Sequence[str] | None): fnmatch patterns of tracked layer names; None = every layer the task
            lists. Default: None.
        exclude (Sequence[str]): fnmatch patterns of layers to skip. Default: ().
        seed (int): Seed of the projections. Default: 0.
        backend (str): Kernel backend for ``tikmix_loader.ops``. Default: ``"auto"``.
        half_life (float | None): Online EMA half-life in ``observe`` steps; None = plain sum. Default: None.
        domains (Sequence[str] | None): Online mode: domain names, indexed by the batches' ``domain`` column
            (e.g. ``loader.domain_names``). Default: None.
        optimizer (torch.optim.Optimizer | None): The training Adam/AdamW, whose second moments the
            ``"adam"`` preconditioner reads (or call ``bind_optimizer`` later, before the first pass); the
            other preconditioners ignore it. Default: None.

    Only the tracked layers' weights count (biases are left out: the kernels are weights-only);
    ``layer_names`` lists them and ``tracked_fraction`` is their share of the model's parameters (logged).
    Under torch.distributed every rank must call ``compute``/``influence`` with the same group names.

    Raises:
        TrackingError: the model has no ``nn.Linear``/``Conv1D`` the task can track, or ``layers``/``exclude``
            select none.
        ConfigError: ``optimizer`` is not an Adam-family torch optimizer of every tracked weight ("adam").

    Example (online)::

        gi = GroupInfluence(model, k=64, domains=loader.domain_names, half_life=200)
        for batch in loader:
            with gi.observe(batch):
                loss = per_token_loss(model, batch).sum() / loss_mask(batch).sum()
                loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        S = gi.influence({"val": val_batches})
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        task: Task | None = None,
        k: int | tuple[int, int] | None = 64,
        preconditioner: str = "kfac",
        damping: float = 0.1,
        layers=None,
        exclude=(),
        seed: int = 0,
        backend: str = "auto",
        half_life: float | None = None,
        domains=None,
        optimizer: torch.optim.Optimizer | None = None,
    ):
        self.config = InfluenceConfig(
            k=k,
            preconditioner=preconditioner,
            damping=damping,
            layers=None if layers is None else tuple([layers] if isinstance(layers, str) else layers),
            exclude=tuple([exclude] if isinstance(exclude, str) else exclude),
            seed=seed,
            backend=backend,
            half_life=half_life,
        )
        self.model = _unwrap(model)
        self.task = CausalLMTask() if task is None else task
        self.layers = select_layers(self.model, self.config, self.task)
        self.tracked_fraction = _tracked_fraction(self.model, self.layers)
        logger.info(
            "GroupInfluence tracks %d layers (%.1f%% of %s's parameters): %s",
            len(self.layers),
            100 * self.tracked_fraction,
            type(self.model).__name__,
            self.layer_names,
        )
        for name, others in tied_uses(self.model, self.layers).items():
            warnings.warn(
                f"GroupInfluence: tracked layer {name!r} shares its weight with {others} (tied weights); "
                f"its influence counts only the {name!r} use of the weight, not the gradient summed over "
                f"every use that training applies; pass exclude=[{name!r}] to leave it out "
                "(docs/methods.md §2)",
                UserWarning,
                stacklevel=2,
            )
        # Unprojected (d_in, d_out) per layer: damping is relative to the unprojected mean eigenvalue.
        self._widths = [(layer.d_in, layer.d_out) for layer in self.layers]
        self._projections = Projections(self.layers, self.config.seed)
        self.domains = None if domains is None else _names(dict.fromkeys(domains), "domains")
        self._pass: _Pass | None = None
        self._online: Statistics | None = None
        self._step: Statistics | None = None
        self._basis: list[Eigenbasis] | None = None
        self.steps = 0
        self.optimizer: torch.optim.Optimizer | None = None
        if optimizer is not None:
            self.bind_optimizer(optimizer)

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Use ``optimizer`` (the training Adam/AdamW) for the ``"adam"`` preconditioner; other
        preconditioners ignore it. Usable as a training loop's ``optimizer_hook``.

        Raises:
            ConfigError: ("adam") not a torch optimizer with Adam's ``betas`` and ``eps``, or a tracked
                layer's weight is in none of its param groups; the message names the layer.
        """
        if self._kind.needs_optimizer:
            check_optimizer(optimizer, self.layers)
        self.optimizer = optimizer

    @property
    def _kind(self) -> type:
        return get_preconditioner(self.config.preconditioner)

    def _scales(self, what: str, *, before_first_step: bool = False) -> Scales | None:
        """The ``"adam"`` (x, g) scales from the optimizer's current state (None for other preconditioners,
        and before the optimizer's first step when ``before_first_step`` allows it).

        Raises:
            ConfigError: no optimizer bound, or (unless allowed) it has not stepped yet.
        """
        if not self._kind.needs_optimizer:
            return None
        if self.optimizer is None:
            raise ConfigError(
                f"{what}: preconditioner 'adam' needs the training optimizer; build the engine with "
                "`optimizer=` or call `bind_optimizer(optimizer)` first"
            )
        scales = adam_scales(self.optimizer, self.layers)
        if scales is None and not before_first_step:
            raise ConfigError(
                f"{what}: preconditioner 'adam' reads the optimizer's second moments, but it has no state "
                f"for the tracked layers yet (e.g. {self.layer_names[0]!r}); call it after the first "
                "`optimizer.step()`"
            )
        return scales

    # -- public: observation mode -----------------------------------------------------------------

    @property
    def layer_names(self) -> list[str]:
        """Names of the tracked layers, in module order."""
        return [layer.name for layer in self.layers]

    def compute(
        self,
        domains: Mapping[str, Iterable[dict]],
        targets: Mapping[str, Iterable[dict]],
        loss_fn: LossFn | None = None,
        *,
        progress: bool = False,
    ) -> InfluenceMatrix:
        """Group Influence of every domain on every target, from extra passes over samples of both.

        EK-FAC needs a second pass over the domain batches (its eigenvalue correction is measured in the
        eigenbasis the first pass estimates), so with ``preconditioner="ekfac"`` each domain's batches are
        held in a list.

        Args:
            domains (Mapping[str, Iterable[dict]]): Domain name -> batches (``input_ids``, ``labels`` [B, T]).
            targets (Mapping[str, Iterable[dict]]): Target name -> batches.
            loss_fn (LossFn | None): ``loss_fn(model, batch)`` -> per-token loss [B, T] (masked entries 0) or
                per-row loss [B], reduction none. Default: None (the task's ``per_token_loss``).
            progress (bool): Show a tqdm bar per group. Default: False.

        Returns:
            InfluenceMatrix: ``values`` [n_targets, n_domains].

        Raises:
            DomainError: a domain or target has no loss tokens (on any rank).
            ConfigError: bad arguments or a ``loss_fn`` output of the wrong shape.
        """
        domain_names, target_names = _names(domains, "domains"), _names(targets, "targets")
        kind = self._kind
        scales = self._scales("GroupInfluence.compute")
        if kind.needs_lambda:  # its eigenvalues are measured in a second pass over the domain batches
            domains = {name: list(batches) for name, batches in domains.items()}
        with self._observation_mode():
            stats = self._new_stats(len(domain_names), factors=kind.needs_factors, lam=False)
            processed = self._observe_groups(
                domains, loss_fn, stats, progress=progress, what="domain", scales=scales
            )
            stats.all_reduce_()
            self._require_tokens(stats.tokens, domain_names, "domain")
            if not kind.needs_lambda:
                preconditioner = self._factored_preconditioner(stats)
            else:
                bases = [Eigenbasis.of(a, b) for a, b in self._cpu_factors(stats)]
                lam_stats = self._new_stats(0, factors=False, lam=True)
                processed += self._observe_groups(
                    domains, loss_fn, lam_stats, progress=progress, what="domain (EK-FAC pass)", basis=bases
                )
                lam_stats.all_reduce_()
                lambdas = [lam.cpu() for lam in lam_stats.lambdas()]
                preconditioner = EKFACPreconditioner(
                    bases=bases, lambdas=lambdas, widths=self._widths, damping=self.config.damping
                )
            target_stats, target_processed = self._collect_targets(
                targets, loss_fn, progress=progress, scales=scales
            )
        return self._matrix(
            stats, target_stats, preconditioner, processed + target_processed, domain_names, target_names
        )

    # -- public: online mode ----------------------------------------------------------------------

    @contextmanager
    def observe(self, batch: dict, *, loss_scale: float | None = None):
        """Collect per-domain projected gradients from the training backward run inside this block.

        Run the forward and ``loss.backward()`` inside the block; call ``optimizer.step()`` after it. Each
        block is one EMA step: with gradient accumulation, wrap each micro-batch and count ``half_life`` in
        micro-batches.

        Args:
            batch (dict): The training batch: ``labels`` [B, T] with its ``label_shift`` (the label
                convention) and ``domain`` [B] (an index into ``domains``).
            loss_scale (float | None): The factor your backpropagated loss applies to the *sum* of per-token
                losses. Default None means the mean over the batch's loss tokens (the task's
                ``loss_mask``), i.e. ``1 / count``. With gradient accumulation over n micro-batches pass
                ``1 / (count * n)``; with an AMP ``GradScaler`` multiply by ``scaler.get_scale()``.

        With ``preconditioner="adam"`` the domain gradients are scaled by the optimizer's state now (before
        this step's ``optimizer.step()``); a block before the optimizer's first step has no state to read,
        so it is not observed (nothing is added and ``steps`` does not count it).

        Raises:
            ConfigError: ``domains`` was not given, the batch lacks ``labels``/``domain``, or ("adam") no
                optimizer is bound.
            DomainError: a ``domain`` index is out of range.
            StateError: no backward reached a tracked layer inside the block.
        """
        if self.domains is None:
            raise ConfigError(
                "GroupInfluence.observe: online mode needs the domain names; build it with "
                "`domains=loader.domain_names`"
            )
        labels, domain = batch.get("labels"), batch.get("domain")
        if labels is None or domain is None:
            raise ConfigError(
                "GroupInfluence.observe: the batch needs `labels` [B, T] and `domain` [B]; got keys "
                f"{sorted(batch)}"
            )
        device = self.layers[0].module.weight.device
        domain = torch.as_tensor(domain, device=device).long().reshape(-1)
        if domain.numel() and (int(domain.min()) < 0 or int(domain.max()) >= len(self.domains)):
            raise DomainError(
                f"GroupInfluence.observe: batch `domain` ids span [{int(domain.min())}, {int(domain.max())}] "
                "but "
                f"there are {len(self.domains)} domains {list(self.domains)}"
            )
        if loss_scale is not None and not (isinstance(loss_scale, (int, float)) and loss_scale > 0):
            raise ConfigError(
                f"GroupInfluence.observe: `loss_scale` must be a positive float, got {loss_scale!r}"
            )
        layout = self._layout(batch, per_row=False, device=device)
        scales = self._scales("GroupInfluence.observe", before_first_step=True)
        if self._kind.needs_optimizer and scales is None:
            logger.info("GroupInfluence.observe ('adam'): the optimizer has not stepped yet; not observed")
            yield
            return
        if self._online is None:
            self._online = self._new_online_stats()
        if self._step is None:
            self._step = self._online.like(dtype=torch.float32)
        step = self._step.zero_()
        if self._kind.needs_lambda and self._basis is not None:
            rows = torch.arange(len(domain), device=device)
            pass_ = self._make_pass(step, layout, rows, len(domain), factors=True, segment_groups=domain)
            pass_.basis = self._basis
        else:
            pass_ = self._make_pass(step, layout, domain, len(self.domains), factors=self._kind.needs_factors)
        pass_.scales = scales
        step.tokens.index_add_(0, domain, layout.units.to(step.tokens.dtype))
        self._pass = pass_
        try:
            with capture(self.layers, self._sink):
                yield
        finally:
            self._pass = None
        if pass_.fired == 0:
            raise StateError(
                "GroupInfluence.observe: no backward reached a tracked layer inside the block; run the "
                "forward and loss.backward() inside `with gi.observe(batch):` with gradients enabled"
            )
        pass_.count()
        multiplier = float(layout.units.sum()) if loss_scale is None else 1.0 / loss_scale
        self._online.merge_(step, decay=self.config.decay, multiplier=multiplier)
        self.steps += 1

    def influence(
        self,
        targets: Mapping[str, Iterable[dict]],
        loss_fn: LossFn | None = None,
        *,
        progress: bool = False,
    ) -> InfluenceMatrix:
        """Group Influence of the observed domains on ``targets``, from the online statistics.

        Runs the target passes now (without touching ``.grad``). A domain not yet observed gets 0 and token
        count 0. With EK-FAC, the eigenvalue correction is measured in the eigenbasis fixed at the previous
        call; the first call has none yet and uses K-FAC's eigenvalues in the current basis. Each call then
        refreshes the basis and restarts the correction's sums. Under torch.distributed every rank must call
        it.

        Args:
            targets (Mapping[str, Iterable[dict]]): Target name -> batches.
            loss_fn (LossFn | None): Per-token [B, T] or per-row [B] loss. Default: None (the task's).
            progress (bool): Show a tqdm bar per target. Default: False.

        Raises:
            StateError: nothing was observed yet.
            DomainError: a target has no loss tokens.
        """
        if self._online is None or self.steps == 0:
            raise StateError(
                "GroupInfluence.influence: no `observe` step yet; observe training batches first"
            )
        target_names = _names(targets, "targets")
        scales = self._scales("GroupInfluence.influence")
        stats = self._online.clone().all_reduce_()
        kind = self._kind
        if not kind.needs_lambda:
            preconditioner = self._factored_preconditioner(stats)
        else:
            fresh = [Eigenbasis.of(a, b) for a, b in self._cpu_factors(stats)]
            if self._basis is not None and float(stats.lam_examples.min()) > 0:
                bases, lambdas = self._basis, [lam.cpu() for lam in stats.lambdas()]
            else:
                bases, lambdas = fresh, [basis.kfac_eigenvalues() for basis in fresh]
            preconditioner = EKFACPreconditioner(
                bases=bases, lambdas=lambdas, widths=self._widths, damping=self.config.damping
            )
        with self._observation_mode():
            target_stats, processed = self._collect_targets(
                targets, loss_fn, progress=progress, scales=scales
            )
        matrix = self._matrix(stats, target_stats, preconditioner, processed, self.domains, target_names)
        if kind.needs_lambda:
            self._basis = fresh
            self._online.zero_lam_()
        return matrix

    def reset(self) -> None:
        """Forget the online statistics (and EK-FAC basis)."""
        self._online = self._step = self._basis = None
        self.steps = 0

    def state_dict(self) -> dict:
        """The online statistics (union over ranks), settings, names and step count.

        Tensors are CPU tensors: save with ``torch.save``. Under torch.distributed this is a collective call
        (the sums are all-reduced); every rank must call it and any rank may save the result.
        """
        stats = None if self._online is None else self._online.clone().all_reduce_().state_dict()
        basis = None
        if self._basis is not None:
            basis = [
                {key: getattr(b, key).cpu() for key in ("q_a", "q_b", "eig_a", "eig_b")} for b in self._basis
            ]
        return {
            "version": STATE_VERSION,
            "config": self.config.to_dict(),
            "domains": None if self.domains is None else list(self.domains),
            "layers": self.layer_names,
            "steps": self.steps,
            "statistics": stats,
            "basis": basis,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``'s state. Under torch.distributed rank 0 takes the sums, other ranks zero.

        Raises:
            StateError: other settings, domains, layers or version; the message names what differs.
        """
        what = "GroupInfluence.load_state_dict"
        if state.get("version") != STATE_VERSION:
            raise StateError(
                f"{what}: state version {state.get('version')!r} != {STATE_VERSION}; not loadable"
            )
        self.config.check_same(state["config"], what=what)
        domains = None if self.domains is None else list(self.domains)
        for key, mine in (("domains", domains), ("layers", self.layer_names)):
            if state[key] != mine:
                raise StateError(
                    f"{what}: saved `{key}` {state[key]} != this engine's {mine}; rebuild it to match"
                )
        self.reset()
        if state["statistics"] is not None:
            self._online = self._new_online_stats()
            if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
                self._online.load_state_dict(state["statistics"], what=what)
        if state["basis"] is not None:
            self._basis = [Eigenbasis(**b) for b in state["basis"]]
        self.steps = int(state["steps"])

    # -- passes -----------------------------------------------------------------------------------

    @contextmanager
    def _observation_mode(self):
        """eval(), gradients on, tracked weights requiring grad; everything restored afterwards."""
        modes = [(module, module.training) for module in self.model.modules()]
        flags = [(layer.module.weight, layer.module.weight.requires_grad) for layer in self.layers]
        self.model.eval()
        for weight, _ in flags:
            weight.requires_grad_(True)
        try:
            with torch.enable_grad():
                yield
        finally:
            for module, training in modes:
                module.training = training
            for weight, flag in flags:
                weight.requires_grad_(flag)

    def _new_stats(self, n_groups: int, *, factors: bool, lam: bool) -> Statistics:
        shapes = [(layer.k_in, layer.k_out) for layer in self.layers]
        device = self.layers[0].module.weight.device
        return Statistics(shapes, n_groups, device=device, factors=factors, lam=lam)

    def _new_online_stats(self) -> Statistics:
        kind = self._kind
        return self._new_stats(len(self.domains), factors=kind.needs_factors, lam=kind.needs_lambda)

    def _layout(self, batch: dict, *, per_row: bool, device: torch.device) -> _Layout:
        labels = batch.get("labels")
        reference = labels if labels is not None else batch.get("input_ids")
        if reference is None or reference.dim() != 2:
            raise ConfigError(
                "GroupInfluence: a batch needs `input_ids` or `labels` of shape [B, T]; "
                f"got keys {sorted(batch)}"
            )
        attention = batch.get("attention_mask")
        attention = None if attention is None else attention.to(device).bool()
        if per_row:
            live = (
                attention
                if attention is not None
                else torch.ones(reference.shape, dtype=torch.bool, device=device)
            )
            mask = torch.ones(reference.shape[0], device=device)
            units = torch.ones(reference.shape[0], dtype=torch.float64, device=device)
        else:
            counted = self.task.loss_mask(batch).to(device) if labels is not None else attention
            if counted is None:
                counted = torch.ones(reference.shape, dtype=torch.bool, device=device)
            # Live = this or a later token of the row counts (a reverse running "any").
            live = counted.flip(1).cumsum(1).flip(1) > 0
            mask = counted.float()
            units = counted.sum(1, dtype=torch.float64)
        return _Layout(live=live, live_rows=live.any(1), units=units, mask=mask)

    def _make_pass(
        self, step, layout: _Layout, row_ids, num_segments, *, factors, segment_groups=None
    ) -> _Pass:
        """A pass whose kernel segment of token (b, t) is ``row_ids[b]`` when the token is live, else -1."""
        token_segments = torch.where(layout.live, row_ids[:, None], -1).reshape(-1)
        return _Pass(
            step=step,
            token_segments=token_segments,
            row_segments=torch.where(layout.live_rows, row_ids, -1),
            num_segments=num_segments,
            live_tokens=layout.live.sum(dtype=torch.float64),
            live_rows=layout.live_rows.sum(dtype=torch.float64),
            factors=factors,
            segment_groups=segment_groups,
            token_calls=[0] * len(self.layers),
            row_calls=[0] * len(self.layers),
        )

    def _observe_groups(self, groups, loss_fn, stats, *, progress, what, basis=None, scales=None) -> int:
        """One observation pass over every group's batches into ``stats``; returns the tokens processed."""
        processed = 0
        step = stats.like(dtype=torch.float32)
        for index, (name, batches) in enumerate(groups.items()):
            for batch in tqdm(batches, desc=f"{what} {name}", disable=not progress, leave=False):
                processed += self._observe_batch(
                    batch, loss_fn, step.zero_(), index, basis=basis, scales=scales
                )
                stats.merge_(step)
        return processed

    def _collect_targets(self, targets, loss_fn, *, progress, scales) -> tuple[Statistics, int]:
        stats = self._new_stats(len(targets), factors=False, lam=False)
        processed = self._observe_groups(
            targets, loss_fn, stats, progress=progress, what="target", scales=scales
        )
        stats.all_reduce_()
        self._require_tokens(stats.tokens, tuple(targets), "target")
        return stats, processed

    def _observe_batch(self, batch, loss_fn, step, group: int, *, basis=None, scales=None) -> int:
        """Forward and backward one batch, summing its statistics into ``step`` (as ``group``)."""
        outputs: list[torch.Tensor] = []
        with capture(self.layers, self._sink, outputs):
            loss = (loss_fn or self.task.per_token_loss)(self.model, batch)
            if not isinstance(loss, torch.Tensor) or loss.dim() not in (1, 2):
                raise ConfigError(
                    "GroupInfluence: `loss_fn` must return a per-token [B, T] or per-row [B] loss tensor "
                    f"(reduction none), got {getattr(loss, 'shape', type(loss).__name__)}"
                )
            device = loss.device
            layout = self._layout(batch, per_row=loss.dim() == 1, device=device)
            if tuple(loss.shape) != tuple(layout.mask.shape):
                raise ConfigError(
                    f"GroupInfluence: `loss_fn` returned shape {tuple(loss.shape)} but the batch's labels "
                    "imply "
                    f"{tuple(layout.mask.shape)}"
                )
            rows = len(layout.units)
            if basis is None:  # one kernel segment (the whole batch), summed into the group's row
                row_ids = torch.zeros(rows, dtype=torch.long, device=device)
                groups = torch.tensor([group], device=device)
                pass_ = self._make_pass(
                    step, layout, row_ids, 1, factors=step.has_factors, segment_groups=groups
                )
                step.tokens[group] += layout.units.sum()
            else:  # one kernel segment per row (example), for EK-FAC's per-example correction
                row_ids = torch.arange(rows, device=device)
                pass_ = self._make_pass(step, layout, row_ids, rows, factors=False)
                pass_.accumulate_phi, pass_.basis = False, basis
            pass_.scales = scales
            if not outputs or not loss.requires_grad:
                raise ConfigError(
                    "GroupInfluence: no tracked layer ran with gradients inside `loss_fn`, or its loss does "
                    f"not require grad; tracked layers: {self.layer_names}"
                )
            self._pass = pass_
            try:
                torch.autograd.grad((loss * layout.mask).sum(), outputs, allow_unused=True)
            finally:
                self._pass = None
            pass_.count()
        return int(layout.live.numel())

    def _sink(self, index: int, x: torch.Tensor, g: torch.Tensor) -> None:
        """Gradient hook body: project layer ``index``'s (x, g) per segment and add them to the statistics."""
        pass_ = self._pass
        layer = self.layers[index]
        if pass_ is None:
            raise StateError(
                f"GroupInfluence: a backward pass reached layer {layer.name!r} after its observe() block "
                "ended; "
                "call loss.backward() inside `with gi.observe(batch):`"
            )
        pass_.fired += 1
        x2, g2 = x.reshape(-1, layer.d_in), g.reshape(-1, layer.d_out)
        if x2.dtype != g2.dtype:  # autocast: the Linear multiplied x in g's dtype
            x2 = x2.to(g2.dtype)
        if x2.shape[0] == pass_.token_segments.numel():
            segments = pass_.token_segments
            pass_.token_calls[index] += 1
        elif x2.shape[0] == pass_.row_segments.numel():
            segments = pass_.row_segments
            pass_.row_calls[index] += 1
        else:
            raise ConfigError(
                f"GroupInfluence: layer {layer.name!r} saw {x2.shape[0]} rows of input but the batch has "
                f"{pass_.token_segments.numel()} tokens in {pass_.row_segments.numel()} rows; exclude it"
            )
        p_in, p_out = self._projections.get(index, x2.device)
        if pass_.scales is not None:
            # "adam": scaling every token's x by s and g by u is scaling the projections' rows, since
            # P_out^T diag(u) (sum g x^T) diag(s) P_in; O(d k) per call instead of O(tokens d).
            x_scale, g_scale = pass_.scales[index]
            p_in, p_out = x_scale[:, None] * p_in, g_scale[:, None] * p_out
        result = ops.project_grads(
            x2,
            g2,
            p_in,
            p_out,
            segments,
            pass_.num_segments,
            return_factors=pass_.factors,
            backend=self.config.backend,
        )
        phi, a, b = result if pass_.factors else (result, None, None)
        step = pass_.step
        if pass_.basis is not None:
            step.lam[index] += pass_.basis[index].rotated_squares(phi)
        if pass_.accumulate_phi:
            if pass_.segment_groups is not None:
                step.phi[index].index_add_(0, pass_.segment_groups, phi)
            else:
                step.phi[index] += phi
        if pass_.factors:
            step.a[index] += a
            step.b[index] += b

    # -- results ----------------------------------------------------------------------------------

    def _factored_preconditioner(self, stats: Statistics):
        """The identity, Adam or K-FAC preconditioner, from the factor sums in ``stats`` when it needs them
        (callers build EK-FAC, whose eigenvalues need a pass in the factors' eigenbasis)."""
        kind = self._kind
        if not kind.needs_factors:  # identity, or Adam: its D was applied before projection
            return kind()
        return kind(factors=self._cpu_factors(stats), widths=self._widths, damping=self.config.damping)

    @staticmethod
    def _cpu_factors(stats: Statistics) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(a.cpu(), b.cpu()) for a, b in stats.factors()]

    @staticmethod
    def _require_tokens(tokens: torch.Tensor, names: tuple[str, ...], what: str) -> None:
        empty = [name for name, count in zip(names, tokens.tolist(), strict=True) if count <= 0]
        if empty:
            raise DomainError(
                f"GroupInfluence: {what}s {empty} have no loss tokens (no batches, or every label is masked "
                "on every rank); give each at least one batch with a counted label"
            )

    def _matrix(
        self, stats, target_stats, preconditioner, processed, domain_names, target_names
    ) -> InfluenceMatrix:
        domain_tokens, target_tokens = stats.tokens.cpu(), target_stats.tokens.cpu()
        domain_div = torch.where(domain_tokens > 0, domain_tokens, 1.0)[:, None, None]
        target_div = target_tokens[:, None, None]
        values = torch.zeros(len(target_names), len(domain_names), dtype=torch.float64)
        for index in range(len(self.layers)):
            phi = stats.phi[index].cpu() / domain_div
            psi = target_stats.phi[index].cpu() / target_div
            values += torch.einsum("tij,dij->td", preconditioner.apply(index, psi), phi)
        processed_total = torch.tensor(float(processed), dtype=torch.float64, device=stats.tokens.device)
        if distributed_world() > 1:
            dist.all_reduce(processed_total)
        k = None if self.config.k is None else self.config.k_pair
        return InfluenceMatrix(
            values=values.numpy(),
            targets=target_names,
            domains=tuple(domain_names),
            domain_tokens=domain_tokens.numpy(),
            target_tokens=target_tokens.numpy(),
            processed_tokens=int(processed_total.item()),
            preconditioner=self.config.preconditioner,
            k=k,
        )
