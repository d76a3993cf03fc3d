"""Running sums behind Group Influence: per-group projected gradients, loss tokens and curvature statistics.

One ``Statistics`` holds, for ``n_groups`` groups (domains or targets) and every tracked layer, sums that are
linear in the data, so they add across batches, decay as an EMA and all-reduce across ranks with one rule:

- ``phi[l]`` [n_groups, k_out, k_in]: summed projected gradients of the summed per-token loss;
- ``tokens`` [n_groups]: loss tokens (the divisor that turns ``phi`` into the gradient of the mean loss);
- ``a[l]``, ``b[l]``: summed ``x~ x~^T`` and ``g~ g~^T``, with per-layer token and example counts;
- ``lam[l]`` [k_out, k_in]: summed ``(Q_B^T phi_e Q_A)^2`` over examples, with its example count (EK-FAC).

All sums are views into one flat buffer, so zeroing, decaying, merging and all-reducing them costs one or a
few tensor operations, whatever the number of layers (the online hooks run on every training step). The
sums a gradient hook fills during one batch or step live in a float32 ``Statistics``; ``merge_`` folds them
into a float64 one, applying the step's gradient multiplier (``phi`` scales by it, ``b`` and ``lam`` by its
square) and the EMA decay.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tikmix_loader.errors import StateError

# Field order in the flat buffer: the fields scaled by the multiplier, then by its square, then unscaled.
_LINEAR, _SQUARE = ("phi",), ("b", "lam")
STATE_KEYS = ("phi", "b", "lam", "a", "tokens", "factor_tokens", "factor_examples", "lam_examples")


def distributed_world() -> int:
    """The torch.distributed world size, or 1 when no process group is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class Statistics:
    """Linear sums over observed tokens for ``n_groups`` groups and every tracked layer.

    Args:
        shapes (list[tuple[int, int]]): per layer ``(k_in, k_out)``.
        n_groups (int): Number of groups.
        device (torch.device): Where the sums live.
        factors (bool): Keep K-FAC factor sums.
        lam (bool): Keep EK-FAC eigenvalue sums.
        dtype (torch.dtype): float64 for lasting sums, float32 for one batch's or step's. Default: float64.
    """

    def __init__(self, shapes, n_groups: int, *, device, factors: bool, lam: bool, dtype=torch.float64):
        self.shapes = list(shapes)
        self.n_groups = n_groups
        self.has_factors = factors
        self.has_lam = lam
        n_layers = len(self.shapes)
        sizes = {
            "phi": [(n_groups, k_out, k_in) for k_in, k_out in self.shapes],
            "b": [(k_out, k_out) for _, k_out in self.shapes] if factors else [],
            "lam": [(k_out, k_in) for k_in, k_out in self.shapes] if lam else [],
            "a": [(k_in, k_in) for k_in, _ in self.shapes] if factors else [],
            "tokens": [(n_groups,)],
            "factor_tokens": [(n_layers,)],
            "factor_examples": [(n_layers,)],
            "lam_examples": [(n_layers,)],
        }
        total = sum(torch.Size(shape).numel() for group in sizes.values() for shape in group)
        self.flat = torch.zeros(total, dtype=dtype, device=device)
        self._regions: dict[str, tuple[int, int]] = {}
        offset = 0
        for key in STATE_KEYS:
            views = []
            start = offset
            for shape in sizes[key]:
                size = torch.Size(shape).numel()
                views.append(self.flat[offset : offset + size].view(shape))
                offset += size
            self._regions[key] = (start, offset)
            setattr(self, key, views if key in ("phi", "b", "lam", "a") else views[0])

    def _span(self, keys: tuple[str, ...]) -> slice:
        return slice(self._regions[keys[0]][0], self._regions[keys[-1]][1])

    def like(self, *, dtype=None) -> Statistics:
        """Zeroed statistics of the same shapes (and ``dtype``, default this one's)."""
        return Statistics(
            self.shapes,
            self.n_groups,
            device=self.flat.device,
            factors=self.has_factors,
            lam=self.has_lam,
            dtype=dtype or self.flat.dtype,
        )

    def zero_(self) -> Statistics:
        """Reset every sum to zero."""
        self.flat.zero_()
        return self

    def zero_lam_(self) -> Statistics:
        """Reset the EK-FAC eigenvalue sums (after their eigenbasis changed)."""
        self.flat[self._span(("lam",))].zero_()
        self.lam_examples.zero_()
        return self

    def clone(self) -> Statistics:
        """An independent copy."""
        copy = self.like()
        copy.flat.copy_(self.flat)
        return copy

    def merge_(self, step: Statistics, *, decay: float = 1.0, multiplier: float = 1.0) -> Statistics:
        """``self = decay * self + step``, scaling step's ``phi`` by ``multiplier`` and ``b``, ``lam`` by m^2.

        ``step`` holds sums of the backpropagated ``g``; the multiplier turns them into the summed loss's g.
        """
        if decay != 1.0:
            self.flat.mul_(decay)
        linear, square = self._span(_LINEAR), self._span(_SQUARE)
        rest = slice(square.stop, None)
        self.flat[linear].add_(step.flat[linear], alpha=multiplier)
        self.flat[square].add_(step.flat[square], alpha=multiplier * multiplier)
        self.flat[rest].add_(step.flat[rest])
        return self

    def all_reduce_(self) -> Statistics:
        """Sum every statistic over the torch.distributed ranks in place (one collective; no-op alone)."""
        if distributed_world() > 1:
            dist.all_reduce(self.flat, op=dist.ReduceOp.SUM)
        return self

    def factors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(A, B)``: ``A = sum x~x~^T / tokens`` and ``B = sum g~g~^T / examples``."""
        counts_a = self.factor_tokens.clamp(min=1).tolist()
        counts_b = self.factor_examples.clamp(min=1).tolist()
        return [(a / n_a, b / n_b) for a, b, n_a, n_b in zip(self.a, self.b, counts_a, counts_b, strict=True)]

    def lambdas(self) -> list[torch.Tensor]:
        """Per layer ``Lambda = sum (Q_B^T phi_e Q_A)^2 / examples``."""
        return [lam / n for lam, n in zip(self.lam, self.lam_examples.clamp(min=1).tolist(), strict=True)]

    def state_dict(self) -> dict:
        """The sums as ``{key: tensor or list of tensors}`` (CPU copies; save with ``torch.save``)."""
        out = {}
        for key in STATE_KEYS:
            value = getattr(self, key)
            out[key] = (
                [t.detach().cpu().clone() for t in value] if isinstance(value, list) else value.cpu().clone()
            )
        return out

    def load_state_dict(self, state: dict, *, what: str) -> None:
        """Copy sums saved by ``state_dict`` into these (shapes must match).

        Raises:
            StateError: a key is missing or a shape differs; the message names it.
        """
        for key in STATE_KEYS:
            if key not in state:
                raise StateError(
                    f"{what}: the saved statistics lack `{key}`; they were not made by this version"
                )
            mine = getattr(self, key)
            mine = mine if isinstance(mine, list) else [mine]
            saved = state[key] if isinstance(state[key], list) else [state[key]]
            if len(saved) != len(mine) or any(s.shape != t.shape for s, t in zip(saved, mine, strict=False)):
                raise StateError(
                    f"{what}: saved `{key}` has shapes {[tuple(s.shape) for s in saved]} but this engine "
                    f"expects {[tuple(t.shape) for t in mine]}; the layers, k or domains differ"
                )
            for tensor, value in zip(mine, saved, strict=True):
                tensor.copy_(value)
