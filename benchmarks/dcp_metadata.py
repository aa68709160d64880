"""DCP metadata at FSDP scale: validating and planning 1,000 checkpoints of 500 tensors x 64 chunks.

Writes ``--n-ckpts`` DCP checkpoint folders ``step_NNNNNN/`` shaped like an FSDP save on 64 ranks:
``--tensors`` float32 tensors (GPT-block shapes, none square, so the selection policy's causal-mask and
tie probes read no tensor data) each ``Shard(0)`` in ``--ranks`` chunks, one ``__{rank}_0.distcp``
per rank. The ``.metadata`` of the first is written by torch's own ``FileSystemWriter.finish``
(torch's classes, ``pickle.dump``, 4.4 MB); every other one is that file with its own
``checkpoint_id`` path and a fresh ``save_id`` uuid, which is how consecutive ``dcp.save`` calls of
one model differ (tests/test_dcp_metadata.py checks that on real saves). The data files are sparse
(the right sizes, no data): validation and planning stat them, they read no chunk.

Measured in one run, on the same files, each from an empty per-process cache:

* new  - ``sed_dask.open_checkpoints`` (discovery, every header validated against the first, the
         direct-read plan) with ``sed_dask.readers.dcp-metadata: fast`` on all ``--n-ckpts``;
* old  - the same with ``dcp-metadata: torch`` (torch's weights_only unpickler, the previous code) on
         the first ``--n-old`` checkpoints (the old path needs seconds per file), and new on the same
         subset for the side-by-side ratio;
* worker - a fresh process listing every checkpoint's tensors (what each worker process does on its
         first task), new vs old per checkpoint;
* full parse - the new restricted parse of a file no earlier file matches (cache cleared before each).

Usage: python benchmarks/dcp_metadata.py --n-ckpts 1000 --n-old 3
Prints a markdown table. Data goes to --dir (default bench-data/dcp_metadata, git-ignored; ~4.5 GB
of metadata for 1,000 checkpoints), removed unless --keep.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
import uuid

_WORKER = """
import sys, time
import torch, torch.distributed.checkpoint  # imported before the clock starts, as on a warmed-up worker
from sed_dask.readers import DCPReader
paths = sys.argv[1:]
t = time.perf_counter()
n = sum(len(DCPReader(p).tensors()) for p in paths)
print(time.perf_counter() - t, n)
"""


def shapes(n: int, d: int = 1024) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    i = 0
    while len(out) < n:
        p = f"layers.{i}."
        for nm, sh in (
            ("attn.qkv.weight", (3 * d, d)),
            ("attn.qkv.bias", (3 * d,)),
            ("attn.out.weight", (d, 2 * d)),
            ("mlp.fc1.weight", (4 * d, d)),
            ("mlp.fc1.bias", (4 * d,)),
            ("mlp.fc2.weight", (d, 4 * d)),
            ("norm1.weight", (d,)),
            ("norm2.weight", (d,)),
        ):
            out[p + nm] = sh
        i += 1
    return dict(list(out.items())[:n])


def write_first(path: str, n_tensors: int, ranks: int) -> list[int]:
    """One FSDP-shaped checkpoint, its .metadata written by torch's FileSystemWriter; the data file sizes."""
    import torch
    from torch.distributed.checkpoint.filesystem import FileSystemWriter, _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )
    from torch.distributed.checkpoint.storage import WriteResult

    os.makedirs(path, exist_ok=True)
    sdm, planner, results, pos = {}, {}, [[] for _ in range(ranks)], [0] * ranks
    for name, shape in shapes(n_tensors).items():
        fqn = "model." + name
        rows = -(-shape[0] // ranks)
        chunks = []
        for r in range(ranks):
            a, b = min(shape[0], r * rows), min(shape[0], (r + 1) * rows)
            off, sz = torch.Size([a] + [0] * (len(shape) - 1)), torch.Size([b - a, *shape[1:]])
            chunks.append(ChunkStorageMetadata(off, sz))
            n = (b - a) * (shape[1] if len(shape) > 1 else 1) * 4 + 1100  # a torch.save archive of the chunk
            results[r].append(
                WriteResult(
                    index=MetadataIndex(fqn, off),
                    size_in_bytes=n,
                    storage_data=_StorageInfo(f"__{r}_0.distcp", pos[r], n),
                )
            )
            pos[r] += n
        sdm[fqn] = TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size(shape), chunks)
        planner[fqn] = ("model", name)
    sdm["step"] = BytesStorageMetadata()
    planner["step"] = ("step",)
    FileSystemWriter(path).finish(Metadata(state_dict_metadata=sdm, planner_data=planner), results)
    return pos


def generate(root: str, n_ckpts: int, n_tensors: int, ranks: int) -> list[str]:
    paths = [os.path.join(root, f"step_{s:06d}") for s in range(n_ckpts)]
    sizes = write_first(paths[0], n_tensors, ranks)
    with open(os.path.join(paths[0], ".metadata"), "rb") as f:
        first = f.read()
    uid = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
    name0 = os.path.basename(paths[0]).encode()
    assert first.count(name0) == 1 and len(uid.findall(first)) == 1
    for p in paths:
        os.makedirs(p, exist_ok=True)
        for r, n in enumerate(sizes):
            with open(os.path.join(p, f"__{r}_0.distcp"), "wb") as f:
                f.truncate(n)  # sparse: stat'ed, never read
        if p != paths[0]:
            raw = uid.sub(str(uuid.uuid4()).encode(), first.replace(name0, os.path.basename(p).encode()))
            with open(os.path.join(p, ".metadata"), "wb") as f:
                f.write(raw)
    return paths


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-ckpts", type=int, default=1000)
    ap.add_argument("--n-old", type=int, default=3, help="checkpoints measured with the old (torch) parser")
    ap.add_argument("--tensors", type=int, default=500)
    ap.add_argument("--ranks", type=int, default=64)
    ap.add_argument("--dir", default="bench-data/dcp_metadata")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    import dask

    import sed_dask
    from sed_dask.readers import dcp

    root = os.path.abspath(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    t_gen, paths = timed(lambda: generate(root, args.n_ckpts, args.tensors, args.ranks))
    md_bytes = os.path.getsize(os.path.join(paths[0], ".metadata"))
    print(
        f"generated {len(paths)} checkpoints in {t_gen:.1f} s: {args.tensors} tensors x {args.ranks} chunks, "
        f".metadata {md_bytes / 1e6:.2f} MB each",
        file=sys.stderr,
    )
    load0 = os.getloadavg()[0]
    sub = {s: p for s, p in enumerate(paths[: args.n_old])}
    try:

        def run(src, how):
            dcp.clear_layout_cache()
            with dask.config.set({"sed_dask.readers.dcp-metadata": how}):
                return sed_dask.open_checkpoints(src, run="bench")

        t_old, r_old = timed(lambda: run(sub, "torch"))
        t_new_sub, r_new_sub = timed(lambda: run(sub, "fast"))
        assert r_old.attrs == r_new_sub.attrs and r_old.index.hash == r_new_sub.index.hash
        t_new, r_new = timed(lambda: run(root, "fast"))
        assert r_new.n_rows == len(paths) and r_new.index.hash == r_old.index.hash
        # the last checkpoint, matched against the first, gives the layout torch's own parse gives
        new_lay = dcp.get_layout(paths[-1])
        with dask.config.set({"sed_dask.readers.dcp-metadata": "torch"}):
            dcp.clear_layout_cache()
            old_lay = dcp.get_layout(paths[-1])
        assert (old_lay.infos, old_lay.fqns, old_lay.files) == (new_lay.infos, new_lay.fqns, new_lay.files)
        assert set(old_lay.chunks) == set(new_lay.chunks)
        assert all(old_lay.chunks[f] == new_lay.chunks[f] for f in old_lay.chunks)
        full = []
        for p in paths[: args.n_old]:
            dcp.clear_layout_cache()
            full.append(timed(lambda p=p: dcp.get_layout(p))[0])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}

        def worker(ps, how):
            env2 = {**env, "DASK_SED_DASK__READERS__DCP_METADATA": how}
            out = subprocess.run(
                [sys.executable, "-c", _WORKER, *ps], env=env2, check=True, capture_output=True, text=True
            ).stdout.split()
            return float(out[0])

        w_new = worker(paths, "fast")
        w_old = worker(paths[: args.n_old], "torch")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    n, k = len(paths), args.n_old
    per_old = t_old / k
    print(
        f"\nLoad average {load0:.1f} (1 min) at the start, {os.getloadavg()[0]:.1f} at the end; "
        f"{os.cpu_count()} cores. Command: python benchmarks/dcp_metadata.py --n-ckpts {n} --n-old {k}\n"
    )
    print("| what | checkpoints | old (torch weights_only) | new | old / new |")
    print("|---|---|---|---|---|")
    print(f"| open_checkpoints: validate + plan | {k} | {t_old:.2f} s | {t_new_sub:.2f} s | {t_old / t_new_sub:.0f}x |")
    print(
        f"| open_checkpoints: validate + plan | {n} | {per_old * n:.0f} s (extrapolated: {per_old:.2f} s each) | "
        f"**{t_new:.1f} s** ({t_new / n * 1e3:.1f} ms each) | {per_old * n / t_new:.0f}x |"
    )
    print(
        f"| worker process: list tensors of every checkpoint | {n} | {w_old / k * n:.0f} s (extrapolated from "
        f"{k}) | {w_new:.1f} s | {w_old / k * n / w_new:.0f}x |"
    )
    print(f"| new, full restricted parse (no earlier file matches) | {k} | - | {sum(full) / k:.2f} s each | - |")


if __name__ == "__main__":
    main()
