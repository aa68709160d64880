"""``sed-dask deploy TARGET``: print or write a deployment file rendered from config."""

from __future__ import annotations

import os
import sys


def register(sub) -> None:
    from sed_dask.cluster.deploy import TARGETS

    p = sub.add_parser(
        "deploy",
        help="render a SLURM job script, SLURMRunner sbatch, jobqueue.yaml, DaskCluster or Helm values",
        description="Render a deployment file from the sed_dask.deploy settings (package defaults < "
        "~/.config/dask < DASK_SED_DASK__DEPLOY__* < --config FILE). Targets: slurm (worker "
        "job script, needs dask-jobqueue), slurm-runner (one sbatch job via SLURMRunner), "
        "jobqueue (jobqueue.yaml), k8s (DaskCluster for the dask operator), helm (dask/dask "
        "chart values).",
    )
    p.add_argument("target", choices=TARGETS, help="what to render: " + ", ".join(TARGETS))
    p.add_argument("--config", metavar="FILE", help="YAML with a 'deploy:' section (top-level 'sed_dask:' optional)")
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    p.set_defaults(func=run)


def run(args) -> int:
    from sed_dask.cluster.deploy import render
    from sed_dask.config import load_config_file

    cfg = load_config_file(args.config) if args.config else None
    text = render(args.target, cfg)
    if not args.output or args.output == "-":
        sys.stdout.write(text)
        return 0
    tmp = f"{args.output}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    if args.target == "slurm-runner" or args.target == "slurm":
        os.chmod(tmp, 0o755)
    os.replace(tmp, args.output)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0
