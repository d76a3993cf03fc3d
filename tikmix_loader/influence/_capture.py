"""Which layers are tracked, their projections, and the hooks that hand each layer's (x, g) to a sink.

The task (``influence.task``) lists the trackable modules: ``nn.Linear`` and Hugging Face ``Conv1D``. Both
compute ``y = x W' + b`` from an input ``x`` [..., d_in]; Conv1D only stores its weight transposed, ``[d_in,
d_out]`` instead of ``[d_out, d_in]``. The hooks see the same ``x`` and ``g`` for both, and every statistic is
kept in the Linear orientation ``g^T x`` [d_out, d_in] (a Conv1D weight's gradient is its transpose), so the
kernels need no change.

A forward hook on every tracked module registers a gradient hook on that call's output, closing over
the call's (detached) input, so when backward reaches the output the sink receives ``x`` [..., d_in] and ``g =
dLoss/dy`` [..., d_out]: exactly the two factors of the weight gradient ``sum_t g_t x_t^T``. Hooks exist only
inside ``capture(...)``; outside it the model runs untouched. Biases are not tracked (the kernels are
weights-only; biases are a tiny share of the parameters).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from tikmix_loader import ops
from tikmix_loader.errors import TrackingError
from tikmix_loader.influence.config import InfluenceConfig
from tikmix_loader.influence.task import Task, is_conv1d


@dataclass(frozen=True)
class TrackedLayer:
    """One tracked layer: its name, module, widths and projected widths (k == d means not projected)."""

    name: str
    module: nn.Module
    d_in: int
    d_out: int
    k_in: int
    k_out: int


def weight_widths(module: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of a trackable module (Conv1D stores ``[d_in, d_out]``, Linear the reverse)."""
    d_first, d_second = module.weight.shape
    return (d_first, d_second) if is_conv1d(module) else (d_second, d_first)


def select_layers(model: nn.Module, config: InfluenceConfig, task: Task) -> list[TrackedLayer]:
    """The tracked layers of ``model`` in module order: ``task``'s modules per ``config.layers``/``exclude``.

    Raises:
        TrackingError: the model has no trackable module, a pattern matches none, or nothing is left; the
            message lists the trackable module names.
    """
    candidates = task.tracked_modules(model)
    names = [name for name, _ in candidates]
    if not candidates:
        raise TrackingError(
            f"GroupInfluence: the model ({type(model).__name__}) has no trackable module (nn.Linear or "
            f"transformers Conv1D) for {type(task).__name__}; influence needs at least one"
        )
    for key in ("layers", "exclude"):
        for pattern in getattr(config, key) or ():
            if not fnmatch.filter(names, pattern):
                raise TrackingError(
                    f"GroupInfluence: `{key}` pattern {pattern!r} matches no trackable module; "
                    f"trackable modules: {names}"
                )
    k_in, k_out = config.k_pair
    tracked = []
    for name, module in candidates:
        included = config.layers is None or any(fnmatch.fnmatchcase(name, p) for p in config.layers)
        if not included or any(fnmatch.fnmatchcase(name, p) for p in config.exclude):
            continue
        d_in, d_out = weight_widths(module)
        tracked.append(
            TrackedLayer(
                name=name,
                module=module,
                d_in=d_in,
                d_out=d_out,
                k_in=d_in if k_in is None else min(k_in, d_in),
                k_out=d_out if k_out is None else min(k_out, d_out),
            )
        )
    if not tracked:
        raise TrackingError(
            f"GroupInfluence: `layers`={config.layers} with `exclude`={config.exclude} leaves no layer; "
            f"trackable modules: {names}"
        )
    return tracked


def tied_uses(model: nn.Module, layers: list[TrackedLayer]) -> dict[str, list[str]]:
    """Tracked layer name -> the other modules that hold the same weight tensor (tied weights, such as GPT-2's
    ``lm_head`` and ``transformer.wte``), for the layers whose weight is shared.

    The hooks see only the tracked module's own use of the weight, while the weight's gradient is the sum
    over every use, so the influence of a tied layer is that of one use (``GroupInfluence`` warns).
    """
    holders: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            holders.setdefault(id(param), []).append((name, module))
    tied = {}
    for layer in layers:
        others = [name for name, module in holders[id(layer.module.weight)] if module is not layer.module]
        if others:
            tied[layer.name] = others
    return tied


class Projections:
    """The fixed projections ``(P_in, P_out)`` of every tracked layer, built once per device.

    A projected side uses ``ops.projection`` (Gaussian, variance 1/k, seeded by the seed, the layer name and
    the shape, so it never depends on device or batch); an unprojected side uses the identity.
    """

    def __init__(self, layers: list[TrackedLayer], seed: int):
        self.layers = layers
        self.seed = seed
        self._cache: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def _side(self, d: int, k: int, name: str, device: torch.device) -> torch.Tensor:
        if k == d:
            return torch.eye(d, dtype=torch.float32, device=device)
        return ops.projection(d, k, seed=self.seed, name=name, dtype=torch.float32, device=device)

    def get(self, index: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P_in [d_in, k_in], P_out [d_out, k_out])`` float32 for layer ``index`` on ``device``."""
        if device not in self._cache:
            self._cache[device] = [
                (
                    self._side(layer.d_in, layer.k_in, f"{layer.name}.in", device),
                    self._side(layer.d_out, layer.k_out, f"{layer.name}.out", device),
                )
                for layer in self.layers
            ]
        return self._cache[device][index]


GradSink = Callable[[int, torch.Tensor, torch.Tensor], None]


@contextmanager
def capture(layers: list[TrackedLayer], sink: GradSink, outputs: list[torch.Tensor] | None = None):
    """While active, each tracked forward sends its ``(x, g)`` to ``sink(index, x, g)`` during backward.

    Args:
        layers (list[TrackedLayer]): The tracked layers.
        sink (GradSink): Called from the backward pass with the layer index, its input and output gradient.
        outputs (list[Tensor] | None): If given, each tracked call's output is appended to it (so a caller
            can ``torch.autograd.grad`` with respect to them). Default: None.
    """

    def make_hook(index: int):
        def forward_hook(module, inputs, output):
            if not (torch.is_grad_enabled() and output.requires_grad):
                return
            x = inputs[0].detach()
            output.register_hook(lambda g: sink(index, x, g))
            if outputs is not None:
                outputs.append(output)

        return forward_hook

    handles = [layer.module.register_forward_hook(make_hook(i)) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
