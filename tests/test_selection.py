"""Parameter-selection policies on real checkpoints of tests/models.py."""

from __future__ import annotations

import json

import pytest
import torch
from models import make_trajectory, write_hf_sharded, write_orig_mod, write_pt, write_safetensors
from safetensors.torch import save_file

from sed_dask.errors import CheckpointError
from sed_dask.readers import open_checkpoint
from sed_dask.sources.selection import SelectionPolicy, natural_key, resolve_policy, select


@pytest.fixture(scope="module")
def traj():
    return make_trajectory(2)


@pytest.fixture(scope="module")
def files(traj, tmp_path_factory):
    d = tmp_path_factory.mktemp("sel")
    s = traj.steps[1]
    return {
        "pt": write_pt(traj, d / "pt")[s],
        "pt_bf16": write_pt(traj, d / "bf16", dtype=torch.bfloat16)[s],
        "orig_mod": write_orig_mod(traj, d / "om")[s],
        "st": write_safetensors(traj, d / "st")[s],
        "hf": write_hf_sharded(traj, d / "hf")[s],
        "hf_bin": write_hf_sharded(traj, d / "hfb", bin=True)[s],
    }


def _select(path, policy=None, **kw):
    with open_checkpoint(path) as r:
        return select(r, policy, **kw)


def test_default_policy_keeps_trainable_params_once(traj, files):
    sel = _select(files["pt"])
    names = sel.index.names
    assert names == traj.trainable_names()
    assert sel.index.n_params == traj.n_trainable()
    # GPT-2's trainable qkv bias is kept although its name contains "attn.bias" (docs/method.md §15.3)
    assert "blocks.0.attn.c_attn.bias" in names and "blocks.1.attn.c_attn.bias" in names
    assert "blocks.0.attn.bias" not in names and "lm_head.weight" not in names
    assert sel.dropped["lm_head.weight"] == "tied to tok_emb.weight (shared storage)"
    assert sel.dropped["blocks.0.attn.bias"].startswith("causal-mask buffer (0/1 lower-triangular [1, 1, 16, 16]")
    assert set(sel.dropped) == {"lm_head.weight", "blocks.0.attn.bias", "blocks.1.attn.bias"}
    rec = json.loads(json.dumps(sel.record()))
    assert rec["name"] == "params_dedup_no_buffers" and rec["version"] == 1
    assert rec["dropped"] == sel.dropped
    assert SelectionPolicy.from_spec(rec) == sel.policy and sel.policy.same_as(rec)


def test_same_index_for_every_format(files):
    ref = _select(files["pt"]).index
    for kind in ("orig_mod", "st", "hf", "hf_bin"):
        idx = _select(files[kind]).index
        assert idx.names == ref.names and idx.hash == ref.hash, kind
    bf = _select(files["pt_bf16"]).index
    assert bf.names == ref.names and [e.offset for e in bf] == [e.offset for e in ref]
    assert {e.source_dtype for e in bf} == {"bfloat16"} and bf.hash != ref.hash


def test_full_state_dict_sorted_reproduces_the_reference(traj, files):
    sd = traj.state_dicts[1]
    sel = _select(files["pt"], "full_state_dict_sorted")
    assert sel.index.names == sorted(sd)  # lexicographic, buffers and the tied copy included
    assert sel.index.n_params == sum(v.numel() for v in sd.values())
    assert sel.dropped == {}
    om = _select(files["orig_mod"], "full_state_dict_sorted")
    assert om.index.names == sorted("_orig_mod." + k for k in sd)  # names unchanged


def test_natural_order(tmp_path):
    tr = make_trajectory(1, n_layer=11)
    p = write_pt(tr, tmp_path)[0]
    names = _select(p).index.names
    assert names.index("blocks.2.ln_1.weight") < names.index("blocks.10.ln_1.weight")
    assert names == sorted(names, key=natural_key)
    lex = _select(p, "full_state_dict_sorted").index.names
    assert lex.index("blocks.10.ln_1.weight") < lex.index("blocks.2.ln_1.weight")


def test_include_exclude(files):
    sel = _select(files["pt"], exclude=[r"^(tok|pos)_emb\."])
    assert not any(n.startswith(("tok_emb", "pos_emb", "lm_head")) for n in sel.index.names)
    assert sel.dropped["tok_emb.weight"] == r"excluded by /^(tok|pos)_emb\./"
    assert sel.dropped["lm_head.weight"].startswith("tied to")  # the tied copy does not sneak back in
    only0 = _select(files["pt"], include=r"^blocks\.0\.")
    assert only0.index.names and all(n.startswith("blocks.0.") for n in only0.index.names)
    assert only0.dropped["ln_f.weight"].startswith("not matched by include")
    with pytest.raises(CheckpointError, match="keeps no tensor"):
        _select(files["pt"], include="nothing-matches-this")
    pol = resolve_policy("params_dedup_no_buffers", include=["a"], exclude="b")
    assert pol.spec()["options"]["include"] == ["a"] and pol.spec()["options"]["exclude"] == ["b"]
    with pytest.raises(ValueError, match="unknown selection policy"):
        resolve_policy("nope")
    with pytest.raises(ValueError, match="invalid regex"):
        resolve_policy(exclude="(")


class _BufferZoo(torch.nn.Module):
    def __init__(self, T=8):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.bn = torch.nn.BatchNorm1d(4)  # running_mean/var, num_batches_tracked
        self.register_buffer("inv_freq", torch.rand(2))  # rotary buffer (exact name)
        self.register_buffer("masked_bias", torch.tensor(-1e4))
        self.register_buffer("keep_mask", torch.ones(3, dtype=torch.bool))  # non-float
        self.attn = torch.nn.Module()
        self.attn.bias = torch.nn.Parameter(torch.randn(1, 1, T, T))  # trainable, merely named like a mask
        add = torch.zeros(T, T).masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        self.attn2 = torch.nn.Module()
        self.attn2.register_buffer("mask", add.view(1, 1, T, T))  # additive causal mask
        self.eye = torch.nn.Parameter(torch.eye(T))  # square, first row like a mask
        self.upper = torch.nn.Parameter(torch.ones(T, T).triu())  # 0/1 but not lower-triangular


def test_buffers_are_recognised_by_what_they_are(tmp_path):
    m = _BufferZoo()
    torch.save({"step": 1, "model_state_dict": m.state_dict()}, tmp_path / "ckpt_1.pt")
    sel = _select(tmp_path / "ckpt_1.pt")
    assert sorted(sel.index.names) == sorted(
        ["attn.bias", "bn.bias", "bn.weight", "eye", "lin.bias", "lin.weight", "upper"]
    )
    d = sel.dropped
    assert d["bn.running_mean"] == "buffer (name 'running_mean')"
    assert d["bn.num_batches_tracked"] == "non-float tensor (int64)"
    assert d["keep_mask"] == "non-float tensor (bool)"
    assert d["inv_freq"].startswith("buffer") and d["masked_bias"].startswith("buffer")
    assert d["attn2.mask"].startswith("causal-mask buffer (additive")


def test_tied_alias_by_value(tmp_path, traj):
    sd = dict(traj.state_dicts[1])
    sd["lm_head.weight"] = sd["lm_head.weight"].clone()  # an untied copy, bit-identical
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "tied.safetensors")
    torch.save(sd, tmp_path / "tied.pt")
    for f in ("tied.safetensors", "tied.pt"):
        sel = _select(tmp_path / f)
        assert "lm_head.weight" not in sel.index.names
        assert sel.dropped["lm_head.weight"].startswith("tied to tok_emb.weight (known alias, bit-identical")
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1e-3  # really untied: both stay
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "untied.safetensors")
    sel = _select(tmp_path / "untied.safetensors")
    assert {"lm_head.weight", "tok_emb.weight"} <= set(sel.index.names)


def test_prefixes(tmp_path):
    w = torch.randn(3)
    torch.save({"module._orig_mod.a.weight": w}, tmp_path / "ddp.pt")
    assert _select(tmp_path / "ddp.pt").index.names == ["a.weight"]
    torch.save({"a.weight": w, "_orig_mod.a.weight": w.clone()}, tmp_path / "clash.pt")
    with pytest.raises(CheckpointError, match="both become 'a.weight'"):
        _select(tmp_path / "clash.pt")


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_a_tie_that_breaks_in_a_later_checkpoint_is_refused(tmp_path, fmt):
    """Ties are judged on the first checkpoint; a later file that unties them would silently lose the head."""
    from safetensors.torch import save_file as st_save

    import sed_dask

    traj = make_trajectory(4)
    src = tmp_path / "ckpts"
    src.mkdir()
    for i, (s, sd) in enumerate(zip(traj.steps, traj.state_dicts)):
        sd = dict(sd)
        if fmt == "safetensors":  # an explicit head, equal to the embedding while tied (alias by value)
            sd = {k: v.detach().clone().contiguous() for k, v in sd.items()}
        if i == 2:  # the head untied from step 200 on: its own tensor, trained apart
            sd["lm_head.weight"] = sd["tok_emb.weight"].detach().clone() + 1e-3
        if fmt == "pt":
            torch.save({"model_state_dict": sd}, src / f"ckpt_{s:06d}.pt")
        else:
            st_save(sd, str(src / f"model_{s}.safetensors"))
    bad = str(src / (f"ckpt_{traj.steps[2]:06d}.pt" if fmt == "pt" else f"model_{traj.steps[2]}.safetensors"))
    store = tmp_path / "t.zarr"
    msg = rf"{bad} \(step 200\): 'lm_head.weight' is no longer tied to 'tok_emb.weight'"
    with pytest.raises(CheckpointError, match=msg):
        sed_dask.ingest(str(src), str(store), run="r", scheduler="sync", progress=False)
    assert not store.exists()  # refused before anything was written
    with pytest.raises(CheckpointError, match=msg):
        sed_dask.open_checkpoints(str(src), run="r")
    # the tied part alone is fine, and the full-state-dict policy keeps both tensors throughout
    ok = sed_dask.open_checkpoints(str(src), run="r", steps=traj.steps[:2])
    assert "lm_head.weight" not in ok.index.names
    full = sed_dask.open_checkpoints(str(src), run="r", policy="full_state_dict_sorted")
    assert {"lm_head.weight", "tok_emb.weight"} <= set(full.index.names)
