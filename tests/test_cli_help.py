"""The CLI explains itself: every option has help, help has no Sphinx markup, examples parse as written."""

from __future__ import annotations

import argparse
import re

import pytest

from sed_dask.cli import build_parser, main

MARKUP = re.compile(r"``|:(mod|func|class|meth|attr|data):`")


def _parsers(p: argparse.ArgumentParser, path=("sed-dask",)):
    """(command path, parser) for the top parser and every sub-command, nested ones included."""
    yield path, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                yield from _parsers(sp, path + (name,))


PARSERS = list(_parsers(build_parser()))


def test_every_option_of_every_command_has_help():
    missing = [
        f"{' '.join(path)} {'/'.join(a.option_strings) or a.dest}"
        for path, p in PARSERS
        for a in p._actions
        if a.help != argparse.SUPPRESS and not (a.help or "").strip() and not isinstance(a, argparse._SubParsersAction)
    ]
    assert not missing, "options without help:\n" + "\n".join(missing)


@pytest.mark.parametrize("path", [path for path, _ in PARSERS], ids=" ".join)
def test_help_has_no_markup(path):
    p = dict(PARSERS)[path]
    text = p.format_help()
    assert not MARKUP.search(text), f"{' '.join(path)} --help:\n{text}"


def test_query_help_lists_each_query_with_one_line():
    text = dict(PARSERS)[("sed-dask", "query")].format_help()
    from sed_dask.cli.query import QUERIES

    for q in QUERIES:
        assert re.search(rf"^\s+{q}\s+\S", text, re.M), f"query {q} has no one-line description:\n{text}"


@pytest.mark.parametrize(
    "argv,lags",
    [
        (["--lags", "-3:5"], list(range(-3, 5))),
        (["--lags=-3:5"], list(range(-3, 5))),
        (["--lags", "-1,0,2"], [-1, 0, 2]),
        (["--lags", "-2"], [-2]),
        (["--lags", "0:3", "--json"], [0, 1, 2]),
    ],
)
def test_negative_lag_ranges_parse_as_written(argv, lags):
    from sed_dask.cli import attach_negative_values

    args = build_parser().parse_args(attach_negative_values(["query", "r.zarr", "lag", *argv]))
    assert args.lags == lags


def test_lags_help_says_the_range_is_half_open():
    text = dict(PARSERS)[("sed-dask", "query", "lag")].format_help()
    assert "half-open" in text and "-5:8" in text


def test_a_bad_lag_range_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["query", "r.zarr", "lag", "--lags", "-3:x"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "lags must look like" in err[-1]
