"""Weight spectra over a trajectory: every quantity against numpy, planted matrices (MP bulk + BBP spikes,
heavy tails), real torch/safetensors checkpoints through the Dask pass on a LocalCluster, alignment
against a numpy oracle, queries, CLI and bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import xarray as xr
from models import make_trajectory, write_pt
from scipy.linalg import subspace_angles

import sed_dask
from sed_dask.cli import main as cli_main
from sed_dask.store.trajectory import ParamIndex, TensorEntry, write_trajectory
from sed_dask.weights import (
    WeightSpectrumError,
    escape_steps,
    layer_table,
    matrix_spectrum,
    series,
    settings,
)
from sed_dask.weights.fit import mp_fit, mp_quantile, powerlaw_alpha


def _settings(**kw):
    base = {"k": 5, "seed": 0}
    base.update(kw)
    return settings(**base)


def _planted_noise(m, n, s, seed):
    return np.random.default_rng(seed).standard_normal((m, n)) * s


def _spikes(m, n, strengths, seed):
    rng = np.random.default_rng(1000 + seed)
    U = np.linalg.qr(rng.standard_normal((m, len(strengths))))[0]
    V = np.linalg.qr(rng.standard_normal((n, len(strengths))))[0]
    return (U * np.asarray(strengths)) @ V.T


# ----------------------------------------------------------------------------- every quantity vs numpy
@pytest.mark.parametrize("shape", [(60, 45), (45, 60), (8, 3, 3, 3)])
@pytest.mark.parametrize("method", ["exact", "gram", "randomized"])
def test_matrix_spectrum_vs_numpy(shape, method):
    rng = np.random.default_rng(3)
    T = rng.standard_normal(shape)
    A = T.reshape(shape[0], -1)
    m, n = A.shape
    # a decaying spectrum so that the randomized range finder has something to find
    U, _, Vt = np.linalg.svd(A, full_matrices=False)
    A = (U * (0.8 ** np.arange(min(m, n)) + 0.01)) @ Vt
    kw = {
        "exact": {},
        "gram": {"exact_bytes": 1, "block_bytes": 4 * n * 7},
        "randomized": {"exact_bytes": 1, "esd_max_dim": 1, "block_bytes": 4 * n * 7},
    }[method]
    s = _settings(**kw)
    assert s.method(m, n) == method
    out = matrix_spectrum(A, m, n, s)
    sig = np.linalg.svd(A, compute_uv=False)
    rtol = {"exact": 1e-12, "gram": 1e-9, "randomized": 1e-8}[method]
    np.testing.assert_allclose(out["sigma"], sig[:5], rtol=rtol)
    assert out["spectral"] == pytest.approx(sig[0], rel=rtol)
    assert out["frobenius"] == pytest.approx(np.linalg.norm(A), rel=1e-12)
    assert out["stable_rank"] == pytest.approx(np.linalg.norm(A) ** 2 / sig[0] ** 2, rel=rtol)
    small = A.T @ A if n <= m else A @ A.T
    eig = np.linalg.eigvalsh(small)[::-1]
    if method == "randomized":
        assert out["esd"] is None and math.isnan(out["alpha"]["alpha"])
    else:
        np.testing.assert_allclose(out["esd"], eig, rtol=1e-9, atol=1e-12 * eig[0])
        ref = powerlaw_alpha(eig, min_tail=s.alpha_min_tail)
        assert out["alpha"]["alpha"] == pytest.approx(ref["alpha"], rel=1e-6, nan_ok=True)


def test_conv_kernel_is_out_by_in_kh_kw_and_shapes():
    from sed_dask.weights.spectra import matrix_shape

    assert matrix_shape((8, 3, 3, 3)) == (8, 27)
    assert matrix_shape((64,)) is None and matrix_shape((1, 64)) is None and matrix_shape(()) is None


def test_powerlaw_mle_matches_closed_form_at_chosen_xmin():
    lam = np.random.default_rng(0).pareto(1.7, 400) + 1.0
    r = powerlaw_alpha(lam)
    tail = lam[lam >= r["xmin"]]
    assert r["n_tail"] == tail.size
    assert r["alpha"] == pytest.approx(1 + tail.size / np.log(tail / r["xmin"]).sum(), rel=1e-12)


# ----------------------------------------------------------------------------- planted: MP bulk + BBP spikes
M_, N_, S_ = 300, 600, 0.05
CRIT = S_ * (M_ * N_) ** 0.25  # BBP: a spike theta separates from the bulk iff theta > s (N M)^(1/4)


@pytest.mark.parametrize("seed", range(5))
def test_planted_outliers_above_bbp_are_counted_and_bulk_fitted(seed):
    A = _planted_noise(M_, N_, S_, seed) + _spikes(M_, N_, [4.0 * CRIT, 3.0 * CRIT, 2.0 * CRIT], seed)
    lam = np.linalg.svd(A, compute_uv=False) ** 2
    fit = mp_fit(lam, M_, N_)
    assert fit["n_outliers"] == 3
    assert fit["s2"] == pytest.approx(S_**2, rel=0.03)
    assert fit["edge"] == pytest.approx(S_ * (math.sqrt(N_) + math.sqrt(M_)), rel=0.015)
    assert fit["ks"] < 0.05
    # the outliers sit where BBP puts them: sigma^2 = (theta^2 + s^2 N)(theta^2 + s^2 M) / theta^2
    th = np.array([4.0, 3.0, 2.0]) * CRIT
    bbp = np.sqrt((th**2 + S_**2 * N_) * (th**2 + S_**2 * M_)) / th
    np.testing.assert_allclose(np.sqrt(lam[:3]), bbp, rtol=0.05)  # finite-size: measured <= 4 %


def test_below_bbp_spikes_are_not_counted():
    counts = []
    for seed in range(20):
        A = _planted_noise(M_, N_, S_, seed) + _spikes(M_, N_, [0.5 * CRIT, 0.5 * CRIT], seed)
        counts.append(mp_fit(np.linalg.svd(A, compute_uv=False) ** 2, M_, N_)["n_outliers"])
    # outlier_alpha = 0.01 per matrix: at most 2 false counts in 20 matrices
    assert sum(counts) <= 2, counts


def test_mp_quantiles_match_a_large_wishart():
    X = np.random.default_rng(1).standard_normal((2000, 1000))
    lam = np.linalg.eigvalsh(X.T @ X) / 2000
    np.testing.assert_allclose(np.quantile(lam, [0.1, 0.5, 0.9]), mp_quantile([0.1, 0.5, 0.9], 0.5), rtol=0.01)


# ----------------------------------------------------------------------------- planted: heavy tails
@pytest.mark.parametrize("seed", range(3))
def test_alpha_recovered_on_a_matrix_with_a_pareto_esd(seed):
    """Singular values planted so that sigma^2 ~ Pareto with density exponent alpha = 2.5 exactly."""
    rng = np.random.default_rng(seed)
    m, n, alpha = 500, 800, 2.5
    lam = (1 - rng.random(m)) ** (-1 / (alpha - 1))
    U = np.linalg.qr(rng.standard_normal((m, m)))[0]
    V = np.linalg.qr(rng.standard_normal((n, m)))[0]
    A = (U * np.sqrt(lam)) @ V.T
    r = matrix_spectrum(A, m, n, _settings())["alpha"]
    assert abs(r["alpha"] - alpha) < max(0.2, 3 * r["sigma"]), r


def test_alpha_of_iid_heavy_tailed_entries_follows_one_plus_mu_over_two():
    """Entries with P(|x| > t) ~ t^-mu, mu = 1 (Levy regime): ESD tail exponent 1 + mu/2 = 1.5 (Martin &
    Mahoney 2021); tolerance 0.1 on 500 x 1000 matrices (measured 1.46-1.53 over seeds)."""
    for seed in range(3):
        rng = np.random.default_rng(seed)
        X = (rng.pareto(1.0, (500, 1000)) + 1.0) * rng.choice([-1.0, 1.0], (500, 1000))
        r = matrix_spectrum(X, 500, 1000, _settings())["alpha"]
        assert abs(r["alpha"] - 1.5) < 0.1, (seed, r)


# ----------------------------------------------------------------------------- the Dask pass on real files
@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wspec")
    traj = make_trajectory(5, every=10, train_steps=3)
    files = write_pt(traj, tmp / "pt")
    sed_dask.ingest(str(tmp / "pt"), str(tmp / "traj.zarr"), run="s0", scheduler="threads", progress=False)
    return tmp, traj, files


def _oracle(traj, step_i, name):
    t = traj.state_dicts[step_i][name].double().numpy()
    return t.reshape(t.shape[0], -1)


def test_pass_on_local_cluster_vs_numpy_and_store_equals_files(real_run, client):
    tmp, traj, _ = real_run
    src = sed_dask.open_checkpoints(str(tmp / "pt"), run="s0")
    out = tmp / "w.zarr"
    ds = sed_dask.weight_spectra(src, k=4, client=client, output=str(out))
    assert ds.attrs["sed_dask_complete"] and ds.attrs["sed_dask_results"] == "weight_spectra"
    two_d = [
        n
        for n, v in traj.state_dicts[0].items()
        if v.ndim >= 2 and n != "lm_head.weight" and not n.endswith("attn.bias")
    ]
    assert sorted(str(x) for x in ds.layer.values) == sorted(two_d)
    for i, step in enumerate(traj.steps):
        for name in two_d:
            A = _oracle(traj, i, name)
            sig = np.linalg.svd(A, compute_uv=False)
            x = ds.sel(run="s0", step=step, layer=name)
            np.testing.assert_allclose(x["sigma"].values, sig[:4], rtol=1e-6)  # float32 weights, float64 SVD
            assert float(x["frobenius_norm"]) == pytest.approx(np.linalg.norm(A), rel=1e-6)
            esd = x["esd"].values
            esd = esd[np.isfinite(esd)]
            eig = np.linalg.eigvalsh(A.T @ A if A.shape[1] <= A.shape[0] else A @ A.T)[::-1]
            np.testing.assert_allclose(esd, eig, rtol=1e-5, atol=1e-9 * eig[0])
            fit = mp_fit(esd, *A.shape)
            assert float(x["n_outliers"]) == fit["n_outliers"]
            assert float(x["mp_edge"]) == pytest.approx(fit["edge"], rel=1e-12)
    # the ingested store gives the same numbers (same reads, another source)
    ds2 = sed_dask.weight_spectra(str(tmp / "traj.zarr"), k=4, scheduler="threads")
    xr.testing.assert_allclose(ds2["sigma"], ds["sigma"].load(), rtol=0, atol=0)
    xr.testing.assert_allclose(ds2["esd"], ds["esd"].load(), rtol=0, atol=0)
    # queries and the accessor
    esc = ds.load().sed.weight_escape()
    assert list(esc.columns[:4]) == ["run", "layer", "init_outliers", "escape_step"]
    assert escape_steps(ds).equals(esc)
    s = series(ds, "alpha")
    assert len(s) == len(traj.steps) * len(two_d)
    tab = layer_table(ds)
    assert tab["step"].iloc[0] == traj.steps[-1] and len(tab) == len(two_d)


def test_conv_model_from_safetensors(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3)
    for s in (0, 1, 2):
        with torch.no_grad():
            conv.weight.add_(0.01 * torch.randn_like(conv.weight))
        save_file(
            {"conv.weight": conv.weight.detach().clone(), "conv.bias": conv.bias.detach().clone()},
            str(tmp_path / f"model_{s}.safetensors"),
        )
    src = sed_dask.open_checkpoints(str(tmp_path), run="c")
    ds = sed_dask.weight_spectra(src, k=3, scheduler="threads")
    assert [str(x) for x in ds.layer.values] == ["conv.weight"]
    assert ds.layer_rows.values.tolist() == [8] and ds.layer_cols.values.tolist() == [27]
    from safetensors.numpy import load_file

    A = load_file(str(tmp_path / "model_2.safetensors"))["conv.weight"].astype(np.float64).reshape(8, 27)
    np.testing.assert_allclose(
        ds["sigma"].isel(run=0, step=-1, layer=0).values, np.linalg.svd(A, compute_uv=False)[:3], rtol=1e-12
    )


def test_bad_input_errors(real_run, tmp_path, capsys):
    tmp, _, _ = real_run
    store = str(tmp / "traj.zarr")
    with pytest.raises(WeightSpectrumError, match=r"k=99 is larger than the matrix"):
        sed_dask.weight_spectra(store, k=99, scheduler="threads")
    with pytest.raises(WeightSpectrumError, match=r"unknown layer\(s\) \['nope'\]"):
        sed_dask.weight_spectra(store, layers=["nope"], scheduler="threads")
    with pytest.raises(WeightSpectrumError, match="not 2-D weights"):
        sed_dask.weight_spectra(store, layers=["ln_f.weight"], scheduler="threads")
    idx = ParamIndex(
        [
            TensorEntry("a.bias", 0, 6, (6,), "float32", "other"),
            TensorEntry("b.weight", 6, 3, (1, 3), "float32", "other"),
        ]
    )
    write_trajectory(str(tmp_path / "flat.zarr"), "r", [0, 1], np.ones((2, 9), np.float32), index=idx)
    with pytest.raises(WeightSpectrumError, match="no 2-D tensor"):
        sed_dask.weight_spectra(str(tmp_path / "flat.zarr"), scheduler="threads")
    assert cli_main(["weights", "compute", store, "-o", str(tmp_path / "x.zarr"), "--threads", "-k", "99"]) == 2
    err = capsys.readouterr().err
    assert "error: tensor" in err and "larger than the matrix" in err and "Traceback" not in err
    assert cli_main(["weights", "compute", store, "-o", str(tmp_path / "x.zarr"), "--threads", "--layer", "nope"]) == 2
    assert "unknown layer" in capsys.readouterr().err
    import dask

    with dask.config.set({"sed_dask.weights.k": 40}):  # the configured default is cut to a small matrix
        ds = sed_dask.weight_spectra(store, scheduler="threads", steps=[0])
    x = ds["sigma"].sel(layer="blocks.0.attn.c_proj.weight").isel(run=0, step=0).values
    assert np.isfinite(x[:32]).all() and np.isnan(x[32:]).all()
    with pytest.raises(ValueError, match="outlier_alpha"):
        sed_dask.weight_spectra(store, outlier_alpha=0.02, scheduler="threads")


def test_cli_compute_and_query_json(real_run, tmp_path, capsys):
    tmp, traj, _ = real_run
    out = str(tmp_path / "w.zarr")
    assert cli_main(["weights", "compute", str(tmp / "traj.zarr"), "-o", out, "--threads", "-k", "3"]) == 0
    capsys.readouterr()
    assert cli_main(["query", out, "weights", "escape", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["query"] == "weights escape" and "outliers" in doc["definitions"]
    ds = xr.open_zarr(out).load()
    assert doc["table"] == json.loads(escape_steps(ds).to_json(orient="records"))
    assert cli_main(["query", out, "weights", "series", "--var", "alpha", "--layer", "tok_emb.weight", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["table"]
    assert [r["step"] for r in rows] == traj.steps
    np.testing.assert_allclose([r["alpha"] for r in rows], ds["alpha"].sel(layer="tok_emb.weight").values[0])
    assert cli_main(["query", out, "weights", "table", "--step", "20"]) == 0
    assert "stable_rank" in capsys.readouterr().out
    assert cli_main(["query", out, "weights", "table", "--step", "21"]) == 2
    assert "no weight spectra at step 21" in capsys.readouterr().err
    assert cli_main(["query", out, "weights", "align"]) == 2
    assert "needs a weight_alignment store" in capsys.readouterr().err
    # the output is written safely: a second write needs --overwrite
    assert cli_main(["weights", "compute", str(tmp / "traj.zarr"), "-o", out, "--threads", "-k", "3"]) == 2
    assert "overwrite" in capsys.readouterr().err


# ----------------------------------------------------------------------------- alignment
def test_alignment_planted_and_vs_numpy(tmp_path, client):
    """Layer a: updates inside the weight's top-2 singular subspace (angles ~0); layer b: random updates
    (overlap ~ chance k/dim); every angle against the numpy oracle."""
    rng = np.random.default_rng(7)
    ma, na, mb, nb, T, k = 40, 30, 50, 20, 9, 2
    Ua = np.linalg.qr(rng.standard_normal((ma, ma)))[0]
    Va = np.linalg.qr(rng.standard_normal((na, na)))[0]
    sa = np.concatenate([[20.0, 15.0], np.linspace(1.0, 0.5, na - 2)])
    Wa0 = (Ua[:, :na] * sa) @ Va.T
    Wb0 = rng.standard_normal((mb, nb))
    rows = []
    for t in range(T):
        c = rng.standard_normal(3)
        Wa = Wa0 + 0.05 * t * (
            c[0] * np.outer(Ua[:, 0], Va[:, 0])
            + c[1] * np.outer(Ua[:, 1], Va[:, 1])
            + c[2] * np.outer(Ua[:, 0], Va[:, 1])
        )
        Wb = Wb0 + 0.05 * t * rng.standard_normal((mb, nb))
        rows.append(np.concatenate([Wa.ravel(), Wb.ravel()]))
    params = np.array(rows, np.float32)
    idx = ParamIndex(
        [
            TensorEntry("a.weight", 0, ma * na, (ma, na), "float32", "a"),
            TensorEntry("b.weight", ma * na, mb * nb, (mb, nb), "float32", "b"),
        ]
    )
    store = str(tmp_path / "al.zarr")
    write_trajectory(store, "r", list(range(0, 10 * T, 10)), params, index=idx)
    al = sed_dask.update_alignment(
        store, window=4, k=k, n_directions=3, client=client, output=str(tmp_path / "align.zarr")
    )
    assert al.sizes["step"] == T - 4
    assert float(al["overlap"].sel(layer="a.weight").min()) > 0.999
    ob = al["overlap"].sel(layer="b.weight")
    assert float(ob.mean()) < 6 * float(al["chance"].sel(layer="b.weight").max())
    X32 = params.astype(np.float32)
    for t, step in enumerate(al.step.values):
        e = int(step) // 10
        X = np.diff(X32[e - 4 : e + 1], axis=0).astype(np.float64)
        for name, (off, m, n) in {"a.weight": (0, ma, na), "b.weight": (ma * na, mb, nb)}.items():
            Wend = X32[e, off : off + m * n].astype(np.float64).reshape(m, n)
            # the oracle restricts the *global* directions: same as the pass
            _, sig, Vt = np.linalg.svd(X, full_matrices=False)
            D = Vt[:3, off : off + m * n].reshape(3, m, n)
            w = sig[:3] ** 2
            Cl = np.einsum("j,jab,jcb->ac", w, D, D)
            Cr = np.einsum("j,jab,jac->bc", w, D, D)

            def top(C):
                return np.linalg.eigh(C)[1][:, ::-1][:, :k]

            U, _, Vwt = np.linalg.svd(Wend)
            want_l = np.sort(np.degrees(subspace_angles(top(Cl), U[:, :k])))
            want_r = np.sort(np.degrees(subspace_angles(top(Cr), Vwt[:k].T)))
            got = al["angle"].sel(step=step, layer=name).values
            np.testing.assert_allclose(np.sort(got[0]), want_l, atol=1e-3)
            np.testing.assert_allclose(np.sort(got[1]), want_r, atol=1e-3)
            loading = np.einsum("j,jab,jab->", w, D, D) / w.sum()
            assert float(al["loading"].sel(step=step, layer=name)) == pytest.approx(loading, rel=1e-6)
    summ = al.sed.alignment_summary()
    assert set(summ["layer"]) == {"a.weight", "b.weight"}
    with pytest.raises(WeightSpectrumError, match="larger than the matrix"):
        sed_dask.update_alignment(store, window=4, k=25, scheduler="threads")


def test_report_section(real_run, tmp_path):
    from sed_dask.report.summary import make_report

    tmp, _, _ = real_run
    store = str(tmp / "traj.zarr")
    res = sed_dask.spectrum(store, windows=[2], scheduler="threads", progress=False)
    w = sed_dask.weight_spectra(store, k=3, scheduler="threads")
    al = sed_dask.update_alignment(store, window=2, k=2, n_directions=2, scheduler="threads")
    out = make_report(res, tmp_path / "rep", analysis={"weights": w, "weight_alignment": al})
    for name in ("weights_alpha_outliers", "weights_esd", "weights_alignment", "weights_layers"):
        assert out[name].exists(), name
    md = (tmp_path / "rep" / "summary.md").read_text()
    assert "weights_esd.png" in md and "Weight-spectra definitions" in md
    assert "weights_layers.csv" not in md.split("![")[-1]  # csv files are not shown as figures
