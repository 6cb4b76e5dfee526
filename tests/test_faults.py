"""Fault injection: divergence, non-finite samples, native crashes of sweep members, interrupted checkpoints.

Faults are injected through the test-only ``consisid_lab.callbacks.fault_injection.FaultInjection`` callback,
added as ``+callbacks.fault=...`` (never part of a default config).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_OVERRIDES, compose_train

from consisid_lab.train import train
from consisid_lab.utils.faults import FailureCollector, NonFiniteInputError, OutputDirError

FAULT = "+callbacks.fault._target_=consisid_lab.callbacks.fault_injection.FaultInjection"


def _fault(kind: str, steps: str) -> list[str]:
    return [FAULT, f"+callbacks.fault.kind={kind}", f"+callbacks.fault.at_step={steps}"]


def _record(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _trainable(ckpt_path: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    prefixes = ("denoiser.fuser.", "denoiser.backbone.", "denoiser.text_encoder.")
    picked = {k: v for k, v in ckpt["state_dict"].items() if k.startswith(prefixes)}
    assert picked, f"no trainable weights under {prefixes} in {ckpt_path}"
    return picked


def _env(standin_cache: Path) -> dict[str, str]:
    return {**os.environ, "CONSISID_LAB_CACHE": str(standin_cache), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------------- bad settings
@pytest.mark.parametrize(
    ("overrides", "match"),
    [(["model.nan_policy=bogus"], "'skip', 'stop'"), (["model.max_nonfinite_steps=0"], "integer >= 1")],
)
def test_nan_settings_out_of_range_name_the_valid_values(train_cfg, overrides, match):
    from consisid_lab.utils.instantiate import instantiate

    with pytest.raises(ValueError, match=match):
        instantiate(train_cfg(*overrides).model)


def test_guard_restores_weights_and_optimizer_state_of_the_last_good_step():
    from consisid_lab.models.divergence import DivergenceGuard

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    guard = DivergenceGuard("skip", max_nonfinite_steps=2)

    def step(step: int, poison: bool = False) -> bool:
        loss = net(torch.randn(8, 4)).square().mean()
        guard.confirm(step, opt)
        loss.backward()
        if poison:
            net.weight.grad.fill_(float("nan"))
        opt.step()
        opt.zero_grad()
        if not all(torch.isfinite(p).all() for p in net.parameters()):
            guard.fail(step, "non-finite weights")
        return guard.end_step(opt)

    assert not step(0)
    good = [p.detach().clone() for p in net.parameters()]
    good_state = {k: v.clone() for k, v in opt.state[net.weight].items()}
    assert not step(1, poison=True)  # undone: back to the state before this step's update
    assert all(torch.equal(a, b) for a, b in zip(good, net.parameters()))
    assert all(torch.equal(good_state[k], v) for k, v in opt.state[net.weight].items())
    assert step(2, poison=True), "a second failure without a confirmed update in between stops (max 2)"
    assert guard.first_bad_step == 1
    assert all(torch.equal(a, b) for a, b in zip(good, net.parameters()))


def test_ema_averages_every_trainable_weight_once_per_step_and_adopts_newly_unfrozen_ones():
    from types import SimpleNamespace

    from consisid_lab.models.ema import TrainableEMA

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    net[1].requires_grad_(False)
    ema = TrainableEMA(decay=0.9)
    ema.on_fit_start(None, net)
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    trainer = SimpleNamespace(global_step=1)
    ema.on_before_backward(trainer, net, torch.tensor(0.0))
    ema.on_before_backward(trainer, net, torch.tensor(0.0))  # gradient accumulation: averaged once
    assert set(ema.shadow) == {"0.weight", "0.bias"}
    for n in ema.shadow:
        assert torch.allclose(ema.shadow[n], 0.9 * start[n] + 0.1 * (start[n] + 1.0), atol=1e-6)
    net[1].requires_grad_(True)  # a later training stage unfreezes it: its average starts at its weights
    ema.on_before_backward(SimpleNamespace(global_step=2), net, torch.tensor(0.0))
    assert torch.equal(ema.shadow["1.weight"], net[1].weight)
    assert torch.allclose(
        ema.shadow["0.bias"],
        0.9 * (0.9 * start["0.bias"] + 0.1 * (start["0.bias"] + 1)) + 0.1 * (start["0.bias"] + 1),
        atol=1e-6,
    )


# ------------------------------------------------------------------------------------------ NaN at step k
def test_nan_loss_at_step_k_is_skipped_and_the_run_completes(train_cfg):
    cfg = train_cfg("trainer.max_steps=3", "test=false", *_fault("nan_loss", "1"))
    train(cfg)
    out = Path(cfg.paths.output_dir)
    record = _record(out)
    assert record["status"] == "completed" and record["stability"]["nan_events"] == 1
    weights = _trainable(out / "checkpoints" / "last.ckpt")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_nan_weights_at_step_k_are_restored_before_anything_sees_them(train_cfg):
    cfg = train_cfg(
        "trainer.max_steps=2", "test=false", "callbacks.checkpoint.save_top_k=-1", *_fault("nan_weights", "1")
    )
    train(cfg)
    out = Path(cfg.paths.output_dir)
    assert _record(out)["status"] == "completed"
    # step_000002.ckpt is written right after the poisoned (2nd) step: it holds the weights from before that step
    before, after = (_trainable(out / "checkpoints" / f"step_00000{i}.ckpt") for i in (1, 2))
    assert before and all(torch.equal(after[k], before[k]) for k in before), "the failed step is undone"
    ema = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"]
    shadow = next(v for k, v in ema.items() if k.startswith("TrainableEMA"))["shadow"]
    assert all(torch.isfinite(t).all() for t in shadow.values())


def _diverged_run(train_cfg, match: str, *overrides: str) -> tuple[Path, dict]:
    """Train until the divergence guard stops the run (step checkpoints kept); the output dir and its record."""
    from consisid_lab.models.lit_module import NonFiniteLossError

    cfg = train_cfg("test=false", "callbacks.checkpoint.save_top_k=-1", *overrides)
    with pytest.raises(NonFiniteLossError, match=match):
        train(cfg)
    out = Path(cfg.paths.output_dir)
    record = _record(out)
    assert record["status"] == "diverged" and record["diverged_at_step"] == 1
    return out, record


def test_repeated_nan_weights_under_skip_stop_as_diverged_after_the_limit(train_cfg):

    out, record = _diverged_run(
        train_cfg,
        "3 failed steps",
        "trainer.max_steps=6",
        "model.max_nonfinite_steps=3",
        *_fault("nan_weights", "[1,2,3]"),
    )
    assert record["last_good_checkpoint"] == str(out / "checkpoints" / "last_good.ckpt")
    good = _trainable(out / "checkpoints" / "last_good.ckpt")
    assert all(torch.equal(good[k], v) for k, v in _trainable(out / "checkpoints" / "step_000001.ckpt").items())


def test_nan_loss_at_step_k_under_stop_saves_the_last_good_state(train_cfg):

    out, record = _diverged_run(
        train_cfg, "last good state saved", "trainer.max_steps=3", "model.nan_policy=stop", *_fault("nan_loss", "1")
    )
    assert "NonFiniteLossError" in record["error"] and "nan_policy=stop" in record["error"]
    # The update before a non-finite loss is undone too: the last good state is the weights at step 0.
    good, after_step_0 = (_trainable(out / "checkpoints" / n) for n in ("last_good.ckpt", "step_000001.ckpt"))
    assert all(torch.isfinite(v).all() for v in good.values())
    assert any(not torch.equal(good[k], after_step_0[k]) for k in good), "step 0's update is undone"


def test_a_too_high_learning_rate_is_recorded_as_diverged_with_its_step(train_cfg):
    """The finite-but-broken case: lr=1e4 gives huge finite weights, and only the next loss is NaN."""
    from consisid_lab.models.lit_module import NonFiniteLossError

    cfg = train_cfg("model.optimizer.lr=1e4", "trainer.gradient_clip_val=null", "trainer.max_steps=3")
    with pytest.raises(NonFiniteLossError):
        train(cfg)
    record = _record(Path(cfg.paths.output_dir))
    assert record["status"] == "diverged" and record["diverged_at_step"] == 1
    assert Path(record["last_good_checkpoint"]).is_file()


# ------------------------------------------------------------------------------------ non-finite samples
def _random_evaluator():
    from consisid_lab.encoders.evaluator import EvaluatorConfig, EvaluatorNet

    torch.manual_seed(0)
    return EvaluatorNet(EvaluatorConfig(band="full", widths=(8, 16), embed_dim=16, image_size=32)).eval()


def test_metrics_refuse_non_finite_input_by_name_before_any_native_call():
    from consisid_lab.metrics.face_fid import FaceFID
    from consisid_lab.metrics.facesim import FaceSim
    from consisid_lab.metrics.identity_drift import IdentityDrift

    ev = _random_evaluator()
    ref, video = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 4, 3, 32, 32) * 2 - 1
    bad = video.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(NonFiniteInputError, match=r"FaceSim: video .* items \[1\]"):
        FaceSim(ev).update(ref, bad)
    with pytest.raises(NonFiniteInputError, match="IdentityDrift"):
        IdentityDrift(ev).update(ref, bad)
    fid = FaceFID(ev)
    with pytest.raises(NonFiniteInputError, match="FaceFID: generated"):
        fid.update(video, bad)
    # Statistics that went non-finite anyway are refused at compute, where LAPACK would crash the process.
    fid.update(video, video)
    fid.fake_features_sum[0] = float("inf")
    with pytest.raises(NonFiniteInputError, match="fake_features_sum"):
        fid.compute()


def test_benchmark_metrics_skip_a_non_finite_batch_and_the_run_records_it():
    from consisid_lab.metrics.finite import FiniteSamplesOnly

    class Recording:
        def __init__(self):
            self.updates = 0

        def update(self, batch, video):
            self.updates += 1

        def has_updates(self):
            return self.updates > 0

        def compute(self):
            raise NonFiniteInputError("FaceFID: accumulated state is not finite")

        def reset(self):
            self.updates = 0

        def to(self, device):
            return self

    class Batch:
        video = torch.zeros(2, 3, 3, 8, 8)
        identity = torch.tensor([4, 5])

    inner = Recording()
    guarded = FiniteSamplesOnly(inner, name="benchmark")
    with FailureCollector() as collected:
        guarded.update(Batch(), torch.full((2, 3, 3, 8, 8), float("nan")))
        guarded.update(Batch(), torch.zeros(2, 3, 3, 8, 8))
        assert guarded.compute() == {}
    assert inner.updates == 1, "the NaN batch never reached the metrics"
    sources = [f["source"] for f in collected.failures]
    assert sources == ["benchmark", "benchmark"]
    assert "generated videos" in collected.failures[0]["message"] and "[4, 5]" in collected.failures[0]["message"]


def test_video_writing_and_spectra_refuse_non_finite_samples(tmp_path):
    from consisid_lab.analysis.spectrum import compute_spectrum
    from consisid_lab.utils.media import log_videos, write_mp4

    nan_video = torch.full((3, 3, 8, 8), float("nan"))
    with pytest.raises(NonFiniteInputError, match="to_uint8_frames"):
        write_mp4(nan_video, tmp_path / "v.mp4")
    assert not (tmp_path / "v.mp4").exists()
    with pytest.raises(NonFiniteInputError, match="SpectrumAccumulator"):
        compute_spectrum(nan_video)

    class CSV:
        save_dir = str(tmp_path / "csv")

    with FailureCollector() as collected:
        log_videos([CSV()], "val/samples", {"video": nan_video[None]}, step=3)
    assert not (tmp_path / "csv").exists()
    assert [f["source"] for f in collected.failures] == ["video writing"]


# ------------------------------------------------------------------------------------------- checkpoints
def test_a_kill_while_saving_leaves_the_previous_checkpoint_intact(tmp_path):
    """The process dies with SIGKILL in the middle of ``torch.save`` (while pickling), as on a kill -9."""
    target = tmp_path / "last.ckpt"
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from consisid_lab.utils.checkpoints import AtomicCheckpointIO

        class DieWhilePickled:
            def __reduce__(self):
                os.kill(os.getpid(), signal.SIGKILL)

        io = AtomicCheckpointIO()
        io.save_checkpoint({{"state_dict": {{"w": torch.ones(3)}}, "step": 1}}, {str(target)!r})
        io.save_checkpoint({{"state_dict": {{"w": torch.zeros(1 << 20)}}, "x": DieWhilePickled()}}, {str(target)!r})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpt = torch.load(target, weights_only=False)
    assert ckpt["step"] == 1 and torch.equal(ckpt["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".ckpt"] == ["last.ckpt"]


def test_resume_from_a_run_dir_skips_a_truncated_last_ckpt(tmp_path, standin_cache, caplog):
    common = ["trainer.val_check_interval=100", "test=false", "callbacks.checkpoint.save_top_k=-1"]
    first = compose_train([*common, "trainer.max_steps=2"], tmp_path / "first", standin_cache)
    train(first)
    ckpts = tmp_path / "first" / "checkpoints"
    last = ckpts / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a kill or a full disk while writing
    resumed = compose_train(
        [*common, "trainer.max_steps=3", f"ckpt_path={tmp_path / 'first'}"], tmp_path / "resumed", standin_cache
    )
    with caplog.at_level(logging.WARNING, logger="consisid_lab.utils.checkpoints"):
        train(resumed)
    assert "skipping checkpoint" in caplog.text and "last.ckpt" in caplog.text
    assert f"resuming from {ckpts / 'step_000002.ckpt'}" in caplog.text
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3


def test_resume_names_every_checkpoint_that_does_not_load(tmp_path):
    from consisid_lab.utils.checkpoints import newest_loadable_checkpoint, resume_checkpoint

    (tmp_path / "checkpoints").mkdir()
    for age, (name, data) in enumerate([("last.ckpt", b"PK\x03\x04 truncated"), ("step_000001.ckpt", b"")]):
        (tmp_path / "checkpoints" / name).write_bytes(data)
        os.utime(tmp_path / "checkpoints" / name, (1e9 - age, 1e9 - age))  # last.ckpt is the newest
    with pytest.raises(FileNotFoundError, match=r"last\.ckpt \(RuntimeError: .*step_000001\.ckpt \(it is empty\)"):
        newest_loadable_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="does not load"):
        resume_checkpoint(tmp_path / "checkpoints" / "last.ckpt")


# ----------------------------------------------------------------------------------------- output dirs
def test_an_output_dir_that_cannot_be_written_fails_before_training(tmp_path, standin_cache):
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import read_write

    cfg = compose_train(["trainer.max_steps=1"], tmp_path / "ok", standin_cache)
    (tmp_path / "a_file").write_text("")
    with read_write(cfg.hydra):
        cfg.hydra.runtime.output_dir = str(tmp_path / "a_file" / "run")  # a path below a file: never writable
    HydraConfig.instance().set_config(cfg)
    with pytest.raises(OutputDirError, match=r"a_file/run cannot be written .*hydra.run.dir"):
        train(cfg)
    assert not (tmp_path / "ok" / "checkpoints").exists()


# ---------------------------------------------------------------------------------- process isolation
def test_a_sweep_survives_a_member_that_segfaults(tmp_path, standin_cache):
    from consisid_lab import report

    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable, "-m", "consisid_lab.train", "-m", *TINY_OVERRIDES, "trainer.max_steps=2", "test=false",
        f"paths.cache_dir={standin_cache}", f"hydra.sweep.dir={sweep}", *_fault("segfault", "1,100"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(standin_cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    crashed, completed = _record(sweep / "0"), _record(sweep / "1")
    assert crashed["status"] == "crashed" and crashed["signal"] == "SIGSEGV" and crashed["exit_code"] == -11
    assert "segmentation fault" in crashed["error"]
    assert "fault_injection.py" in crashed["native_trace"], "faulthandler's Python stacks are kept"
    assert completed["status"] == "completed"
    assert report.main([str(sweep)]) == 0
    assert "| crashed | the run's process killed by SIGSEGV" in (sweep / "report.md").read_text()


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_reaches_the_uninterrupted_metrics(tmp_path, standin_cache):
    from consisid_lab.analysis.run_dirs import read_run

    common = ["trainer.max_steps=4", "trainer.val_check_interval=100"]
    uninterrupted = train(compose_train(common, tmp_path / "full", standin_cache))
    killed = tmp_path / "killed"
    cmd = [
        sys.executable, "-m", "consisid_lab.train", *TINY_OVERRIDES, *common, f"paths.cache_dir={standin_cache}",
        f"hydra.run.dir={killed}", *_fault("sigkill", "2"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(standin_cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    run = read_run(killed)
    assert run.status == "died" and "no longer exists" in run.error and "last heartbeat" in run.error
    resumed = train(compose_train([*common, f"ckpt_path={killed}"], tmp_path / "resumed", standin_cache))
    for key in ("test/facesim", "test/fid", "test/loss"):
        assert resumed[key] == pytest.approx(uninterrupted[key], rel=1e-5, abs=1e-6), key
