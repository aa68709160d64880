"""Progress tells the truth: bars reach 100 %, end with one summary line, and logs get no escape codes."""

from __future__ import annotations

import io
import re

import numpy as np

from sed_dask.engine.passes import compute_graph
from sed_dask.progress import Bar

ESCAPES = re.compile(r"[\r\x1b]")


class _Tty(io.StringIO):
    def isatty(self):
        return True


def _graph(n=30):
    dsk = {("x", i): (np.sqrt, float(i)) for i in range(n)}
    dsk["total"] = (sum, [("x", i) for i in range(n)])
    return dsk


def test_bar_on_a_terminal_reaches_100_and_ends_with_one_line(monkeypatch):
    err = _Tty()
    monkeypatch.setattr("sys.stderr", err)
    bar = Bar(7, desc="demo", unit="item")
    for _ in range(7):
        bar.update()
    bar.close(where="out.zarr")
    text = err.getvalue()
    assert "100%" in text and "7/7" in text
    last = text.rstrip("\n").split("\n")[-1]
    assert re.fullmatch(r"demo: done, 7 item\(s\) in \d+\.\d s -> out\.zarr", last), last


def test_bar_in_a_log_prints_only_the_summary(capsys):
    bar = Bar(3, desc="demo")
    bar.update(2)
    bar.close(ok=False)
    out = capsys.readouterr()
    assert not ESCAPES.search(out.err + out.out)
    assert out.err.splitlines() == [out.err.strip()] and "stopped at 2/3" in out.err


def test_local_pass_counts_every_task(capsys):
    assert compute_graph(_graph(), ["total"], scheduler="threads", progress=True, desc="p")[0] > 0
    err = capsys.readouterr().err
    assert not ESCAPES.search(err)
    assert re.fullmatch(r"p: done, 31 task\(s\) in \d+\.\d s\n", err), err


def test_distributed_pass_ends_with_one_line_and_no_escape_codes(client, capsys):
    compute_graph(_graph(), ["total"], client=client, progress=True, desc="p")
    out = capsys.readouterr()
    assert not ESCAPES.search(out.out + out.err), repr(out)
    assert re.fullmatch(r"p: done, 31 task\(s\) in \d+\.\d s\n", out.err), out.err


def test_ingest_ends_with_what_how_long_where(tmp_path, capsys):
    from sed_dask import ingest
    from sed_dask.testing import PlantedTrajectory

    ck = PlantedTrajectory(n_deltas=6, n_params=500, rank=1).write_checkpoints(tmp_path / "ck")
    ingest(str(ck), str(tmp_path / "t.zarr"), "r", scheduler="threads", progress=True)
    err = capsys.readouterr().err
    assert not ESCAPES.search(err)
    (line,) = [ln for ln in err.splitlines() if ln.startswith("ingest r")]
    assert re.fullmatch(
        rf"ingest r: done, 7 checkpoint\(s\) in 7 range\(s\), 0\.000 GB in \d+\.\d s -> "
        rf"{re.escape(str(tmp_path / 't.zarr'))}",
        line,
    ), line
