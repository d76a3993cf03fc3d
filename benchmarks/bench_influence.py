"""Benchmark the influence engine: online-mode overhead on a training step, and bf16 vs fp32 fidelity.

1. **Overhead** (goal <= 10% on CPU, <= 3% on GPU). A byte-level ``TinyGPT`` trains on mixed batches from
   three domains with AdamW. ``plain`` is the ordinary step (forward, backward, optimizer step);
   ``online k=..`` is the same step inside ``GroupInfluence.observe`` tracking every Linear layer. Steps
   alternate between the providers inside one loop, so a busy machine slows both alike; the overhead of each
   repeat is ``observed / plain - 1`` against the plain step right before it. Prints median and p20/p80 step
   times, ``ratio = provider / plain`` (medians) and the median and p20/p80 of the per-repeat overhead.
2. **Fidelity** (goal >= 0.96, the Kronfluence bar). ``GroupInfluence.compute`` once in fp32 and once with
   the model under bf16 autocast (bf16 activations and gradients reach the kernels), same projections;
   Pearson correlation of the two S, over domain-level S (distinct domains) and over fine-grained S (groups of
   two rows from one domain, the hard case). ``--curve`` also prints the projection curve (correlation with
   the unprojected S as k grows) from ``tikmix_loader.influence.reference.projection_curve``, the helper the
   tests use. With ``--preconditioner adam`` it also compares the engine's rank-1 factored Adam S (k=None)
   with the exact element-wise one from ``reference.exact_influence``.

Usage::

    .venv/bin/python benchmarks/bench_influence.py [--presets tiny small] [--ks 32 64] [--repeats 15]
        [--batch-size 8] [--preconditioner kfac] [--device cpu] [--threads N] [--skip-overhead]
        [--skip-fidelity] [--curve]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from tikmix_loader.influence import GroupInfluence
from tikmix_loader.influence.reference import correlation, exact_influence, projection_curve
from tikmix_loader.losses import loss_mask, mark_labels, per_token_loss
from tikmix_loader.models import GPTConfig, TinyGPT

DOMAINS = ("web", "code", "math")
GOAL_OVERHEAD = {"cpu": 0.10, "cuda": 0.03}
GOAL_FIDELITY = 0.96


def domain_tokens(domain: int, rows: int, length: int, *, seed: int) -> torch.Tensor:
    """``rows`` sequences from domain ``domain``'s own random bigram model over 48 byte values."""
    table_gen = torch.Generator().manual_seed(10_000 + domain)
    symbols = torch.randperm(256, generator=table_gen)[:48]
    transitions = torch.softmax(3.0 * torch.randn(48, 48, generator=table_gen), dim=1)
    gen = torch.Generator().manual_seed(seed)
    state = torch.randint(0, 48, (rows,), generator=gen)
    out = torch.empty(rows, length, dtype=torch.long)
    for t in range(length):
        out[:, t] = symbols[state]
        state = torch.multinomial(transitions[state], 1, generator=gen).squeeze(1)
    return out


def make_batch(rows_per_domain: list[int], seq_len: int, *, seed: int, device) -> dict:
    """A loader-style batch (``input_ids``, shifted ``labels``, ``label_shift``, ``domain``), all domains."""
    parts, domains = [], []
    for d, rows in enumerate(rows_per_domain):
        if rows:
            parts.append(domain_tokens(d, rows, seq_len + 1, seed=seed * 31 + d))
            domains.append(torch.full((rows,), d, dtype=torch.long))
    tokens = torch.cat(parts)
    batch = {
        "input_ids": tokens[:, :-1].to(device),
        "labels": tokens[:, 1:].to(device),
        "domain": torch.cat(domains).to(device),
    }
    return mark_labels(batch, "shifted")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train_step(model, optimizer, batch, gi=None) -> None:
    def step():
        loss = per_token_loss(model, batch)
        (loss.sum() / loss_mask(batch).sum()).backward()

    if gi is None:
        step()
    else:
        with gi.observe(batch):
            step()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bench_overhead(preset: str, ks: list[int], args, device: torch.device) -> list[str]:
    """Rows of the overhead table for one model preset."""
    config = GPTConfig.preset(preset)
    model = TinyGPT(config, seed=0).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    split = [args.batch_size // 3 + (1 if i < args.batch_size % 3 else 0) for i in range(3)]
    batches = [make_batch(split, config.seq_len, seed=i, device=device) for i in range(4)]
    engines = {
        f"online k={k}": GroupInfluence(
            model,
            k=k,
            preconditioner=args.preconditioner,
            domains=DOMAINS,
            half_life=100,
            backend=args.backend,
            optimizer=optimizer,  # read by "adam" at every step, ignored by the others
        )
        for k in ks
    }
    providers = {"plain": None, **engines}
    times = {name: [] for name in providers}
    for repeat in range(args.warmup + args.repeats):
        for name, gi in providers.items():
            batch = batches[repeat % len(batches)]
            _sync(device)
            start = time.perf_counter()
            _train_step(model, optimizer, batch, gi)
            _sync(device)
            if repeat >= args.warmup:
                times[name].append(time.perf_counter() - start)
    plain = np.array(times["plain"])
    tokens = args.batch_size * config.seq_len
    params = sum(p.numel() for p in model.parameters())
    rows = []
    for name, values in times.items():
        values = np.array(values)
        p20, median, p80 = np.percentile(values * 1e3, [20, 50, 80])
        overhead = values / plain - 1.0
        o20, omed, o80 = np.percentile(overhead * 100, [20, 50, 80])
        goal = "" if name == "plain" else f"{GOAL_OVERHEAD.get(device.type, 0.1) * 100:.0f}%"
        rows.append(
            f"{preset:>6} {params / 1e6:6.2f}M {tokens:>6} {name:>12} {median:9.1f} {p20:8.1f} {p80:8.1f} "
            f"{np.median(values) / np.median(plain):6.3f} "
            + ("" if name == "plain" else f"{omed:8.1f}% [{o20:5.1f}, {o80:5.1f}] {goal:>5}")
        )
    return rows


def _fidelity_groups(seq_len: int, fine: bool) -> tuple[dict, dict]:
    """Domain-level groups (one per domain) or fine ones (12 x 2 rows of ``web``); one target per domain."""
    only = lambda d: [4 if j == d else 0 for j in range(3)]
    if fine:
        domains = {f"g{i}": [make_batch([2, 0, 0], seq_len, seed=500 + i, device="cpu")] for i in range(12)}
    else:
        domains = {
            name: [make_batch(only(d), seq_len, seed=100 + d, device="cpu")] for d, name in enumerate(DOMAINS)
        }
    targets = {
        f"{name}_val": [make_batch(only(d), seq_len, seed=200 + d, device="cpu")]
        for d, name in enumerate(DOMAINS)
    }
    return domains, targets


def _on(device, groups):
    return {name: [{k: v.to(device) for k, v in b.items()} for b in group] for name, group in groups.items()}


def bench_fidelity(args, device: torch.device) -> None:
    """Print bf16-vs-fp32 correlations (and optionally the projection curve) on the tiny preset."""
    config = GPTConfig.preset("tiny", seq_len=64)
    model = TinyGPT(config, seed=0).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(args.train_steps):  # a briefly trained model has structured gradients
        _train_step(model, optimizer, make_batch([3, 3, 2], config.seq_len, seed=1000 + step, device=device))

    def bf16_loss(model, batch):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return per_token_loss(model, batch)

    print(f"\n# fidelity: tiny preset (seq_len 64), trained {args.train_steps} steps, {args.preconditioner}")
    print(f"{'groups':>8} {'k':>4} {'corr bf16 vs fp32':>18} {'max rel diff':>13} {'goal':>5}")
    for fine in (False, True):
        domains, targets = (_on(device, g) for g in _fidelity_groups(config.seq_len, fine))
        for k in args.ks:
            gi = GroupInfluence(
                model, k=k, preconditioner=args.preconditioner, backend=args.backend, optimizer=optimizer
            )
            fp32 = gi.compute(domains, targets).values
            bf16 = gi.compute(domains, targets, loss_fn=bf16_loss).values
            value = correlation(bf16, fp32, per_target=fine)
            error = np.abs(bf16 - fp32).max() / np.abs(fp32).max()
            kind = "fine" if fine else "domain"
            print(f"{kind:>8} {k:>4} {value:18.6f} {error:13.2e} {GOAL_FIDELITY:5.2f}")
    if args.preconditioner == "adam":
        _adam_factoring(model, optimizer, device, config.seq_len)
    if args.curve:
        print("\n# projection curve: correlation with unprojected S (mean over projection seeds 0, 1)")
        for fine in (False, True):
            domains, targets = (_on(device, g) for g in _fidelity_groups(config.seq_len, fine))
            for name in ("identity", args.preconditioner):
                curve = projection_curve(
                    model,
                    domains,
                    targets,
                    ks=(4, 8, 16, 32, 64),
                    preconditioner=name,
                    per_target=fine,
                    optimizer=optimizer,
                )
                points = "  ".join(f"k={k}: {np.mean(v):.3f}" for k, v in curve.items())
                print(f"{'fine' if fine else 'domain':>8} {name:>8}  {points}")


def _adam_factoring(model, optimizer, device, seq_len: int) -> None:
    """Print how far the engine's rank-1 factored Adam S (unprojected) is from the exact element-wise one."""
    print(
        "\n# adam: rank-1 factored D (engine, k=None) vs the exact element-wise D (reference), every Linear"
    )
    print(f"{'groups':>8} {'corr factored vs exact':>23} {'max rel diff':>13} {'corr exact vs identity':>23}")
    for fine in (False, True):
        domains, targets = (_on(device, g) for g in _fidelity_groups(seq_len, fine))
        gi = GroupInfluence(model, k=None, preconditioner="adam", optimizer=optimizer)
        factored = gi.compute(domains, targets).values
        options = {"layers": gi.layer_names, "optimizer": optimizer}
        exact = exact_influence(model, domains, targets, preconditioner="adam", **options)
        plain = exact_influence(model, domains, targets, preconditioner="identity", **options)
        error = np.abs(factored - exact).max() / np.abs(exact).max()
        print(
            f"{'fine' if fine else 'domain':>8} {correlation(factored, exact, per_target=fine):23.4f} "
            f"{error:13.2e} {correlation(exact, plain, per_target=fine):23.4f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"], help="TinyGPT presets (overhead)")
    parser.add_argument("--ks", nargs="+", type=int, default=[32, 64], help="projection widths")
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per provider")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per provider first")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per training batch")
    parser.add_argument("--preconditioner", default="kfac", help="identity, kfac, ekfac or adam")
    parser.add_argument("--backend", default="auto", help="kernel backend")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (1 is steadier on a shared machine)"
    )
    parser.add_argument("--train-steps", type=int, default=60, help="training steps before the fidelity runs")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-fidelity", action="store_true")
    parser.add_argument("--curve", action="store_true", help="also print the projection curve")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
        f"{torch.get_num_threads()} torch threads, load {os.getloadavg()[0]:.2f}; torch {torch.__version__}; "
        f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    )
    if not args.skip_overhead:
        print(f"# overhead: every Linear tracked, {args.preconditioner}, half_life 100, AdamW step included")
        print(
            f"{'preset':>6} {'params':>7} {'tokens':>6} {'provider':>12} {'median ms':>9} {'p20 ms':>8} "
            f"{'p80 ms':>8} {'ratio':>6} {'overhead [p20, p80]':>25} {'goal':>5}"
        )
        for preset in args.presets:
            for row in bench_overhead(preset, args.ks, args, device):
                print(row, flush=True)
    if not args.skip_fidelity:
        bench_fidelity(args, device)


if __name__ == "__main__":
    main()
