"""Influence tasks: tracked modules (nn.Linear, HF Conv1D), their parameter share, HF outputs, and
GroupInfluence on a Hugging Face GPT-2 against exact torch.func gradients (unprojected and explicitly
projected)."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from influence_cases import batches, with_masks
from testkit.hf_models import VOCAB, tiny_gpt2, tiny_llama
from transformers.pytorch_utils import Conv1D

from tikmix_loader import ops
from tikmix_loader.errors import TrackingError
from tikmix_loader.influence import CausalLMTask, GroupInfluence, HFCausalLMTask
from tikmix_loader.influence.reference import exact_influence
from tikmix_loader.losses import IGNORE_INDEX, mark_labels

SEQ_LEN = 16
GPT2_LAYERS = [
    f"transformer.h.{i}.{name}"
    for i in range(2)
    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
] + ["lm_head"]


def _groups():
    """Shifted-convention batches (so each row's targets are plainly its ``labels``)."""
    domains = {
        "alpha": [with_masks(b) for b in batches("alpha", 2, seq_len=SEQ_LEN, seed=1)],
        "random": batches("random", 1, seq_len=SEQ_LEN, seed=3, batch_size=3),
    }
    targets = {
        "alpha_val": batches("alpha", 1, seq_len=SEQ_LEN, seed=11),
        "digits_val": batches("digits", 1, seq_len=SEQ_LEN, seed=12),
    }
    return domains, targets


def _exact_gradient(model, names, batches_) -> dict[str, torch.Tensor]:
    """Mean per-token loss gradient of a group (torch.func) per tracked weight, [d_out, d_in] float64."""
    params = {f"{name}.weight": model.get_submodule(name).weight.detach() for name in names}

    def summed_loss(weights, batch):
        logits = torch.func.functional_call(model, weights, (batch["input_ids"],)).logits
        return F.cross_entropy(
            logits.reshape(-1, VOCAB), batch["labels"].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )

    total = {key: torch.zeros_like(value, dtype=torch.float64) for key, value in params.items()}
    tokens = 0
    for batch in batches_:
        for key, grad in torch.func.grad(summed_loss)(params, batch).items():
            total[key] += grad.detach().double()
        tokens += int((batch["labels"] != IGNORE_INDEX).sum())
    linear_layout = lambda name, g: g.T if isinstance(model.get_submodule(name), Conv1D) else g
    return {name: linear_layout(name, total[f"{name}.weight"]) / tokens for name in names}


def _exact_scores(model, names, domains, targets, project=lambda name, g: g) -> np.ndarray:
    """``S[t, d] = sum over layers <project(psi_t), project(phi_d)>`` from exact gradients."""
    phis = [_exact_gradient(model, names, group) for group in domains.values()]
    psis = [_exact_gradient(model, names, group) for group in targets.values()]
    return np.array(
        [
            [sum(float((project(n, psi[n]) * project(n, phi[n])).sum()) for n in names) for phi in phis]
            for psi in psis
        ]
    )


def test_gpt2_conv1d_layers_are_tracked_with_their_widths_and_share(caplog):
    model = tiny_gpt2(seq_len=SEQ_LEN)
    with (
        caplog.at_level(logging.INFO, logger="tikmix_loader.influence.group_influence"),
        pytest.warns(UserWarning, match="tied weights"),
    ):
        gi = GroupInfluence(model, task=HFCausalLMTask(), k=None)
    assert gi.layer_names == GPT2_LAYERS
    widths = {layer.name: (layer.d_in, layer.d_out) for layer in gi.layers}
    assert widths["transformer.h.0.attn.c_attn"] == (32, 96)  # Conv1D weight [32, 96]: d_in 32, d_out 96
    assert widths["transformer.h.0.mlp.c_fc"] == (32, 128)
    assert widths["transformer.h.0.mlp.c_proj"] == (128, 32)
    assert widths["lm_head"] == (32, VOCAB)
    # The tied head shares the token embedding: counted once in both totals.
    params = {id(p): p.numel() for p in model.parameters()}
    tracked = 2 * (32 * 96 + 32 * 32 + 32 * 128 + 128 * 32) + VOCAB * 32
    assert gi.tracked_fraction == pytest.approx(tracked / sum(params.values()))
    assert 0.5 < gi.tracked_fraction < 1
    assert (
        f"tracks 9 layers ({100 * gi.tracked_fraction:.1f}% of GPT2LMHeadModel's parameters)" in caplog.text
    )


def test_llama_linear_layers_are_tracked():
    gi = GroupInfluence(tiny_llama(seq_len=SEQ_LEN), task=HFCausalLMTask(), k=8)
    projections = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    mlp = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    assert gi.layer_names == [f"model.layers.{i}.{n}" for i in range(2) for n in projections + mlp] + [
        "lm_head"
    ]
    widths = {layer.name: (layer.d_in, layer.d_out) for layer in gi.layers}
    assert widths["model.layers.0.self_attn.k_proj"] == (32, 16)  # one KV head of width 16
    domains, targets = _groups()
    S = gi.compute(domains, targets)
    assert S.values.shape == (2, 2) and np.isfinite(S.values).all()


@pytest.mark.parametrize("task", [HFCausalLMTask(), CausalLMTask()], ids=["hf_task", "default_task"])
def test_gpt2_unprojected_influence_equals_exact_torch_func_gradients(task):
    model = tiny_gpt2(seq_len=SEQ_LEN, tie=False).eval()  # untied: every tracked weight is its own parameter
    domains, targets = _groups()
    gi = GroupInfluence(model, task=task, k=None, preconditioner="identity")
    S = gi.compute(domains, targets)  # the default task reads HF outputs' .logits
    expected = _exact_scores(model, gi.layer_names, domains, targets)
    np.testing.assert_allclose(S.values, expected, rtol=2e-4, atol=1e-4 * np.abs(expected).max())
    assert np.abs(expected).max() > 0


def test_gpt2_projected_influence_equals_explicitly_projected_gradients():
    """With projections every side is a [d, k] Gaussian P: ``P_out^T G P_in`` in the Linear layout, where a
    Conv1D weight's gradient is transposed first (its weight is [d_in, d_out])."""
    model = tiny_gpt2(seq_len=SEQ_LEN, tie=False).eval()
    domains, targets = _groups()
    k_in, k_out = 8, 16
    gi = GroupInfluence(model, task=HFCausalLMTask(), k=(k_in, k_out), preconditioner="identity", seed=3)
    widths = {layer.name: (layer.d_in, layer.d_out) for layer in gi.layers}

    def project(name, g):
        d_in, d_out = widths[name]
        side = lambda d, k, end: (
            ops.projection(d, k, seed=3, name=f"{name}.{end}").double() if k < d else None
        )
        p_in, p_out = side(d_in, k_in, "in"), side(d_out, k_out, "out")
        g = g if p_in is None else g @ p_in
        return g if p_out is None else p_out.T @ g

    expected = _exact_scores(model, gi.layer_names, domains, targets, project)
    unprojected = _exact_scores(model, gi.layer_names, domains, targets)
    np.testing.assert_allclose(
        gi.compute(domains, targets).values, expected, rtol=2e-4, atol=1e-4 * np.abs(expected).max()
    )
    assert not np.allclose(expected, unprojected, rtol=0.01)  # the projection really changes S


def test_a_tied_head_is_tracked_through_its_head_use_only_and_says_so():
    """GPT-2's ``lm_head`` shares its weight with ``transformer.wte``. The weight's gradient sums both uses;
    the hooks see only the head's, so the influence equals that of an untied copy's head and a warning names
    the layer."""
    tied = tiny_gpt2(seq_len=SEQ_LEN).eval()
    untied = tiny_gpt2(seq_len=SEQ_LEN, tie=False).eval()
    untied.load_state_dict(tied.state_dict())  # the same values, the head's weight now its own parameter
    assert torch.equal(untied.lm_head.weight, tied.transformer.wte.weight)
    domains, targets = _groups()
    with pytest.warns(UserWarning, match=r"'lm_head' shares its weight with \['transformer.wte'\]") as caught:
        gi = GroupInfluence(
            tied, task=HFCausalLMTask(), k=None, preconditioner="identity", layers=["lm_head"]
        )
    assert len(caught) == 1 and "exclude=['lm_head']" in str(caught[0].message)
    S = gi.compute(domains, targets).values
    head_use = _exact_scores(untied, ["lm_head"], domains, targets)
    both_uses = _exact_scores(tied, ["lm_head"], domains, targets)  # functional_call keeps the tie
    np.testing.assert_allclose(S, head_use, rtol=2e-4, atol=1e-4 * np.abs(head_use).max())
    assert not np.allclose(head_use, both_uses, rtol=0.05)  # the embedding use really changes the gradient
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning without a tracked tied layer
        GroupInfluence(tied, task=HFCausalLMTask(), exclude=["lm_head"])
        GroupInfluence(untied, task=HFCausalLMTask())


def test_gpt2_kfac_influence_matches_the_brute_force_reference():
    model = tiny_gpt2(seq_len=SEQ_LEN, tie=False)
    domains, targets = _groups()
    gi = GroupInfluence(model, task=HFCausalLMTask(), k=None, preconditioner="kfac", exclude=["lm_head"])
    expected = exact_influence(model, domains, targets, layers=gi.layer_names, preconditioner="kfac")
    np.testing.assert_allclose(
        gi.compute(domains, targets).values, expected, rtol=2e-3, atol=1e-3 * np.abs(expected).max()
    )


def test_influence_follows_the_batch_label_convention(micro):
    """An "hf" batch and a "shifted" one with the same targets give the same S; mislabelled, they differ."""
    domains, targets = _groups()

    def as_hf(batch):  # hf labels[t] = the shifted label of position t - 1
        ignored = torch.full_like(batch["labels"][:, :1], IGNORE_INDEX)
        return mark_labels({**batch, "labels": torch.cat([ignored, batch["labels"][:, :-1]], 1)}, "hf")

    def last_masked(batch):  # the hf layout has no target for the last position
        labels = batch["labels"].clone()
        labels[:, -1] = IGNORE_INDEX
        return {**batch, "labels": labels}

    convert = lambda groups, fn: {name: [fn(b) for b in group] for name, group in groups.items()}
    gi = GroupInfluence(micro, k=None, preconditioner="kfac")
    hf = gi.compute(convert(domains, as_hf), convert(targets, as_hf))
    shifted = gi.compute(convert(domains, last_masked), convert(targets, last_masked))
    np.testing.assert_allclose(hf.values, shifted.values, rtol=1e-5)
    assert hf.domain_tokens.tolist() == shifted.domain_tokens.tolist()
    relabel = lambda b: mark_labels(as_hf(b), "shifted")
    wrong = gi.compute(convert(domains, relabel), convert(targets, relabel))
    assert not np.allclose(wrong.values, hf.values, rtol=0.05)


def test_a_model_without_trackable_modules_raises_a_named_error():
    model = torch.nn.Sequential(torch.nn.Embedding(VOCAB, 8), torch.nn.LayerNorm(8))
    with pytest.raises(
        TrackingError, match=r"\(Sequential\) has no trackable module \(nn.Linear or transformers Conv1D\)"
    ):
        GroupInfluence(model, task=HFCausalLMTask())
    assert CausalLMTask().tracked_modules(model) == []
    conv = Conv1D(6, 4)  # nf=6 outputs from nx=4 inputs: weight [4, 6]
    assert [name for name, _ in CausalLMTask().tracked_modules(torch.nn.Sequential(conv))] == ["0"]
