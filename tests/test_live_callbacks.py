"""The trainer callbacks with the real packages: a few CPU steps, then the TensorBoard events read back."""

from __future__ import annotations

import glob

import numpy as np
import pytest
import torch

from sed_dask.live.incremental import open_live

WINDOWS = (3,)


def _scalars(logdir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for f in glob.glob(f"{logdir}/**/events.out.tfevents.*", recursive=True):
        acc = EventAccumulator(f)
        acc.Reload()
        for t in acc.Tags()["scalars"]:  # transformers prefixes its logs with "train/"
            if t == tag or t == f"train/{tag}":
                out.update({e.step: e.value for e in acc.Scalars(t)})
    return out


def _check(tmp_path, logdir, every, n_steps):
    ds = open_live(str(tmp_path / "ck-live.zarr"))
    edge = _scalars(logdir, "sed/W3/edge_ratio")
    # one logged value per checkpoint from the 4th on (W=3 needs 3 deltas), equal to the stored window
    assert sorted(edge) == list(range(4 * every, n_steps + 1, every))  # first checkpoint at step `every`
    for st, v in edge.items():
        np.testing.assert_allclose(v, float(ds["edge_ratio"].sel(step=st).isel(run=0, window=0)), rtol=1e-6)
    assert sorted(_scalars(logdir, "sed/alerts")) == sorted(edge)


def test_hf_trainer_callback_logs_to_tensorboard(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tensorboard")
    from sed_dask.live.hf import SEDTrainerCallback

    class Reg(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 1)

        def forward(self, x, labels=None):
            y = self.lin(x).squeeze(-1)
            return {"loss": torch.nn.functional.mse_loss(y, labels), "logits": y}

    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 6, generator=g)
    data = [{"x": X[i], "labels": X[i].sum()} for i in range(64)]
    logdir = tmp_path / "out"  # the TensorBoard callback writes under output_dir (transformers 5 has no logging_dir)
    args = transformers.TrainingArguments(
        output_dir=str(logdir),
        max_steps=12,
        per_device_train_batch_size=8,
        logging_steps=100,
        report_to=["tensorboard"],
        save_strategy="no",
        use_cpu=True,
        learning_rate=0.05,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=Reg(), args=args, train_dataset=data)
    SEDTrainerCallback(tmp_path / "ck", every=2, windows=WINDOWS, echo=None).attach(trainer)
    trainer.train()
    _check(tmp_path, logdir, 2, 12)


def test_lightning_callback_logs_to_tensorboard(tmp_path):
    L = pytest.importorskip("lightning")
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger

    from sed_dask.live.lightning import SEDCallback

    class Reg(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 1)

        def training_step(self, batch, i):
            x, y = batch
            return torch.nn.functional.mse_loss(self.lin(x).squeeze(-1), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 6, generator=g)
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, X.sum(1)), batch_size=8)
    logger = TensorBoardLogger(str(tmp_path / "tb"), name="m")
    trainer = L.Trainer(
        max_steps=12,
        logger=logger,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[SEDCallback(tmp_path / "ck", every=2, windows=WINDOWS, echo=None)],
    )
    trainer.fit(Reg(), dl)
    logger.experiment.flush()
    _check(tmp_path, tmp_path / "tb", 2, 12)
