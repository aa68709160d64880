"""A tiny GPT and real training trajectories written in every checkpoint format (test helper).

``TinyGPT`` has what makes parameter selection tricky in real models: a registered causal-mask
buffer ``blocks.N.attn.bias`` of shape (1, 1, T, T), a *trainable* qkv bias
``blocks.N.attn.c_attn.bias`` (the reference's substring rule drops it), LayerNorms, and
``lm_head.weight`` tied to ``tok_emb.weight``. ``make_trajectory`` trains it for a few AdamW/SGD
steps on random tokens between checkpoints (well under a second), and the ``write_*`` helpers
save that trajectory as ``.pt`` (fp32/bf16, ``_orig_mod.`` prefix, legacy format), single
safetensors, or Hugging Face sharded directories.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, block_size: int):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=True)  # trainable qkv bias: ...attn.c_attn.bias
        self.c_proj = nn.Linear(n_embd, n_embd)
        # the nanoGPT causal-mask buffer: ...attn.bias, (1, 1, T, T), 0/1 lower-triangular
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        h = self.n_head
        q, k, v = (t.view(B, T, h, C // h).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C // h)
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf")).softmax(-1)
        return self.c_proj((att @ v).transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, n_embd: int):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, block_size: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, block_size)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """GPT with token + position embeddings, ``n_layer`` blocks and a head tied to the token embedding."""

    def __init__(self, vocab_size: int = 64, block_size: int = 16, n_embd: int = 32, n_head: int = 2, n_layer: int = 2):
        super().__init__()
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, block_size) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied

    def forward(self, idx):
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1]))
        for b in self.blocks:
            x = b(x)
        return self.lm_head(self.ln_f(x))


@dataclasses.dataclass
class Trajectory:
    model: TinyGPT
    steps: list[int]
    state_dicts: list[dict]  # deep copies (tied tensors still share storage)

    def trainable_names(self) -> list[str]:
        """Unique trainable parameter names (tied head counted once), in natural order."""
        from sed_dask.sources.selection import natural_key

        return sorted((n for n, _ in self.model.named_parameters()), key=natural_key)

    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def _sgd(params, lr, momentum=0.9):
    """Plain momentum SGD (torch.optim would import torch._dynamo: ~2.5 s per process)."""
    buf = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step():
        for p, b in zip(params, buf):
            b.mul_(momentum).add_(p.grad)
            p.add_(b, alpha=-lr)

    return step


def _adamw(params, lr, betas=(0.9, 0.95), eps=1e-8, wd=0.1):
    """Decoupled-weight-decay Adam, as torch.optim.AdamW computes it."""
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    t = [0]

    @torch.no_grad()
    def step():
        t[0] += 1
        b1, b2 = betas
        for p, mi, vi in zip(params, m, v):
            mi.mul_(b1).add_(p.grad, alpha=1 - b1)
            vi.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            p.mul_(1 - lr * wd)
            denom = (vi / (1 - b2 ** t[0])).sqrt_().add_(eps)
            p.addcdiv_(mi, denom, value=-lr / (1 - b1 ** t[0]))

    return step


def make_trajectory(
    n_ckpts: int = 5,
    *,
    every: int = 100,
    first: int = 0,
    seed: int = 0,
    train_steps: int = 2,
    optimizer: str = "adamw",
    lr: float = 1e-2,
    **model_kw,
) -> Trajectory:
    """Checkpoints of a real (short) training run: ``train_steps`` optimizer steps between checkpoints."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TinyGPT(**model_kw)
    step_fn = _adamw(list(model.parameters()), lr) if optimizer == "adamw" else _sgd(list(model.parameters()), lr)
    vocab = model.tok_emb.num_embeddings
    steps, sds = [], []
    for i in range(n_ckpts):
        if i:
            for _ in range(train_steps):
                idx = torch.randint(0, vocab, (4, model.block_size + 1), generator=g)
                loss = F.cross_entropy(model(idx[:, :-1]).reshape(-1, vocab), idx[:, 1:].reshape(-1))
                model.zero_grad(set_to_none=True)
                loss.backward()
                step_fn()
        steps.append(first + i * every)
        sds.append(copy.deepcopy(model.state_dict()))
    return Trajectory(model, steps, sds)


def cast_state_dict(sd: dict, dtype) -> dict:
    """Float tensors cast to ``dtype``, keeping tied tensors shared (as ``model.to(dtype)`` would)."""
    out, seen = {}, {}
    for k, v in sd.items():
        if not v.is_floating_point():
            out[k] = v
            continue
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()))
        if key not in seen:
            seen[key] = v.to(dtype)
        out[k] = seen[key]
    return out


def _prep(sd, dtype, prefix):
    sd = cast_state_dict(sd, dtype) if dtype is not None else sd
    return {prefix + k: v for k, v in sd.items()}


def write_pt(
    traj: Trajectory,
    directory,
    *,
    dtype=None,
    prefix: str = "",
    legacy: bool = False,
    template: str = "ckpt_{step:06d}.pt",
    wrap: str | None = "model_state_dict",
) -> dict[int, str]:
    """``torch.save({"step": s, wrap: state_dict})`` per checkpoint (``wrap=None``: state dict at top level)."""
    os.makedirs(directory, exist_ok=True)
    out = {}
    for s, sd in zip(traj.steps, traj.state_dicts):
        sd = _prep(sd, dtype, prefix)
        obj = {"step": s, wrap: sd} if wrap else {**sd, "step": s}
        p = os.path.join(directory, template.format(step=s))
        torch.save(obj, p, _use_new_zipfile_serialization=not legacy)
        out[s] = p
    return out


def write_orig_mod(traj: Trajectory, directory, **kw) -> dict[int, str]:
    """``.pt`` files of a ``torch.compile``d model: every key prefixed with ``_orig_mod.``."""
    return write_pt(traj, directory, prefix="_orig_mod.", **kw)


def _hf_state_dict(sd, dtype):
    """What ``save_pretrained`` stores: tied ``lm_head.weight`` omitted, every tensor contiguous and unshared."""
    sd = cast_state_dict(sd, dtype) if dtype is not None else sd
    return {k: v.detach().clone().contiguous() for k, v in sd.items() if k != "lm_head.weight"}


def write_safetensors(
    traj: Trajectory, directory, *, dtype=None, template: str = "model_{step}.safetensors"
) -> dict[int, str]:
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    out = {}
    for s, sd in zip(traj.steps, traj.state_dicts):
        p = os.path.join(directory, template.format(step=s))
        save_file(_hf_state_dict(sd, dtype), p, metadata={"step": str(s)})
        out[s] = p
    return out


def write_hf_sharded(
    traj: Trajectory,
    directory,
    *,
    n_shards: int = 2,
    dtype=None,
    bin: bool = False,
    template: str = "checkpoint-{step}",
) -> dict[int, str]:
    """HF sharded checkpoint directories: ``model-0000k-of-0000N.safetensors`` (or ``pytorch_model-…bin``) + index."""
    from safetensors.torch import save_file

    out = {}
    for s, sd in zip(traj.steps, traj.state_dicts):
        d = os.path.join(directory, template.format(step=s))
        os.makedirs(d, exist_ok=True)
        sd = _hf_state_dict(sd, dtype)
        names = list(sd)
        per = -(-len(names) // n_shards)
        weight_map, total = {}, 0
        for k in range(n_shards):
            part = {n: sd[n] for n in names[k * per : (k + 1) * per]}
            if bin:
                fn = f"pytorch_model-{k + 1:05d}-of-{n_shards:05d}.bin"
                torch.save(part, os.path.join(d, fn))
            else:
                fn = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
                save_file(part, os.path.join(d, fn), metadata={"format": "pt"})
            for n, v in part.items():
                weight_map[n] = fn
                total += v.numel() * v.element_size()
        index = "pytorch_model.bin.index.json" if bin else "model.safetensors.index.json"
        with open(os.path.join(d, index), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
        out[s] = d
    return out


def flatten(sd: dict, names, *, prefix: str = "") -> np.ndarray:
    """The expected flat float32 vector: tensors ``names`` of ``sd`` upcast and raveled in C order."""
    return np.concatenate([sd[prefix + n].detach().float().reshape(-1).numpy() for n in names])


def write_metrics_json(traj: Trajectory, path, *, shape: str = "records") -> dict[int, float]:
    """A pilot_metrics.json-like file; returns {step: val_loss}."""
    rng = np.random.default_rng(0)
    vals = {s: float(4.0 - 0.1 * i + 0.01 * rng.standard_normal()) for i, s in enumerate(traj.steps)}
    if shape == "records":
        obj = [
            {"step": s, "train_loss": v + 0.1, "val_loss": v, "lr": 1e-3, "phase": "warmup"} for s, v in vals.items()
        ]
    elif shape == "by_step":
        obj = {str(s): {"val_loss": v} for s, v in vals.items()}
    else:
        obj = {"step": list(vals), "val_loss": list(vals.values())}
    with open(path, "w") as f:
        json.dump(obj, f)
    return vals
