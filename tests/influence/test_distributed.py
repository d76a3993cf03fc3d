"""Two gloo ranks, each with half of the data, give the same influence as one process with all of it."""

from __future__ import annotations

import numpy as np
import torch
from influence_cases import batches, mixed
from testkit.distributed import run_on_ranks

from tikmix_loader.influence import GroupInfluence
from tikmix_loader.models import TinyGPT, per_token_loss

DOMAINS = ("alpha", "digits", "random")


def _data():
    groups = [batches(kind, 2, seed=300 + d, domain=d) for d, kind in enumerate(DOMAINS)]
    targets = {"alpha_val": batches("alpha", 2, seed=311), "digits_val": batches("digits", 2, seed=312)}
    return groups, targets


def _run(groups, targets, online_batches):
    """Observation-mode S (kfac, ekfac), then online S and state over ``online_batches`` (one step each),
    then observation-mode adam S after one AdamW step on a batch every rank shares (equal optimizer state)."""
    model = TinyGPT.from_preset("micro", seed=0)
    out = {}
    for kind in ("kfac", "ekfac"):
        gi = GroupInfluence(model, k=8, preconditioner=kind)
        out[kind] = gi.compute(dict(zip(DOMAINS, groups, strict=True)), targets).values
    gi = GroupInfluence(model, k=8, preconditioner="kfac", domains=DOMAINS, half_life=3)
    for batch in online_batches:
        with gi.observe(batch):
            (per_token_loss(model, batch).sum() / (batch["labels"] != -100).sum()).backward()
    out["online"] = gi.influence(targets).values
    out["state"] = gi.state_dict()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.zero_grad()  # the online steps' gradients differ between ranks
    shared = batches("alpha", 1, seed=400)[0]
    (per_token_loss(model, shared).sum() / (shared["labels"] != -100).sum()).backward()
    optimizer.step()
    gi = GroupInfluence(model, k=8, preconditioner="adam", optimizer=optimizer)
    out["adam"] = gi.compute(dict(zip(DOMAINS, groups, strict=True)), targets).values
    return out


def _worker(rank: int, world: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    groups, targets = _data()
    mine = [[group[rank]] for group in groups]
    my_targets = {name: [b[rank]] for name, b in targets.items()}
    result = _run(mine, my_targets, [mixed(groups, rank)])
    torch.save(result, f"{out_dir}/rank{rank}.pt")


def test_two_ranks_equal_one_rank_on_the_union(tmp_path):
    run_on_ranks(_worker, 2, tmp_path, str(tmp_path))
    groups, targets = _data()
    union_step = {key: torch.cat([mixed(groups, 0)[key], mixed(groups, 1)[key]]) for key in mixed(groups, 0)}
    single = _run(groups, targets, [union_step])
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for key in ("kfac", "ekfac", "online", "adam"):
        for result in ranks:
            np.testing.assert_allclose(result[key], single[key], rtol=1e-5, err_msg=key)
    for saved in (ranks[0]["state"], ranks[1]["state"]):
        for mine, theirs in zip(
            saved["statistics"]["phi"], single["state"]["statistics"]["phi"], strict=True
        ):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-9)
    # The union state resumes in a single process with the same decisions.
    model = TinyGPT.from_preset("micro", seed=0)
    restored = GroupInfluence(model, k=8, preconditioner="kfac", domains=DOMAINS, half_life=3)
    restored.load_state_dict(ranks[1]["state"])
    np.testing.assert_allclose(restored.influence(targets).values, single["online"], rtol=1e-5)
