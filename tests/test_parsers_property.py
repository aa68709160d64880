"""Issue 13, property-based: the CLI argument parsers and metrics parsing either return a valid value
or raise their one clear error type, for any input hypothesis can think of; so the next
``--windows 3,,4`` / ``--tau -1`` / ``val/loss`` is found by a machine, not a user.

Catches on the code before issue 13: ``3,,4`` and ``3,3`` parsed to [3, 4] / [3]; ``--tau -1``,
``nan`` and ``inf`` accepted; ``--lags 5:2`` gave an empty list; metric names with '/' accepted.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sed_dask.cli import int_list, steps_arg
from sed_dask.cli.query import _lags, _tau
from sed_dask.errors import MetricsError
from sed_dask.sources.metrics import parse_metrics

FAST = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TEXT = st.text(alphabet=st.sampled_from(list("0123456789,-+:. eEnaifx")), max_size=12)


@FAST
@given(TEXT)
def test_int_list_is_exactly_the_integers_given(text):
    try:
        out = int_list(text, "windows")
    except ValueError as exc:
        assert "--windows" in str(exc)
        return
    items = text.split(",")
    assert out == [int(x) for x in items] and len(set(out)) == len(out)


@FAST
@given(st.lists(st.integers(-(10**6), 10**6), min_size=1, max_size=8))
def test_int_list_round_trips_and_refuses_repeats(values):
    text = ",".join(map(str, values))
    if len(set(values)) == len(values):
        assert int_list(text, "windows") == values
    else:
        with pytest.raises(ValueError, match="twice"):
            int_list(text, "windows")
    with pytest.raises(ValueError, match="empty item"):
        int_list(text + ",", "windows")


@FAST
@given(TEXT)
def test_steps_are_non_negative_integers(text):
    try:
        out = steps_arg(text)
    except ValueError:
        return
    assert out is None or all(isinstance(s, int) and s >= 0 for s in out)


@FAST
@given(TEXT)
def test_lags_are_a_non_empty_list_without_repeats(text):
    try:
        out = _lags(text)
    except argparse.ArgumentTypeError:
        return
    assert out and len(set(out)) == len(out) and all(isinstance(v, int) for v in out)


@FAST
@given(st.one_of(TEXT, st.floats(allow_nan=True, allow_infinity=True).map(repr)))
def test_tau_is_auto_or_a_finite_positive_number(text):
    try:
        out = _tau(text)
    except argparse.ArgumentTypeError:
        return
    assert out == "auto" or (isinstance(out, float) and math.isfinite(out) and out > 0)


NAMES = st.one_of(st.just("val_loss"), st.text(alphabet=st.sampled_from(list("abc_/ .\\\t")), max_size=6))
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3)
)
RECORD = st.fixed_dictionaries(
    {"step": st.one_of(st.integers(-3, 50), st.floats(-3, 50), st.text(max_size=2))}, optional={}
).flatmap(lambda base: st.dictionaries(NAMES, VALUES, max_size=3).map(lambda extra: {**extra, **base}))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(RECORD, max_size=6))
def test_parse_metrics_returns_clean_series_or_a_metrics_error(records):
    try:
        out = parse_metrics(records, where="m.json", nonfinite="ignore")
    except MetricsError as exc:
        assert str(exc).startswith("m.json")
        return
    steps = out["step"]
    assert steps.dtype == np.int64 and np.all(np.diff(steps) > 0)
    for k, v in out.items():
        assert v.shape == steps.shape
        if k != "step":
            assert k.strip() == k and k and "/" not in k and "\\" not in k and not k.startswith(".")
            assert v.dtype == np.float64


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=6))
def test_nonfinite_metric_policy(values):
    recs = [{"step": i, "val_loss": v} for i, v in enumerate(values)]
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        with pytest.raises(MetricsError, match="NaN/Inf"):
            parse_metrics(recs, where="m.json", nonfinite="raise")
        with pytest.warns(UserWarning, match=r"m\.json: NaN/Inf"):
            parse_metrics(recs, where="m.json")
    else:
        parse_metrics(recs, where="m.json", nonfinite="raise")
