"""``sed-dask demo --live``: train the grokking transformer and watch it at once.

Training runs in a child process (``sed_dask.demo.train.train_run``, checkpoints by
``TrajectoryRecorder``'s atomic renames); this process runs ``sed_dask.watch`` on its folder, so the
terminal shows the edge after every checkpoint and each alert as it is raised. At the end the grok
step (first val_acc >= 0.9) is read from the run's metrics and every alert's lead over it printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run_live_demo(
    out_dir="sed-demo-live",
    *,
    quick: bool = True,
    windows=None,
    seed: int = 0,
    echo=print,
    scheduler: str | None = "threads",
) -> dict:
    """Train one seed in a child process while watching it; returns the alerts, grok step and leads."""
    from sed_dask.demo.train import SIZES, grok_step
    from sed_dask.live.watch import watch

    cfg = SIZES["quick" if quick else "default"]
    windows = list(windows or ((5, 10) if quick else (10, 20)))
    out = Path(out_dir)
    run_dir = out / f"seed{seed}"
    results = out / "live.zarr"
    for p in (results, out / "live-trajectory.zarr"):
        if p.exists():
            raise FileExistsError(f"{p} exists from an earlier live demo; remove {out} or give another -o DIR")
    out.mkdir(parents=True, exist_ok=True)
    code = (
        "import sys; from sed_dask.demo.train import SIZES, train_run; "
        f"train_run(sys.argv[1], seed={int(seed)}, config=SIZES[{'quick' if quick else 'default'!r}], "
        "progress=False, reuse=False)"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], env={**os.environ})
    last = cfg.steps - cfg.steps % cfg.every
    echo(
        f"training seed {seed} ({cfg.steps} steps, a checkpoint every {cfg.every}) in process {child.pid}; "
        f"watching {run_dir} (W={','.join(map(str, windows))})"
    )
    finished = False
    try:
        summary = watch(
            run_dir,
            results=results,
            windows=windows,
            run=f"seed{seed}",
            until=last,
            idle_timeout=300,
            poll=0.2,
            echo=echo,
            scheduler=scheduler,
        )
        finished = True
    finally:
        if not finished and child.poll() is None:  # an error or Ctrl-C in the watch: stop training too
            child.terminate()
        child.wait()
    with open(run_dir / "metrics.json") as f:
        g = grok_step(json.load(f))
    leads = []
    for a in summary.alerts:
        lead = None if g is None else g - a["step"]
        leads.append({**a, "lead": lead})
    echo(f"grokking (val_acc >= 0.9) at step {g}" if g is not None else "the run did not grok")
    for a in leads:
        echo(f"  W={a['window']} {a['detector']} alert at step {a['step']}: lead {a['lead']} steps over grokking")
    return {"alerts": leads, "grok_step": g, "results": str(results), "stopped": summary.stopped}
