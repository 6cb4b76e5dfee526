"""Speed knobs at tiny sizes: exact knobs give identical videos, reassociating ones stay within REASSOC_TOL,
approximate ones within their stated bound, and knobs this machine cannot run are refused before anything loads,
naming the requirement and the nearest knob that works."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch
from conftest import compose_train

from consisid_lab.models.denoiser import build_denoiser
from consisid_lab.models.diffusion import make_scheduler
from consisid_lab.models.knobs import KnobUnavailable, SamplingKnobs, StepCache
from consisid_lab.models.sampling import sample_video

# Float reassociation (another GEMM blocking, another attention kernel) on a float32 video in [-1, 1].
REASSOC_TOL = 1e-4
# The approximate knobs' stated bounds (max abs on the decoded video in [-1, 1]) at these sizes; the identity cost
# at benchmark sizes is what benchmarks/bench_knobs.py measures.
STEP_CACHE_STEPS = 20
STEP_CACHE_SMALL = 0.3  # at 20 steps: some calls served from the cache, at most STEP_CACHE_SMALL_TOL
STEP_CACHE_SMALL_TOL = 1e-3  # measured 1.1e-4 (4 of 40 calls cached)
INT8_TOL = 1e-3  # measured 5e-6
HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
HAS_CXX = any(shutil.which(c) for c in ("c++", "g++", "clang++"))


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    # Every parameter random (the zero-initialised adaLN and injector outputs too): no path is vacuous.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, standin_cache):
    cfg = compose_train(
        ["model.backbone.config.num_layers=4", "model.sampling.num_steps=6"],
        tmp_path_factory.mktemp("knobs_run"),
        standin_cache,
    )
    torch.set_num_threads(1)
    model = build_denoiser(cfg.model).eval()
    _randomise(torch.nn.ModuleList([model.fuser, model.backbone]))
    size = int(cfg.data.height)
    gen = torch.Generator().manual_seed(1)
    face = torch.rand(1, 3, size, size, generator=gen) * 2 - 1
    kps = torch.rand(1, 5, 2, generator=gen) * size
    return model, face, kps, cfg


def run(setup, knobs=None, stats=None, guidance_scale: float = 4.0, steps: int = 6, drops=("text",)) -> torch.Tensor:
    model, face, kps, cfg = setup
    return sample_video(
        model,
        make_scheduler(),
        face,
        kps,
        ["a person smiles"],
        [""],
        num_frames=int(cfg.data.num_frames),
        height=int(cfg.data.height),
        width=int(cfg.data.width),
        num_steps=steps,
        guidance_scale=guidance_scale,
        use_dynamic_cfg=False,
        generator=torch.Generator().manual_seed(7),
        device="cpu",
        knobs=knobs,
        stats=stats,
        guidance_drops=drops,
    )


@pytest.fixture(scope="module")
def exact(setup):
    # The exact sampler: every knob off, the K/V memo too.
    return run(setup, SamplingKnobs(identity_kv_cache=False))


def test_identity_kv_cache_is_bitwise_exact_and_computes_once(setup, exact):
    stats = {}
    got = run(setup, SamplingKnobs(identity_kv_cache=True), stats=stats)
    assert torch.equal(got, exact)
    injector = setup[0].backbone.injector
    # once per injection layer for the cond batch (the uncond call has the same batch): not once per step
    assert stats["identity_kv_computed"] == len(injector.layers)
    assert stats["model_calls"] == 12


def test_identity_changes_the_video(setup, exact):
    # The K/V test is not vacuous: the identity route moves the output.
    model, face, kps, cfg = setup
    other = (setup[0], -face, kps, cfg)
    assert (run(other, SamplingKnobs(identity_kv_cache=False)) - exact).abs().max() > 1e-3


def test_identity_guidance_drops_both_routes_in_the_unconditional_branch(setup):
    # At scale 0 the sampler follows the unconditional branch alone: with the identity dropped it cannot see the
    # face, with the caption dropped it still does.
    model, face, kps, cfg = setup
    other = (model, -face, kps, cfg)
    plain = SamplingKnobs(identity_kv_cache=False)
    for knobs in (plain, SamplingKnobs(identity_kv_cache=True), SamplingKnobs(cfg_batching=True)):
        a = run(setup, knobs, guidance_scale=0.0, drops=("identity",))
        b = run(other, knobs, guidance_scale=0.0, drops=("identity",))
        assert (a - b).abs().max() <= REASSOC_TOL
    assert (run(setup, plain, guidance_scale=0.0) - run(other, plain, guidance_scale=0.0)).abs().max() > 1e-3


def test_identity_guidance_knobs_agree_and_differ_from_text_guidance(setup, exact):
    stats = {}
    exact_id = run(setup, SamplingKnobs(identity_kv_cache=False), drops=("identity",))
    cached = run(setup, SamplingKnobs(identity_kv_cache=True), stats=stats, drops=("identity",))
    assert torch.equal(cached, exact_id)
    # K/V once per layer for the identity and once for the zeroed identity
    assert stats["identity_kv_computed"] == 2 * len(setup[0].backbone.injector.layers)
    batched = run(setup, SamplingKnobs(cfg_batching=True), drops=("identity",))
    assert (batched - exact_id).abs().max() <= REASSOC_TOL
    both = run(setup, SamplingKnobs(identity_kv_cache=False), drops=("text", "identity"))
    assert (exact_id - exact).abs().max() > 1e-3 and (both - exact).abs().max() > 1e-3


def test_guidance_drops_must_name_text_or_identity(setup):
    with pytest.raises(ValueError, match=r"guidance_drops=\['face'\]"):
        run(setup, drops=("face",))


def test_cfg_batching_within_reassociation_bound(setup, exact):
    stats = {}
    got = run(setup, SamplingKnobs(cfg_batching=True), stats=stats)
    assert stats["model_calls"] == 6  # one batched call per step instead of two
    assert (got - exact).abs().max() <= REASSOC_TOL


@pytest.mark.parametrize("attention", ["math", "flash"])
def test_sdpa_kernels_on_cpu_within_reassociation_bound(setup, exact, attention):
    got = run(setup, SamplingKnobs(attention=attention))
    assert (got - exact).abs().max() <= REASSOC_TOL


def test_fused_qkv_within_bound_and_undone(setup, exact):
    backbone = setup[0].backbone
    keys = set(backbone.state_dict())
    got = run(setup, SamplingKnobs(fuse_qkv=True))
    assert (got - exact).abs().max() <= REASSOC_TOL
    # afterwards the model is the unfused one again (validation samples from the training model)
    assert set(backbone.state_dict()) == keys
    proc = backbone.blocks[0].attn1.processor
    assert type(proc).__name__ == "CogVideoXAttnProcessor2_0"


def test_kernel_processor_equals_diffusers_processor(setup):
    # The processor sage / flash3 run through, with torch's sdpa plugged in, is diffusers' attention.
    from consisid_lab.models.knobs import KernelAttnProcessor, sdpa_attention

    attn = setup[0].backbone.blocks[1].attn1
    gen = torch.Generator().manual_seed(3)
    video, text = torch.randn(2, 20, 32, generator=gen), torch.randn(2, 5, 32, generator=gen)
    rot = setup[0].backbone.rotary_embedding(5, 4, 4)
    with torch.no_grad():
        expected = attn.processor(attn, video, text, image_rotary_emb=rot)
        got = KernelAttnProcessor(sdpa_attention)(attn, video, text, image_rotary_emb=rot)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=0)


def test_step_cache_zero_threshold_is_exact(setup, exact):
    stats = {}
    got = run(setup, SamplingKnobs(identity_kv_cache=False, step_cache=0.0), stats=stats)
    assert stats["step_cache_hits"] == 0
    assert torch.equal(got, exact)


def test_step_cache_skips_steps_within_its_bound(setup):
    n = STEP_CACHE_STEPS
    exact = run(setup, SamplingKnobs(identity_kv_cache=False), steps=n)
    small, large = {}, {}
    got = run(setup, SamplingKnobs(step_cache=STEP_CACHE_SMALL), stats=small, steps=n)
    assert small["step_cache_hits"] > 0
    assert 0 < (got - exact).abs().max() <= STEP_CACHE_SMALL_TOL
    loose = run(setup, SamplingKnobs(step_cache=1.0), stats=large, steps=n)
    # a looser threshold serves more calls from the cache (never the first of each branch: cond and uncond) and
    # moves the video more
    assert small["step_cache_hits"] < large["step_cache_hits"] <= 2 * n - 2
    assert (loose - exact).abs().max() >= (got - exact).abs().max()
    assert torch.isfinite(loose).all()


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True])
def test_step_cache_threshold_out_of_range(bad):
    with pytest.raises(ValueError, match=r"outside \[0.0, 1.0\]"):
        SamplingKnobs(step_cache=bad)
    with pytest.raises(ValueError, match=r"outside \[0.0, 1.0\]"):
        StepCache(bad)


def test_unknown_knob_and_values_refused():
    with pytest.raises(ValueError, match="unknown sampling.knobs.*known"):
        SamplingKnobs.from_config({"fuse_qvk": True})
    with pytest.raises(ValueError, match="attention='xformers' is unknown"):
        SamplingKnobs(attention="xformers")
    with pytest.raises(ValueError, match="quantize='int4' is unknown"):
        SamplingKnobs(quantize="int4")


@pytest.mark.parametrize(
    ("knobs", "needs", "nearest"),
    [
        ({"attention": "efficient"}, "CUDA GPU", "attention=flash"),
        ({"attention": "cudnn"}, "CUDA GPU", "attention=flash"),
        ({"attention": "sage"}, "sageattention", "attention=flash"),
        ({"attention": "flash3"}, "flash_attn_interface", "attention=flash"),
        ({"quantize": "fp8"}, "compute capability >= 8.9", "quantize=int8"),
    ],
)
def test_cuda_only_knobs_refused_on_cpu(knobs, needs, nearest):
    with pytest.raises(KnobUnavailable, match=needs) as err:
        SamplingKnobs(**knobs).check("cpu")
    assert nearest in str(err.value)


def test_refused_before_the_model_is_loaded(tmp_path, monkeypatch):
    # generate checks the knobs before it reads the checkpoint: a missing checkpoint is never reached.
    from omegaconf import OmegaConf

    from consisid_lab import generate as gen_task

    cfg = OmegaConf.create(
        {
            "model_path": None,
            "ckpt_path": str(tmp_path / "missing.ckpt"),
            "device": "cpu",
            "dtype": "float32",
            "seed": 0,
            "knobs": {"attention": "sage"},
        }
    )
    monkeypatch.setattr(gen_task, "generate_from_checkpoint", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(KnobUnavailable, match="sageattention"):
        gen_task.generate(cfg)


@pytest.mark.skipif(not HAS_TORCHAO, reason="torchao not installed (pip install 'consisid_lab[fast]')")
def test_int8_linears_within_bound_and_undone(setup, exact):
    backbone = setup[0].backbone
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    got = run(setup, SamplingKnobs(quantize="int8"))
    dev = (got - exact).abs().max()
    assert 0 < dev <= INT8_TOL
    after = backbone.state_dict()
    assert all(type(after[k]) is torch.Tensor and torch.equal(after[k], v) for k, v in before.items())


def test_int8_without_torchao_names_the_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(KnobUnavailable, match=r"torchao.*consisid_lab\[fast\]"):
        SamplingKnobs(quantize="int8").check("cpu")


def test_compile_without_toolchain_is_refused(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(KnobUnavailable, match="C\\+\\+ compiler.*compile=false"):
        SamplingKnobs(compile=True).check("cpu")


def test_compile_wires_and_is_undone(setup, monkeypatch):
    # The wiring: every block compiled in place for the call, eager again afterwards. torch.compile itself is
    # replaced by a recorder (inductor on one CPU thread takes minutes); bench_knobs runs the real one.
    model = setup[0]
    seen = []

    def fake_compile(self, **kwargs):
        seen.append((self, kwargs))
        self._compiled_call_impl = self._call_impl

    monkeypatch.setattr(torch.nn.Module, "compile", fake_compile)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/g++")
    during = []
    from consisid_lab.models import knobs as knobs_mod

    with knobs_mod.applied(SamplingKnobs(compile=True), model, "cpu"):
        during = [b._compiled_call_impl is not None for b in model.backbone.blocks]
    assert [b for b, _ in seen] == list(model.backbone.blocks)
    assert all(during) and all(b._compiled_call_impl is None for b in model.backbone.blocks)
    assert all(kw.get("dynamic") is False for _, kw in seen)
