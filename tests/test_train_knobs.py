"""Training knobs at tiny sizes: selective checkpointing recomputes only what it names and keeps the gradients,
fused AdamW is asked for only where torch has it, the frozen backbone is stored in bfloat16 beside float32
trainable modules."""

from __future__ import annotations

import pytest
import torch

from consisid_lab.models import train_knobs
from consisid_lab.models.denoiser import build_denoiser, checkpoint_policy
from consisid_lab.utils.instantiate import instantiate


def _inputs(model, cfg, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    size, frames = int(cfg.data.height), int(cfg.data.num_frames)
    f, c, h, w = model.vae.latent_shape(frames, size, size)
    face = torch.rand(1, 3, size, size, generator=gen) * 2 - 1
    kps = torch.rand(1, 5, 2, generator=gen) * size
    with torch.no_grad():
        cond = model.conditions(face, kps, ["a person smiles"], f)
    return torch.randn(1, f, c, h, w, generator=gen), torch.tensor([400]), cond


def _grads_and_calls(model, x, t, cond):
    # pre-hooks: a non-reentrant recomputation stops once it has what the backward needs (no forward hook)
    calls = {"block": [0] * model.backbone.num_layers, "attn": [0] * model.backbone.num_layers}
    hooks = []
    for i, block in enumerate(model.backbone.blocks):
        hooks.append(
            block.register_forward_pre_hook(lambda *a, i=i: calls["block"].__setitem__(i, calls["block"][i] + 1))
        )
        hooks.append(
            block.attn1.register_forward_pre_hook(lambda *a, i=i: calls["attn"].__setitem__(i, calls["attn"][i] + 1))
        )
    model.zero_grad(set_to_none=True)
    model(x, t, cond).square().mean().backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad.clone() for n, p in model.backbone.named_parameters() if p.grad is not None}
    return grads, calls


@pytest.fixture
def tiny(train_cfg):
    cfg = train_cfg("model.backbone.config.num_layers=4")
    model = build_denoiser(cfg.model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random everywhere (zero-initialised outputs too): every gradient is non-trivial
        for p in model.backbone.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model, cfg


@pytest.mark.parametrize(
    ("policy", "block_calls", "attn_calls"),
    [
        (False, [1, 1, 1, 1], [1, 1, 1, 1]),
        (True, [2, 2, 2, 2], [2, 2, 2, 2]),
        (2, [2, 1, 2, 1], [2, 1, 2, 1]),
        (3, [2, 1, 1, 2], [2, 1, 1, 2]),
        ("attention", [1, 1, 1, 1], [2, 2, 2, 2]),
    ],
)
def test_selective_checkpointing_recomputes_what_it_names_with_the_same_gradients(
    tiny, policy, block_calls, attn_calls
):
    model, cfg = tiny
    x, t, cond = _inputs(model, cfg)
    reference, _ = _grads_and_calls(model, x, t, cond)
    model.backbone.enable_gradient_checkpointing(**checkpoint_policy(policy))
    grads, calls = _grads_and_calls(model, x, t, cond)
    assert calls == {"block": block_calls, "attn": attn_calls}
    assert grads.keys() == reference.keys() and len(grads) > 0
    for name, g in grads.items():
        torch.testing.assert_close(g, reference[name], atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("bad", [0, -2, "ffn", 1.5])
def test_checkpoint_policy_refuses_bad_values(bad):
    with pytest.raises(ValueError, match="gradient_checkpointing=.*'attention'"):
        checkpoint_policy(bad)


def test_fused_adamw_in_the_module_and_refused_where_torch_has_none(train_cfg, monkeypatch):
    cfg = train_cfg("model.optimizer.fused=true")
    module = instantiate(cfg.model)
    opt = module.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    assert all(g["fused"] for g in opt.param_groups)
    monkeypatch.setattr(train_knobs, "fused_supported_devices", lambda: ["cuda"])
    with pytest.raises(ValueError, match=r"no fused AdamW on \['cpu'\].*fused=false"):
        module.configure_optimizers()
    with pytest.raises(ValueError, match="fused='yes'"):
        train_knobs.adamw_fused_options("yes", [])


def test_frozen_backbone_in_bf16_trainable_in_fp32(train_cfg):
    cfg = train_cfg("model.frozen_dtype=bfloat16", "model.trainable=[fuser,backbone.injector]")
    module = instantiate(cfg.model)
    params = dict(module.denoiser.named_parameters())
    backbone = {n: p for n, p in params.items() if n.startswith("backbone.")}
    injector = {n for n in backbone if n.startswith("backbone.injector.")}
    assert injector and all(backbone[n].dtype == torch.float32 for n in injector)
    assert all(p.dtype == torch.bfloat16 for n, p in backbone.items() if n not in injector)
    assert all(p.dtype == torch.float32 for n, p in params.items() if n.startswith("fuser."))
    # a training forward under bf16 autocast: float32 gradients on the trainable modules only
    model = module.denoiser
    x, t, cond = _inputs(model, cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, t, cond).float().square().mean()
    loss.backward()
    grads = {n for n, p in params.items() if p.grad is not None}
    assert grads and grads <= set(module._optimized)
    assert all(params[n].grad.dtype == torch.float32 for n in grads if n in injector)
    with pytest.raises(ValueError, match="trainer.precision=bf16-mixed"):
        train_knobs.check_frozen_precision(module.frozen_dtype, "32-true")
    with pytest.raises(ValueError, match="frozen_dtype='int8' is unknown"):
        train_knobs.frozen_dtype("int8")


def test_training_compile_compiles_every_block_in_place_and_keeps_the_keys(train_cfg, monkeypatch):
    from torch import nn

    compiled = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: compiled.append((self, kw)))
    module = instantiate(train_cfg("model.compile_blocks=true").model)
    keys = set(module.state_dict())
    module.setup("fit")
    blocks = list(module.denoiser.backbone.blocks)
    assert [m for m, _ in compiled] == blocks and all(kw == {"dynamic": False} for _, kw in compiled)
    module.setup("fit")  # a second fit stage does not compile twice
    assert len(compiled) == len(blocks) and set(module.state_dict()) == keys


def test_training_compile_and_fp8_are_refused_where_they_cannot_run(train_cfg, monkeypatch):
    from consisid_lab.models import knobs
    from consisid_lab.models.knobs import KnobUnavailable

    module = instantiate(train_cfg("model.fp8_training=true").model)
    with pytest.raises(KnobUnavailable, match="fp8_training=true needs a CUDA GPU.*frozen_dtype=bfloat16"):
        module.setup("fit")
    monkeypatch.setattr(knobs.shutil, "which", lambda name: None)  # no C++ compiler on the PATH
    module = instantiate(train_cfg("model.compile_blocks=true").model)
    with pytest.raises(KnobUnavailable, match="C\\+\\+ compiler"):
        module.setup("fit")
