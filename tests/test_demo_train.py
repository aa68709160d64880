"""Demo training: a real quick grokking run, its checkpoints and metrics, and the model shortcut."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from sed_dask.demo.train import SIZES, ModAddTransformer, evaluate, modadd_split, train_demo_runs


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    t0 = time.perf_counter()
    runs = train_demo_runs(out, quick=True, progress=False, workers=1)
    return out, runs, time.perf_counter() - t0


def test_quick_run_layout_and_checkpoints(quick_run):
    from sed_dask.sources.discover import discover_checkpoints

    out, runs, _ = quick_run
    cfg = SIZES["quick"]
    assert list(runs) == list(cfg.seeds) == [0]
    run = runs[0]
    assert run == out / "seed0"
    steps = list(range(0, cfg.steps + 1, cfg.every))
    found = discover_checkpoints([str(run)])  # the ingester's own discovery
    assert sorted(found) == steps
    names = list(ModAddTransformer(cfg).state_dict())
    assert any(n.startswith("blocks.1.attn.") for n in names) and "head.weight" in names
    prev = None
    for s in (0, cfg.every, cfg.steps):
        obj = torch.load(run / f"ckpt_{s:06d}.pt", map_location="cpu", weights_only=True)
        assert obj["step"] == s
        sd = obj["model_state_dict"]
        assert list(sd) == names
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in sd.values())
        if prev is not None:  # the weights move between checkpoints
            assert any(not torch.equal(sd[k], prev[k]) for k in names)
        prev = sd


def test_quick_run_metrics_show_grokking(quick_run):
    out, runs, seconds = quick_run
    cfg = SIZES["quick"]
    recs = json.loads((runs[0] / "metrics.json").read_text())
    assert [r["step"] for r in recs] == list(range(0, cfg.steps + 1, cfg.every))
    for r in recs:
        assert r["val_loss"] > 0 and 0.0 <= r["val_acc"] <= 1.0 and 0.0 <= r["train_acc"] <= 1.0
    first, _last = recs[0], recs[-1]
    assert first["val_acc"] < 0.05 and first["val_loss"] > 4.0  # chance level: 1/97, ln 97 = 4.57
    mem = next(r["step"] for r in recs if r["train_acc"] >= 0.95)
    grok = next(r["step"] for r in recs if r["val_acc"] >= 0.9)
    at_mem = next(r for r in recs if r["step"] == mem)
    assert at_mem["val_acc"] < 0.2  # memorised, not generalised
    assert grok - mem >= 200  # ... and generalised much later
    after = [r for r in recs if r["step"] >= grok]
    # generalisation holds after grokking (up to brief "slingshot" loss spikes at this high lr)
    assert max(r["val_acc"] for r in after[-5:]) >= 0.95 and min(r["val_loss"] for r in after) < 0.5
    summary = json.loads((out / "summary.json").read_text())["runs"]["seed0"]
    assert summary["grok_step"] == grok and summary["memorize_step"] == mem
    assert summary["n_checkpoints"] == len(recs) and summary["cpu_ms_per_step"] > 0
    assert seconds < 240, f"quick demo took {seconds:.0f} s"


def test_checkpoint_reproduces_recorded_metrics(quick_run):
    """The file at step s is the model that produced the metrics logged for s."""
    _, runs, _ = quick_run
    cfg = SIZES["quick"]
    rec = {r["step"]: r for r in json.loads((runs[0] / "metrics.json").read_text())}
    model = ModAddTransformer(cfg)
    _, (xva, yva) = modadd_split(cfg, 0)
    for s in (cfg.steps // 2 // cfg.every * cfg.every, cfg.steps):
        sd = torch.load(runs[0] / f"ckpt_{s:06d}.pt", weights_only=True)["model_state_dict"]
        model.load_state_dict(sd, strict=True)
        vl, va = evaluate(model, xva, yva)
        assert va == pytest.approx(rec[s]["val_acc"], abs=1e-9)
        assert vl == pytest.approx(rec[s]["val_loss"], rel=1e-5)


def test_finished_runs_are_reused(quick_run):
    out, _, _ = quick_run
    before = (out / "seed0" / "ckpt_000000.pt").stat().st_mtime_ns
    t0 = time.perf_counter()
    runs = train_demo_runs(out, quick=True, progress=False, workers=1)
    assert time.perf_counter() - t0 < 5
    assert (runs[0] / "ckpt_000000.pt").stat().st_mtime_ns == before


def test_last_position_shortcut_equals_full_forward():
    torch.manual_seed(3)
    model = ModAddTransformer(SIZES["default"]).eval()
    x = torch.randint(0, 97, (64, 3))
    x[:, 2] = 97
    with torch.no_grad():
        h = model.tok_emb(x) + model.pos_emb.weight
        for b in model.blocks:
            h = b(h)  # every position through every block
        full = model.head(model.ln_f(h[:, -1]))
        torch.testing.assert_close(model(x), full, rtol=1e-5, atol=1e-5)
    # gradients agree too (the shortcut changes no parameter's role)
    model.train()
    y = torch.randint(0, 97, (64,))
    g1 = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    h = model.tok_emb(x) + model.pos_emb.weight
    for b in model.blocks:
        h = b(h)
    g2 = torch.autograd.grad(F.cross_entropy(model.head(model.ln_f(h[:, -1])), y), list(model.parameters()))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_parallel_workers_and_safetensors(tmp_path):
    """The default multi-process path (spawned workers), on a tiny config, in safetensors."""
    from safetensors import safe_open

    cfg = replace(SIZES["quick"], d_model=32, d_ff=64, steps=20, every=10, batch_size=64)
    runs = train_demo_runs(tmp_path, seeds=(1, 2), config=cfg, workers=2, progress=False, fmt="safetensors")
    assert sorted(runs) == [1, 2]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["workers"] == 2 and set(summary["runs"]) == {"seed1", "seed2"}
    weights = []
    for s in (1, 2):
        files = sorted(p.name for p in runs[s].glob("model_*.safetensors"))
        assert files == ["model_000000.safetensors", "model_000010.safetensors", "model_000020.safetensors"]
        with safe_open(str(runs[s] / "model_000020.safetensors"), framework="pt") as f:
            assert f.metadata()["step"] == "20"
            weights.append(f.get_tensor("head.weight"))
        assert summary["runs"][f"seed{s}"]["torch_threads"] == 1
    assert not torch.equal(weights[0], weights[1])  # different seeds, different runs


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="checkpoint interval"):
        train_demo_runs(tmp_path, steps=10, every=20, progress=False)


def test_task_labels():
    """Each task's labels match a direct computation; the split and the default ("add") are unchanged."""
    p = 7
    cfg = replace(SIZES["default"], p=p)
    assert cfg.task == "add"
    expected = {
        "add": lambda a, b: (a + b) % p,
        "sub": lambda a, b: (a - b) % p,
        "mul": lambda a, b: (a * b) % p,
        "x2y2": lambda a, b: (a * a + b * b) % p,
    }
    (x0, _), (v0, _) = modadd_split(cfg, 3)
    for task, f in expected.items():
        (xtr, ytr), (xva, yva) = modadd_split(replace(cfg, task=task), 3)
        assert torch.equal(xtr, x0) and torch.equal(xva, v0)  # same pairs, same split
        for x, y in ((xtr, ytr), (xva, yva)):
            assert (x[:, 2] == p).all()
            assert y.tolist() == [f(int(a), int(b)) for a, b in x[:, :2].tolist()]
            assert 0 <= int(y.min()) and int(y.max()) < p
    # the default config's summary/fingerprint keeps its pre-task form; other tasks are recorded
    from sed_dask.demo.train import _config_dict

    assert "task" not in _config_dict(SIZES["default"])
    assert _config_dict(replace(SIZES["default"], task="sub"))["task"] == "sub"
    with pytest.raises(ValueError, match="unknown task"):
        modadd_split(replace(cfg, task="div"), 0)
