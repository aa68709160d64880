"""Record a training trajectory for sed_dask from a plain PyTorch loop.

    python examples/record_from_training.py OUT_DIR [--steps 300] [--every 10] [--fmt pt|safetensors]

Two lines change in an existing loop: create a ``TrajectoryRecorder`` and, on the steps where
``should_save`` is true, evaluate and call ``save`` (``maybe_save(step, model, **metrics)`` does
both in one call when the metrics are cheap). Step 0 (the initial weights) is saved too. The folder
then holds ``ckpt_000000.pt``, ``ckpt_000010.pt``, … and ``metrics.json``, ready for

    sed-dask ingest OUT_DIR ...        (or sed_dask.ingest in Python)

SED needs full-precision weights at a uniform cadence (the spectra compare consecutive deltas),
so keep ``every`` fixed for the whole run and do not quantise what you save.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from sed_dask.sources.recorder import TrajectoryRecorder


def make_data(n: int, *, seed: int = 0):
    """A small regression task: y = sin(Wx / 4) with a fixed random W, plus noise."""
    w = torch.randn(16, 4, generator=torch.Generator().manual_seed(1234))  # the same task for every split
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = torch.sin(x @ w / 4) + 0.05 * torch.randn(n, 4, generator=g)
    return x, y


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--fmt", choices=("pt", "safetensors"), default="pt")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    xtr, ytr = make_data(2048, seed=0)
    xva, yva = make_data(512, seed=1)

    recorder = TrajectoryRecorder(args.out_dir, every=args.every, fmt=args.fmt)  # (1)
    train_loss = float("nan")
    for step in range(args.steps + 1):
        if recorder.should_save(step):  # evaluate only on the checkpoint cadence
            with torch.no_grad():
                val_loss = F.mse_loss(model(xva), yva).item()
            recorder.save(step, model, val_loss=val_loss, train_loss=train_loss)  # (2)
        if step == args.steps:
            break
        idx = torch.randint(len(xtr), (128,))
        loss = F.mse_loss(model(xtr[idx]), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        train_loss = loss.item()

    recs = recorder.records
    print(
        f"{len(recorder.saved_steps())} checkpoints in {args.out_dir} "
        f"(steps {recs[0]['step']}…{recs[-1]['step']}); "
        f"val_loss {recs[0]['val_loss']:.4f} -> {recs[-1]['val_loss']:.4f}"
    )


if __name__ == "__main__":
    main()
