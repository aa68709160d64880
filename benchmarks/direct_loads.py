"""Time a direct pass (``spectrum(open_checkpoints(DIR))``) over an existing checkpoint directory and
count the ``torch.load`` calls it makes (layout builds of ``.pt`` files, see
``sed_dask/readers/layout_cache.py``).

Usage: ``python benchmarks/direct_loads.py DIR [--windows 5,10]``. To compare two versions of
sed_dask on the same files, run it once with ``PYTHONPATH=<other checkout>`` in front.
``benchmarks/direct.py --keep`` leaves suitable ``.pt`` directories behind.
"""

from __future__ import annotations

import argparse
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--windows", default="5,10")
    a = ap.parse_args(argv)
    import sed_dask
    from sed_dask.readers import torch_pt

    n = [0]
    real = torch_pt._torch_load

    def counting(path, *, mmap):
        n[0] += 1
        return real(path, mmap=mmap)

    torch_pt._torch_load = counting
    t0 = time.perf_counter()
    run = sed_dask.open_checkpoints(a.dir, run="r")
    t1 = time.perf_counter()
    ds = sed_dask.spectrum(run, windows=[int(w) for w in a.windows.split(",")], scheduler="threads", progress=False)
    t2 = time.perf_counter()
    print(
        f"{sed_dask.__file__}: {len(run.steps) if hasattr(run, 'steps') else '?'} checkpoints, "
        f"validate {t1 - t0:.2f} s, pass {t2 - t1:.2f} s, torch.load calls {n[0]}, "
        f"sum of sigma {float(ds['sigma'].sum()):.12e}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
