"""Train the demo trajectories: a small transformer grokking (a + b) mod 97 on CPU.

The companion early-warning work (docs/method.md §13) uses this setting: 2 layers, d = 128, 4 heads
(~290k parameters), AdamW lr 1e-3, weight decay 1.0, β₂ 0.98, batch 512. The model first
memorises the training pairs (train accuracy → 1) and only much later generalises (validation
accuracy → 1): a real trajectory with a delayed transition, small enough to train several seeds in
a few minutes on two cores. Checkpoints and validation metrics are written by
:class:`~sed_dask.sources.recorder.TrajectoryRecorder` in the layout the ingester reads.

Changes from the companion setting, each measured on a 2-core CPU:

* train fraction 0.35 and lr 2e-3: memorisation by step ~300 with val acc still ~0.02, grokking
  (val acc ≥ 0.9) at steps ~1100–1400 for seeds 0–2, inside a 2000-step budget (lr 1e-3 with
  fraction 0.5 grokked at ~1000–1300 but val acc was already 0.3–0.5 when train acc hit 1);
* gradient clipping at 1.0 (as the TinyStories runs, docs/method.md §1.1): without it LayerNorm +
  AdamW at wd 1.0 threw loss spikes ("slingshots") that reset train accuracy to ~0.15;
* the last block computes queries/MLP for the final position only (the only one the loss
  reads): the same function as the full block, ~20% fewer flops (~33 ms per step, 1 thread);
* evaluation (on every pair of both splits) only at checkpoint steps; one torch thread per
  process and seeds in parallel processes: small matmuls do not scale across threads, and
  under contention from other jobs two threads ran 5–10× slower.

``DemoConfig.task`` picks the label of the pair (a, b) (:data:`TASKS`, all mod p): ``"add"`` (the
default, the demo), ``"sub"``, ``"mul"``, ``"x2y2"`` (a² + b²); same pairs and split for every
task. Measured with the default configuration otherwise: ``mul`` memorises by step 240–260 and
groks at 1120–1320 for seeds 0–2 (checkpoints every 20 steps; val acc creeps up from ~0.1 at
step 500, a less abrupt transition than ``add``, 1080–1420 in the same setting); ``sub`` had val
acc 0.23 at step 2000 (seed 0), i.e. it needs a longer budget. ``benchmarks/early_warning.py``
uses add and mul.

No dask import here: this runs wherever torch runs.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from sed_dask.sources.recorder import METRICS_FILE, TrajectoryRecorder, atomic_write

__all__ = ["DemoConfig", "SIZES", "TASKS", "ModAddTransformer", "train_run", "train_demo_runs", "grok_step"]

GROK_ACC = 0.9  # grokking step = first evaluation with val_acc >= 0.9 (2602.16746, docs/method.md §13)
MEMORIZE_ACC = 0.95  # memorisation step = first evaluation with train_acc >= 0.95
SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class DemoConfig:
    """Everything that defines a demo run except the seed."""

    p: int = 97
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 256
    train_frac: float = 0.35
    lr: float = 2e-3
    weight_decay: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.98
    batch_size: int = 512
    grad_clip: float | None = 1.0
    steps: int = 2000
    every: int = 40
    seeds: tuple[int, ...] = (0, 1, 2)
    task: str = "add"  # the label of the pair (a, b): see TASKS


# the label y(a, b) of each task, all mod p (torch ``%`` is floor-mod: (a - b) % p is in [0, p))
TASKS = {
    "add": lambda a, b, p: (a + b) % p,
    "sub": lambda a, b, p: (a - b) % p,
    "mul": lambda a, b, p: (a * b) % p,
    "x2y2": lambda a, b, p: (a * a + b * b) % p,
}


SIZES: dict[str, DemoConfig] = {
    "default": DemoConfig(),
    # one seed, shorter horizon: a 2x faster lr (and weight-decay clock lr·wd) brings grokking of
    # seed 0 forward to step ~600 (memorised by ~250)
    "quick": DemoConfig(lr=4e-3, steps=700, every=20, seeds=(0,)),
}


# ---------------------------------------------------------------------------------------- model
class Attention(nn.Module):
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, last_only: bool) -> torch.Tensor:
        B, T, D = x.shape
        h, dh = self.n_heads, D // self.n_heads
        w, b = self.qkv.weight, self.qkv.bias
        if last_only:  # the final query attends to every key, so no mask is needed
            q = F.linear(x[:, -1:], w[:D], b[:D])
            k, v = F.linear(x, w[D:], b[D:]).split(D, -1)
        else:
            q, k, v = F.linear(x, w, b).split(D, -1)
        Tq = q.shape[1]
        q = q.view(B, Tq, h, dh).transpose(1, 2)
        k = k.view(B, T, h, dh).transpose(1, 2)
        v = v.view(B, T, h, dh).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(dh))
        if not last_only:  # causal; built on the fly so that no mask buffer enters the state dict
            att = att.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, Tq, D)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, d: int, d_ff: int):
        super().__init__()
        self.fc = nn.Linear(d, d_ff)
        self.proj = nn.Linear(d_ff, d)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, d: int, n_heads: int, d_ff: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attention(d, n_heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = MLP(d, d_ff)

    def forward(self, x, last_only: bool = False):
        y = self.attn(self.ln1(x), last_only)
        x = (x[:, -1:] if last_only else x) + y
        return x + self.mlp(self.ln2(x))


class ModAddTransformer(nn.Module):
    """Pre-LN transformer on the sequence ``a b =``; predicts (a + b) mod p from the last position.

    Parameter names (``tok_emb``, ``blocks.N.attn``, ``blocks.N.mlp``, ``ln_f``, ``head``) follow the
    GPT naming that :func:`sed_dask.sources.layers.default_group` recognises.
    """

    def __init__(self, cfg: DemoConfig):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg.p + 1, cfg.d_model)  # token p is "="
        self.pos_emb = nn.Embedding(3, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_heads, cfg.d_ff) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.p)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(tokens) + self.pos_emb.weight[: tokens.shape[1]]
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x, last_only=(i == last))
        return self.head(self.ln_f(x[:, -1]))


# ----------------------------------------------------------------------------------------- data
def modadd_split(cfg: DemoConfig, seed: int):
    """All p² pairs ``a b =`` with labels ``TASKS[cfg.task]`` ((a + b) mod p by default), split
    train/val by a seeded permutation (the same split for every task)."""
    p = cfg.p
    task = getattr(cfg, "task", "add")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    x = torch.stack([a.flatten(), b.flatten(), torch.full((p * p,), p)], dim=1)
    y = TASKS[task](a.flatten(), b.flatten(), p)
    perm = torch.randperm(p * p, generator=torch.Generator().manual_seed(10_000 + seed))
    n_train = int(round(cfg.train_frac * p * p))
    tr, va = perm[:n_train], perm[n_train:]
    return (x[tr], y[tr]), (x[va], y[va])


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, chunk: int = 4096) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over the whole split (every pair, not a sample)."""
    model.eval()
    loss = correct = 0.0
    for i in range(0, len(x), chunk):
        logits = model(x[i : i + chunk])
        loss += F.cross_entropy(logits, y[i : i + chunk], reduction="sum").item()
        correct += (logits.argmax(-1) == y[i : i + chunk]).sum().item()
    model.train()
    return loss / len(x), correct / len(x)


def grok_step(records, *, key: str = "val_acc", threshold: float = GROK_ACC) -> int | None:
    """First recorded step whose ``key`` reaches ``threshold`` (None if it never does)."""
    for rec in sorted(records, key=lambda r: r["step"]):
        v = rec.get(key)
        if v is not None and v >= threshold:
            return int(rec["step"])
    return None


# -------------------------------------------------------------------------------------- training
def _config_dict(cfg: DemoConfig) -> dict:
    # "task" only when it is not the default "add": summaries (and the demo's store fingerprint)
    # written before tasks existed still match the default run
    return {
        k: (list(v) if isinstance(v, tuple) else v)
        for k, v in asdict(cfg).items()
        if k != "seeds" and not (k == "task" and v == "add")
    }


def _previous(run_dir: Path, seed: int, cfg: DemoConfig, fmt: str) -> dict | None:
    """The summary of a finished run with the same seed/config/format (so re-runs are free)."""
    try:
        with open(run_dir / SUMMARY_FILE) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return None
    same = old.get("seed") == seed and old.get("config") == _config_dict(cfg) and old.get("format") == fmt
    return old if same else None


def _clear(run_dir: Path) -> None:
    """Remove what an earlier, different demo run left (mixing cadences would corrupt the trajectory)."""
    for pattern in ("ckpt_*.pt", "model_*.safetensors", METRICS_FILE, SUMMARY_FILE):
        for p in run_dir.glob(pattern):
            p.unlink()


def train_run(
    run_dir,
    *,
    seed: int,
    config: DemoConfig = SIZES["default"],
    fmt: str = "pt",
    progress: bool = True,
    threads: int | None = 1,
    position: int = 0,
    reuse: bool = True,
) -> dict:
    """Train one seed, checkpointing every ``config.every`` steps; returns (and writes) its summary.

    With ``reuse`` a finished run of the same seed, config and format in ``run_dir`` is returned
    as it is; any other demo files there are removed first. ``threads``: torch threads while
    training (restored afterwards).
    """
    cfg = config
    run_dir = Path(run_dir)
    if reuse and (old := _previous(run_dir, seed, cfg, fmt)) is not None:
        return old
    run_dir.mkdir(parents=True, exist_ok=True)
    _clear(run_dir)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        return _train(run_dir, seed, cfg, fmt, progress, position)
    finally:
        torch.set_num_threads(old_threads)


def _train(run_dir: Path, seed: int, cfg: DemoConfig, fmt: str, progress: bool, position: int) -> dict:
    torch.manual_seed(seed)
    model = ModAddTransformer(cfg)
    (xtr, ytr), (xva, yva) = modadd_split(cfg, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2))
    gen = torch.Generator().manual_seed(20_000 + seed)
    rec = TrajectoryRecorder(run_dir, every=cfg.every, fmt=fmt)

    bar = None
    if progress and sys.stderr.isatty():  # in a log: no bar (no carriage returns), one line at the end
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc=f"seed {seed}", position=position, leave=True, mininterval=0.5)

    def checkpoint(step, train_loss):
        vl, va = evaluate(model, xva, yva)
        tl, ta = evaluate(model, xtr, ytr)
        rec.save(
            step,
            model,
            val_loss=vl,
            val_acc=va,
            train_loss=tl,
            train_acc=ta,
            batch_loss=train_loss,
            lr=opt.param_groups[0]["lr"],
        )
        if bar is not None:
            bar.set_postfix(train_acc=f"{ta:.2f}", val_acc=f"{va:.2f}", refresh=False)

    t_train = cpu_train = 0.0
    t0 = time.perf_counter()
    checkpoint(0, float("nan"))
    model.train()
    for step in range(1, cfg.steps + 1):
        ts, cs = time.perf_counter(), time.process_time()
        idx = torch.randint(len(xtr), (cfg.batch_size,), generator=gen)
        loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        t_train += time.perf_counter() - ts
        cpu_train += time.process_time() - cs
        if rec.should_save(step):
            checkpoint(step, loss.item())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t0
    if progress and bar is None:
        acc = (rec.records or [{}])[-1].get("val_acc", float("nan"))
        print(
            f"seed {seed}: trained {cfg.steps} steps in {wall:.0f} s (val_acc {acc:.2f}) -> {run_dir}",
            file=sys.stderr,
            flush=True,
        )

    records = rec.records
    summary = {
        "seed": int(seed),
        "run_dir": str(run_dir),
        "grok_step": grok_step(records),
        "grok_threshold": GROK_ACC,
        "memorize_step": grok_step(records, key="train_acc", threshold=MEMORIZE_ACC),
        "final_val_acc": records[-1]["val_acc"],
        "final_train_acc": records[-1]["train_acc"],
        "final_val_loss": records[-1]["val_loss"],
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_checkpoints": len(records),
        "ms_per_step": 1e3 * t_train / cfg.steps,  # wall time of the optimiser steps only
        "cpu_ms_per_step": 1e3 * cpu_train / cfg.steps,  # robust to other jobs on the machine
        "wall_seconds": wall,
        "torch_threads": torch.get_num_threads(),
        "format": fmt,
        "config": _config_dict(cfg),
    }
    _write_json(run_dir / SUMMARY_FILE, summary)
    return summary


def _write_json(path: Path, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)

    atomic_write(Path(path), write)


def _worker(kwargs: dict) -> dict:
    return train_run(**kwargs)


def train_demo_runs(
    out_dir,
    *,
    seeds=None,
    steps: int | None = None,
    every: int | None = None,
    quick: bool = False,
    progress: bool = True,
    workers: int | None = None,
    fmt: str = "pt",
    config: DemoConfig | None = None,
    reuse: bool = True,
) -> dict[int, Path]:
    """Train the demo seeds into ``out_dir/seed{S}/`` and return ``{seed: run_dir}``.

    ``quick`` picks the test size (one seed, 700 steps, ~30 s); ``seeds``/``steps``/``every``
    override the size's defaults; ``config`` replaces the size entirely. ``workers`` processes
    train seeds in parallel (default: all seeds, at most two per core), one torch thread each;
    ``workers=1`` trains in this process, also with one thread. ``out_dir/summary.json`` collects
    the per-seed summaries (grokking step, memorisation step, speed); with ``reuse`` finished
    runs of the same configuration are not trained again.
    """
    cfg = config if config is not None else SIZES["quick" if quick else "default"]
    overrides = {k: v for k, v in (("steps", steps), ("every", every)) if v is not None}
    if seeds is not None:
        overrides["seeds"] = tuple(int(s) for s in seeds)
    cfg = replace(cfg, **overrides)
    if cfg.steps < cfg.every:
        raise ValueError(f"steps ({cfg.steps}) must be at least one checkpoint interval (every={cfg.every})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_cpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # default: every seed at once up to 2 per core (3 seeds on 2 cores finish in one round, not two)
    workers = max(1, min(int(workers or 2 * n_cpu), len(cfg.seeds)))
    jobs = [
        dict(
            run_dir=out_dir / f"seed{s}",
            seed=s,
            config=cfg,
            fmt=fmt,
            progress=progress,
            threads=1,
            position=i,
            reuse=reuse,
        )
        for i, s in enumerate(cfg.seeds)
    ]

    t0 = time.perf_counter()
    done = {}
    if reuse:  # answer finished runs here, so that a re-run spawns no worker just to read a file
        for job in jobs:
            if (old := _previous(job["run_dir"], job["seed"], cfg, fmt)) is not None:
                done[job["seed"]] = old
    jobs = [j for j in jobs if j["seed"] not in done]
    workers = max(1, min(workers, len(jobs)))
    if workers == 1:
        summaries = [train_run(**job) for job in jobs]
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: forking a process that already runs torch threads can deadlock
        ctx = mp.get_context("spawn")
        init, initargs = None, ()
        if progress:  # one write lock shared by the workers' bars (must come from the spawn context)
            from tqdm.auto import tqdm

            init, initargs = tqdm.set_lock, (ctx.RLock(),)
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=init, initargs=initargs) as pool:
            summaries = list(pool.map(_worker, jobs))
    summaries = sorted(summaries + list(done.values()), key=lambda x: list(cfg.seeds).index(x["seed"]))
    _write_json(
        out_dir / SUMMARY_FILE,
        {
            "wall_seconds": time.perf_counter() - t0,
            "workers": workers,
            "runs": {f"seed{s['seed']}": s for s in summaries},
        },
    )
    return {s["seed"]: out_dir / f"seed{s['seed']}" for s in summaries}


def main(argv=None) -> None:
    """``python -m sed_dask.demo.train OUT [--quick] [--seeds 0 1 2] [--steps N] [--every K]``."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--every", type=int)
    ap.add_argument("--workers", type=int)
    ap.add_argument("--fmt", choices=("pt", "safetensors"), default="pt")
    a = ap.parse_args(argv)
    runs = train_demo_runs(
        a.out_dir, seeds=a.seeds, steps=a.steps, every=a.every, quick=a.quick, workers=a.workers, fmt=a.fmt
    )
    with open(Path(a.out_dir) / SUMMARY_FILE) as f:
        summary = json.load(f)
    for name, s in summary["runs"].items():
        print(
            f"{name}: memorised@{s['memorize_step']} grokked@{s['grok_step']} "
            f"final val_acc {s['final_val_acc']:.3f}  {s['ms_per_step']:.1f} ms/step"
        )
    print(f"{len(runs)} runs in {summary['wall_seconds']:.0f} s -> {a.out_dir}")


if __name__ == "__main__":
    main()
