"""A Hugging-Face-style sharded safetensors trajectory, written and then analysed.

    python examples/hf_sharded_run.py [OUT_DIR] [--steps 240] [--every 20] [--shards 3]

Writes ``OUT_DIR/checkpoints/checkpoint-{step}/`` directories as ``save_pretrained`` does for a
large model (``model-0000k-of-0000N.safetensors`` + ``model.safetensors.index.json``, HF-style
parameter names), from a small residual MLP trained with AdamW on a toy regression, plus
``metrics.json``. Then ingests them (sed_dask reads the index and the shards; no shard is merged)
and computes spectra, printing k*, the edge peak and the collapse step per W.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F


class Layer(nn.Module):
    def __init__(self, d: int, d_ff: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(d)
        self.mlp = nn.ModuleDict({"up_proj": nn.Linear(d, d_ff), "down_proj": nn.Linear(d_ff, d)})

    def forward(self, x):
        return x + self.mlp["down_proj"](F.gelu(self.mlp["up_proj"](self.input_layernorm(x))))


class TinyModel(nn.Module):
    """Parameter names like a HF decoder: model.embed.weight, model.layers.N.mlp.up_proj.weight, …"""

    def __init__(self, d_in=16, d=64, d_ff=128, n_layers=3, d_out=4):
        super().__init__()
        self.model = nn.ModuleDict(
            {
                "embed": nn.Linear(d_in, d),
                "layers": nn.ModuleList(Layer(d, d_ff) for _ in range(n_layers)),
                "norm": nn.LayerNorm(d),
            }
        )
        self.lm_head = nn.Linear(d, d_out)

    def forward(self, x):
        h = self.model["embed"](x)
        for layer in self.model["layers"]:
            h = layer(h)
        return self.lm_head(self.model["norm"](h))


def save_sharded(model: nn.Module, directory: str, n_shards: int) -> None:
    """What save_pretrained writes: contiguous fp32 shards and the weight-map index."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    names = list(sd)
    per = -(-len(names) // n_shards)
    weight_map, total = {}, 0
    for k in range(n_shards):
        fn = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: sd[n] for n in names[k * per : (k + 1) * per]}
        save_file(part, os.path.join(directory, fn), metadata={"format": "pt"})
        for n, v in part.items():
            weight_map[n] = fn
            total += v.numel() * v.element_size()
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)


def train(ckpt_dir: str, *, steps: int, every: int, n_shards: int) -> str:
    torch.manual_seed(0)
    w = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    x, xv = torch.randn(4096, 16), torch.randn(1024, 16)
    y, yv = torch.tanh(x @ w), torch.tanh(xv @ w)
    model = TinyModel()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
    records = []
    for step in range(steps + 1):
        if step % every == 0:
            with torch.no_grad():
                records.append({"step": step, "val_loss": F.mse_loss(model(xv), yv).item()})
            save_sharded(model, os.path.join(ckpt_dir, f"checkpoint-{step}"), n_shards)
        if step == steps:
            break
        idx = torch.randint(len(x), (256,))
        loss = F.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    path = os.path.join(ckpt_dir, "metrics.json")
    with open(path, "w") as f:
        json.dump(records, f)
    print(
        f"{len(records)} sharded checkpoints ({n_shards} shards each) in {ckpt_dir}; "
        f"val_loss {records[0]['val_loss']:.4f} -> {records[-1]['val_loss']:.4f}"
    )
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", nargs="?", default="hf-sharded-demo")
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--shards", type=int, default=3)
    args = ap.parse_args(argv)

    import sed_dask.analysis as A
    from sed_dask.cluster.client import connect
    from sed_dask.results.spectra import spectrum
    from sed_dask.store.ingest import ingest

    ckpts = os.path.join(args.out_dir, "checkpoints")
    metrics = train(ckpts, steps=args.steps, every=args.every, n_shards=args.shards)
    store, results = os.path.join(args.out_dir, "trajectory.zarr"), os.path.join(args.out_dir, "results.zarr")
    windows = [5, 8]
    with connect(local_kwargs={"n_workers": 2, "threads_per_worker": 1}) as client:
        print("dashboard:", client.dashboard_link)
        print(ingest(ckpts, store, "hf", metrics=metrics, client=client))
        ds = spectrum(store, windows=windows, client=client, output=results)
    rank = A.signal_rank(ds)["k_mode"]
    col = A.collapse_step(ds, tau="auto")
    for W in windows:
        print(
            f"W={W}: k* = {int(rank.sel(run='hf', window=W))}, edge peak "
            f"{float(col['peak_value'].sel(run='hf', window=W)):.2f} at step "
            f"{int(col['peak_step'].sel(run='hf', window=W))}, collapse step "
            f"{float(col['collapse_step'].sel(run='hf', window=W)):.0f}"
        )
    print(f"results: {results}")


if __name__ == "__main__":
    main()
