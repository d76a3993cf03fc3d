"""The independent derivation for kernel tests: per-example autograd gradients, explicit Kronecker projection.

Nothing here calls ``tikmix_kernels``. Per-example weight gradients W_e [d_out, d_in] come from
``torch.func.vmap(torch.func.grad(...))`` over examples, in float64. They are projected with an explicit
``torch.kron(p_out, p_in)`` acting on the row-major vec of W_e (vec(P_out^T W P_in) = kron(P_out, P_in)^T
vec(W)) and summed per segment. The layer inputs x and output gradients g fed to the kernels are captured
separately, with module hooks on one batched backward pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

# Kernel output vs an fp64 reference computed from the same (already rounded) inputs: only fp32 accumulation
# and fp32 rounding of X~, G~ separate them. (rtol, atol as a fraction of max |reference|).
ACCUMULATION_TOLERANCE = {
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (2e-4, 2e-5),
    torch.float16: (2e-4, 2e-5),
}
# Kernel output on inputs rounded to dtype vs the fp64 truth of the unrounded inputs: adds input rounding
# (unit roundoff 2^-8 for bf16, 2^-11 for fp16) to the above.
INPUT_ROUNDING_TOLERANCE = {
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (5e-2, 2e-2),
    torch.float16: (1e-2, 3e-3),
}


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float, what: str
) -> None:
    """``|actual - expected| <= atol * max|expected| + rtol * |expected|``; names the worst misses."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    bound = atol * scale + rtol * expected.abs()
    excess = (actual - expected).abs() - bound
    if excess.numel() and excess.max().item() > 0:
        worst = torch.topk(excess.flatten(), min(5, excess.numel())).indices
        rows = [
            f"  at {tuple(torch.unravel_index(i, expected.shape))}: got {actual.flatten()[i]:.6g}, "
            f"expected {expected.flatten()[i]:.6g}"
            for i in worst.tolist()
        ]
        raise AssertionError(
            f"{what}: {int((excess > 0).sum())} of {excess.numel()} elements off (rtol={rtol}, atol={atol} x "
            f"max|expected|={scale:.4g}); worst:\n" + "\n".join(rows)
        )


def kron_project(weight_grads: torch.Tensor, p_out: torch.Tensor, p_in: torch.Tensor) -> torch.Tensor:
    """[E, d_out, d_in] -> [E, k_out, k_in] via the explicit [d_out * d_in, k_out * k_in] Kronecker matrix."""
    kron = torch.kron(p_out.double(), p_in.double())
    flat = weight_grads.double().reshape(weight_grads.shape[0], -1) @ kron
    return flat.reshape(weight_grads.shape[0], p_out.shape[1], p_in.shape[1])


def segment_sum(per_item: torch.Tensor, item_segments: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Sum rows of ``per_item`` by segment id with an explicit loop; -1 rows are dropped."""
    out = torch.zeros(num_segments, *per_item.shape[1:], dtype=per_item.dtype)
    for row, segment in enumerate(item_segments.tolist()):
        if segment >= 0:
            out[segment] += per_item[row]
    return out


def outer_product_grads(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-token weight gradients g_t x_t^T [N, d_out, d_in] in fp64 (the definition of a Linear's W grad)."""
    return torch.einsum("no,ni->noi", g.double(), x.double())


def explicit_phi(x, g, p_in, p_out, segment_ids, num_segments) -> torch.Tensor:
    """fp64 Phi from 2-D x, g: per-token outer products, explicit Kronecker projection, a segment loop."""
    return segment_sum(kron_project(outer_product_grads(x, g), p_out, p_in), segment_ids, num_segments)


def explicit_factors(x, g, p_in, p_out, segment_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 A = sum x~ x~^T and B = sum g~ g~^T over non-ignored tokens, one token at a time."""
    a = torch.zeros(p_in.shape[1], p_in.shape[1], dtype=torch.float64)
    b = torch.zeros(p_out.shape[1], p_out.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        if segment_ids[t] >= 0:
            xt = x[t].double() @ p_in.double()
            gt = g[t].double() @ p_out.double()
            a += torch.outer(xt, xt)
            b += torch.outer(gt, gt)
    return a, b


def explicit_scores(phi: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """score[s, b] = <Phi[s], Q[b]> (Frobenius), the quantity segment_target_scores computes without Phi."""
    return torch.einsum("soi,boi->sb", phi.double(), q.double())


class TinyGPT(nn.Module):
    """A 2-layer causal transformer whose projections are all ``nn.Linear`` (q, k, v, o, fc1, fc2, head)."""

    def __init__(
        self, *, vocab: int = 13, d_model: int = 12, n_heads: int = 2, d_mlp: int = 20, n_layers: int = 2
    ):
        super().__init__()
        self.n_heads = n_heads
        self.embed = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList()
        for layer in range(n_layers):
            block = nn.ModuleDict(
                {
                    "ln1": nn.LayerNorm(d_model),
                    # Alternate bias on and off so both kinds of Linear are derived.
                    "q": nn.Linear(d_model, d_model, bias=layer % 2 == 0),
                    "k": nn.Linear(d_model, d_model, bias=False),
                    "v": nn.Linear(d_model, d_model, bias=True),
                    "o": nn.Linear(d_model, d_model, bias=layer % 2 == 1),
                    "ln2": nn.LayerNorm(d_model),
                    "fc1": nn.Linear(d_model, d_mlp),
                    "fc2": nn.Linear(d_mlp, d_model, bias=False),
                }
            )
            self.blocks.append(block)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def _attention(self, block: nn.ModuleDict, h: torch.Tensor) -> torch.Tensor:
        batch, seq, width = h.shape
        head_dim = width // self.n_heads

        def split(t):
            return t.view(batch, seq, self.n_heads, head_dim).transpose(1, 2)

        q, k, v = split(block["q"](h)), split(block["k"](h)), split(block["v"](h))
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
        causal = torch.ones(seq, seq, dtype=torch.bool, device=h.device).triu(1)
        weights = scores.masked_fill(causal, float("-inf")).softmax(-1)
        return block["o"]((weights @ v).transpose(1, 2).reshape(batch, seq, width))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Summed next-token cross-entropy of each example: [B] from tokens [B, T]."""
        h = self.embed(tokens)
        for block in self.blocks:
            h = h + self._attention(block, block["ln1"](h))
            h = h + block["fc2"](F.gelu(block["fc1"](block["ln2"](h))))
        logits = self.head(h)[:, :-1]
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none"
        )
        return loss.view(tokens.shape[0], -1).sum(1)


def linear_names(model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` in ``model``."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def per_example_weight_grads(model: nn.Module, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each example's gradient of its own loss w.r.t. every Linear weight: name -> [B, d_out, d_in].

    ``torch.func.vmap(grad(...))`` over the batch: each example runs through the model alone.
    """
    params = {name: p.detach() for name, p in model.named_parameters()}

    def example_loss(params, example):
        return functional_call(model, params, (example.unsqueeze(0),)).sum()

    grads = vmap(grad(example_loss), in_dims=(None, 0))(params, tokens)
    return {name: grads[f"{name}.weight"] for name in linear_names(model)}


def linear_inputs_and_output_grads(
    model: nn.Module, tokens: torch.Tensor
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One batched backward of the summed loss; name -> (x [B, T, d_in], g [B, T, d_out]) per Linear."""
    captured: dict[str, list[torch.Tensor]] = {}
    handles = []

    def hook(name):
        def record(module, inputs, output):
            captured[name] = [inputs[0].detach()]
            output.register_hook(lambda grad_out: captured[name].append(grad_out.detach()))

        return record

    for name in linear_names(model):
        handles.append(model.get_submodule(name).register_forward_hook(hook(name)))
    try:
        model.zero_grad()
        model(tokens).sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    return {name: (x, g) for name, (x, g) in captured.items()}


def linear_layer_case(
    *, bias: bool, batch: int = 3, seq: int = 5, d_in: int = 7, d_out: int = 5, seed: int = 0
):
    """A random Linear with a nonlinear per-example loss: (x, g, per-example W [B, d_out, d_in]), fp64."""
    generator = torch.Generator().manual_seed(seed)
    layer = nn.Linear(d_in, d_out, bias=bias).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64))
    x = torch.randn(batch, seq, d_in, generator=generator, dtype=torch.float64)
    targets = torch.randn(batch, seq, d_out, generator=generator, dtype=torch.float64)

    def example_loss(params, xe, ye):
        return (torch.tanh(functional_call(layer, params, (xe,))) - ye).pow(2).sum()

    params = {name: p.detach() for name, p in layer.named_parameters()}
    weight_grads = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, x, targets)["weight"]
    out = layer(x)
    out.retain_grad()
    (torch.tanh(out) - targets).pow(2).sum().backward()
    return x, out.grad.detach(), weight_grads
