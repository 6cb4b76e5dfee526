"""Full-scale GPU benchmark: our ConsisID composition beside diffusers' in the same process, random weights.

    python benchmarks/bench_gpu.py [--train-steps N] [--sample-steps N] [--frames 49 --height 480 --width 720]

Two measurements, each for ours and for diffusers' ``ConsisIDTransformer3DModel`` / ``ConsisIDPipeline`` sharing
the very same weight tensors (so memory baselines are equal):

- training step: identity modules (fuser + cross-attentions, fp32) trainable, the CogVideoX backbone frozen in
  bf16, gradient checkpointing over the DiT blocks, bf16 autocast, AdamW; v-prediction MSE on random latents;
- sampling steps with classifier-free guidance (batched cond + uncond), bf16, prompt embeddings given (no T5 on
  the GPU), the VAE encoding the reference image; reported per denoising step.

Prints one JSON object: seconds per step, peak GPU memory (GiB) and ours/diffusers ratios. Reference figures on
one H100 (released model): training 3.64 s/step at 35.8 GiB; sampling 1.87 s/step at 27.1 GiB.
``--config tiny --device cpu`` runs the same code at toy sizes (a smoke test, no CUDA needed).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

GIB = 1024**3
REFERENCE_H100 = {"train_s_per_step": 3.64, "train_peak_gib": 35.8, "sample_s_per_step": 1.87, "sample_peak_gib": 27.1}

# Toy sizes for the CPU smoke test: the released structure with small widths.
TINY_CONFIG: dict[str, Any] = {
    "num_attention_heads": 3,
    "attention_head_dim": 16,
    "in_channels": 8,
    "out_channels": 4,
    "time_embed_dim": 16,
    "text_embed_dim": 16,
    "num_layers": 4,
    "sample_width": 6,
    "sample_height": 4,
    "sample_frames": 9,
    "patch_size": 2,
    "max_text_seq_length": 8,
    "temporal_compression_ratio": 4,
    "use_rotary_positional_embeddings": True,
    "use_learned_positional_embeddings": True,
    "is_train_face": True,
    "is_kps": False,
    "cross_attn_interval": 2,
    "cross_attn_dim_head": 8,
    "cross_attn_num_heads": 2,
    "LFE_id_dim": 24,
    "LFE_vit_dim": 16,
    "LFE_depth": 2,
    "LFE_dim_head": 8,
    "LFE_num_heads": 2,
    "LFE_num_id_token": 3,
    "LFE_num_querie": 4,
    "LFE_output_dim": 32,
    "LFE_ff_mult": 2,
    "LFE_num_scale": 1,
    "local_face_scale": 1.0,
}
TINY_VAE: dict[str, Any] = {
    "down_block_types": ("CogVideoXDownBlock3D",) * 3,
    "up_block_types": ("CogVideoXUpBlock3D",) * 3,
    "block_out_channels": (8, 8, 8),
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "temporal_compression_ratio": 4,
}


# Sampling knob sets timed beside diffusers' pipeline (consisid_lab.models.knobs.SamplingKnobs fields). A set this
# machine cannot run is reported with the reason instead of a time.
KNOB_SETS: dict[str, dict[str, Any]] = {
    "exact": {"identity_kv_cache": False},
    "identity_kv_cache": {"identity_kv_cache": True},
    "attention_flash": {"attention": "flash"},
    "attention_cudnn": {"attention": "cudnn"},
    "attention_efficient": {"attention": "efficient"},
    "attention_sage": {"attention": "sage"},
    "attention_flash3": {"attention": "flash3"},
    "fuse_qkv": {"fuse_qkv": True},
    "compile": {"compile": True},
    "fp8": {"quantize": "fp8"},
    "step_cache_0.1": {"step_cache": 0.1},
    "step_cache_0.2": {"step_cache": 0.2},
    "exact_fast": {"attention": "cudnn", "fuse_qkv": True, "compile": True},
    "fast": {"attention": "cudnn", "fuse_qkv": True, "compile": True, "quantize": "fp8", "step_cache": 0.1},
}
# Training knob sets: gradient checkpointing policy (model.gradient_checkpointing) and fused AdamW.
TRAIN_KNOB_SETS: dict[str, dict[str, Any]] = {
    "checkpoint_every_2": {"checkpointing": 2},
    "checkpoint_attention": {"checkpointing": "attention"},
    "fused_adamw": {"fused": True},
    "every_2_fused": {"checkpointing": 2, "fused": True},
}


def _chosen(spec: str, sets: dict[str, Any]) -> list[str]:
    if spec == "none":
        return []
    names = list(sets) if spec == "all" else [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in sets]
    if unknown:
        raise SystemExit(f"unknown knob sets {unknown}; known: {sorted(sets)}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("released", "tiny"), default="released")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--frames", type=int, default=None, help="default: 49 (released), 9 (tiny)")
    parser.add_argument("--height", type=int, default=None, help="default: 480 (released), 16 (tiny)")
    parser.add_argument("--width", type=int, default=None, help="default: 720 (released), 24 (tiny)")
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--sample-steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-sample", action="store_true")
    parser.add_argument(
        "--knobs",
        default="all",
        help="sampling knob sets to time beside diffusers (comma-separated names of KNOB_SETS, 'all' or 'none')",
    )
    parser.add_argument(
        "--train-knobs",
        default="all",
        help="training knob sets (comma-separated names of TRAIN_KNOB_SETS, 'all' or 'none')",
    )
    args = parser.parse_args(argv)
    defaults = {"released": (49, 480, 720), "tiny": (9, 16, 24)}[args.config]
    for name, value in zip(("frames", "height", "width"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.train_steps < 1 or args.sample_steps < 1:
        parser.error("--train-steps and --sample-steps must be >= 1")
    return args


def require_device(device: str) -> torch.device:
    """Fail fast (before building anything) when the benchmark's device is not there."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "bench_gpu needs a CUDA GPU (none is visible to torch); run it on a GPU machine, or run the toy-size "
            "smoke test with `--config tiny --device cpu`"
        )
    return dev


# ----------------------------------------------------------------------------------------------- models
def _compute_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _randomise(module: torch.nn.Module, gen: torch.Generator, std: float = 0.02) -> None:
    """Random values in place (device-side: 6 B parameters initialise in seconds on a GPU)."""
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=gen, device=t.device, dtype=torch.float32).mul_(std))


def build_models(config: dict[str, Any], device: torch.device, seed: int) -> tuple[Any, Any]:
    """diffusers' ``ConsisIDTransformer3DModel`` with random weights (backbone bf16, identity modules fp32) and our
    composition sharing its tensors (``from_diffusers``: no second copy in memory)."""
    from diffusers import ConsisIDTransformer3DModel

    from consisid_lab.models.consisid import from_diffusers

    with torch.device("meta"):
        ref = ConsisIDTransformer3DModel(**config)
    ref.to_empty(device=device)
    if device.type == "cuda":  # the CPU smoke test stays in float32
        ref.to(torch.bfloat16)
        ref.local_facial_extractor.float()
        ref.perceiver_cross_attention.float()
    _randomise(ref, torch.Generator(device=device).manual_seed(seed))
    ref.eval()
    ours = from_diffusers(ref).eval()
    return ref, ours


def identity_parameters(model: torch.nn.Module, diffusers_layout: bool) -> list[torch.nn.Parameter]:
    if diffusers_layout:
        prefixes = ("local_facial_extractor.", "perceiver_cross_attention.")
    else:
        prefixes = ("fuser.", "backbone.injector.")
    return [p for n, p in model.named_parameters() if n.startswith(prefixes)]


def inputs(config: dict[str, Any], args: argparse.Namespace, device: torch.device, batch: int) -> dict[str, Any]:
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    f = (args.frames - 1) // config["temporal_compression_ratio"] + 1
    spatial = 8 if args.config == "released" else 4
    h, w = args.height // spatial, args.width // spatial

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device)

    return {
        "latents": randn(batch, f, config["out_channels"], h, w),
        "image_latents": randn(batch, f, config["in_channels"] - config["out_channels"], h, w),
        "text": randn(batch, config["max_text_seq_length"], config["text_embed_dim"]).to(_compute_dtype(device)),
        "id_cond": randn(1, config["LFE_id_dim"]),
        "id_vit_hidden": [randn(1, 577 if args.config == "released" else 9, config["LFE_vit_dim"])
                          for _ in range(config["LFE_num_scale"])],
        "shape": (f, h, w),
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], steps: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """(seconds per call, peak GPU memory in GiB; 0 on the CPU) after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else 0.0
    return seconds, peak


def bench_training(ref: Any, ours: Any, config: dict, args: argparse.Namespace, device: torch.device) -> dict:
    from consisid_lab.models.consisid import consisid_forward
    from consisid_lab.models.diffusion import add_noise, make_scheduler, v_target

    scheduler = make_scheduler()
    data = inputs(config, args, device, batch=1)
    f, h, w = data["shape"]
    rotary = ours.backbone.rotary_embedding(f, h, w, device=device)
    x0 = data["latents"]
    noise = torch.randn_like(x0)
    t = torch.full((1,), 500, device=device, dtype=torch.long)
    x_t = add_noise(scheduler, x0, noise, t)
    target = v_target(scheduler, x0, noise, t)
    inp = torch.cat([x_t, data["image_latents"]], dim=2)

    from consisid_lab.models.denoiser import checkpoint_policy

    ref.enable_gradient_checkpointing()
    results = {}
    sides = [("diffusers", ref, True, {}), ("ours", ours, False, {})]
    sides += [(f"ours[{k}]", ours, False, TRAIN_KNOB_SETS[k]) for k in _chosen(args.train_knobs, TRAIN_KNOB_SETS)]
    for name, model, diffusers_layout, knobs in sides:
        if not diffusers_layout:
            ours.backbone.enable_gradient_checkpointing(**checkpoint_policy(knobs.get("checkpointing", True)))
        model.requires_grad_(False)
        params = identity_parameters(model, diffusers_layout)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=args.lr, **({"fused": True} if knobs.get("fused") else {}))
        model.train()

        def step(model=model, opt=opt, diffusers_layout=diffusers_layout) -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                kwargs = {"id_cond": data["id_cond"], "id_vit_hidden": data["id_vit_hidden"]}
                if diffusers_layout:
                    out = model(inp, data["text"], t, image_rotary_emb=rotary, return_dict=False, **kwargs)[0]
                else:
                    out = consisid_forward(model, inp, data["text"], t, **kwargs)
                loss = (out.float() - target).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        results[name] = timed(step, args.train_steps, args.warmup, device)
        print(f"{name}: {results[name][0]:.4f} s/step, {results[name][1]:.2f} GiB", flush=True)
        # Free this side's gradients and optimizer state before the other side is measured.
        for p in params:
            p.grad = None
        del step, opt
        model.eval().requires_grad_(False)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {**_summary(results, "train"), **_knob_rows(results, "train")}


def _knob_rows(results: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Per knob set: seconds per step, peak GiB and the ratios against diffusers (or why it did not run)."""
    ref_s, ref_m = results["diffusers"]
    rows = {}
    for name, value in results.items():
        if not name.startswith("ours["):
            continue
        knob = name[len("ours[") : -1]
        if isinstance(value, str):
            rows[knob] = {"skipped": value}
            continue
        sec, mem = value
        rows[knob] = {
            "s_per_step": round(sec, 4),
            "peak_gib": round(mem, 3),
            "time_ratio": round(sec / ref_s, 3) if ref_s > 0 else None,
            "memory_ratio": round(mem / ref_m, 3) if ref_m > 0 else None,
        }
    return {f"{prefix}_knobs": rows}


def _tiny_or_released_vae(args: argparse.Namespace, device: torch.device, folder: Path) -> Any:
    """A random CogVideoX VAE saved in the published layout and loaded through our codec."""
    from diffusers import AutoencoderKLCogVideoX

    from consisid_lab.models.vae import CogVideoXCodec

    vae = AutoencoderKLCogVideoX(**(TINY_VAE if args.config == "tiny" else {}))
    _randomise(vae, torch.Generator().manual_seed(args.seed + 2))
    vae.save_pretrained(folder / "vae")
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    return CogVideoXCodec(str(folder), subfolder="vae", dtype=dtype).to(device)


def bench_sampling(ref: Any, ours: Any, config: dict, args: argparse.Namespace, device: torch.device) -> dict:
    from diffusers import ConsisIDPipeline
    from PIL import Image

    from consisid_lab.generate import sample_published
    from consisid_lab.models.diffusion import make_scheduler
    from consisid_lab.models.published import PublishedModel

    dtype = _compute_dtype(device)
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        codec = _tiny_or_released_vae(args, device, Path(tmp))
    model = PublishedModel(Path(tmp), ours, codec, None, make_scheduler(), dict(config))
    pipe = ConsisIDPipeline(
        tokenizer=None, text_encoder=None, vae=codec.vae, transformer=ref, scheduler=make_scheduler()
    )
    pipe.set_progress_bar_config(disable=True)
    data = inputs(config, args, device, batch=1)
    text, negative = data["text"].to(dtype), torch.zeros_like(data["text"]).to(dtype)
    image = Image.new("RGB", (args.width, args.height), (200, 180, 160))
    sizes = {"num_frames": args.frames, "height": args.height, "width": args.width}
    steps = args.sample_steps

    def run_diffusers() -> None:
        pipe(
            image=image,
            prompt_embeds=text,
            negative_prompt_embeds=negative,
            num_inference_steps=steps,
            guidance_scale=6.0,
            use_dynamic_cfg=True,
            generator=torch.Generator().manual_seed(args.seed),
            output_type="latent",
            id_cond=data["id_cond"].to(dtype),
            id_vit_hidden=[v.to(dtype) for v in data["id_vit_hidden"]],
            **sizes,
        )

    def run_ours(knobs: dict[str, Any] | None = None) -> None:
        sample_published(
            model,
            image,
            data["id_cond"].to(dtype),
            [v.to(dtype) for v in data["id_vit_hidden"]],
            text,
            negative,
            num_steps=steps,
            guidance_scale=6.0,
            use_dynamic_cfg=True,
            generator=torch.Generator().manual_seed(args.seed),
            device=device,
            dtype=dtype,
            decode=False,
            knobs=knobs,
            **sizes,
        )

    from consisid_lab.models.knobs import KnobUnavailable, SamplingKnobs

    results: dict[str, Any] = {}
    runs: list[tuple[str, Callable[[], None]]] = [("diffusers", run_diffusers), ("ours", run_ours)]
    for k in _chosen(args.knobs, KNOB_SETS):
        runs.append((f"ours[{k}]", lambda k=k: run_ours(KNOB_SETS[k])))
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
        for name, fn in runs:
            if name.startswith("ours["):
                try:  # refused before anything runs when this machine lacks what the knob needs
                    SamplingKnobs.from_config(KNOB_SETS[name[5:-1]]).check(device)
                except KnobUnavailable as err:
                    results[name] = str(err)
                    print(f"{name}: skipped ({err})", flush=True)
                    continue
            # a compiling knob set compiles during its warm-up call, which is not timed
            seconds, peak = timed(fn, 1, max(args.warmup, 1 if "compile" in name else 0), device)
            results[name] = (seconds / steps, peak)
            print(f"{name}: {seconds / steps:.4f} s/step, {peak:.2f} GiB", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {**_summary(results, "sample"), **_knob_rows(results, "sample")}


def _summary(results: dict[str, tuple[float, float]], prefix: str) -> dict[str, float | None]:
    (ours_s, ours_m), (ref_s, ref_m) = results["ours"], results["diffusers"]
    return {
        f"{prefix}_s_per_step": round(ours_s, 4),
        f"{prefix}_peak_gib": round(ours_m, 3),
        f"{prefix}_s_per_step_diffusers": round(ref_s, 4),
        f"{prefix}_peak_gib_diffusers": round(ref_m, 3),
        f"{prefix}_time_ratio": round(ours_s / ref_s, 3) if ref_s > 0 else None,
        f"{prefix}_memory_ratio": round(ours_m / ref_m, 3) if ref_m > 0 else None,  # no GPU memory on the CPU
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = require_device(args.device)
    from consisid_lab.models.published import RELEASED_CONFIG

    config = dict(RELEASED_CONFIG if args.config == "released" else TINY_CONFIG)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    ref, ours = build_models(config, device, args.seed)
    report: dict[str, Any] = {
        "config": args.config,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "video": f"{args.frames}x{args.height}x{args.width}",
        "parameters": sum(p.numel() for p in ours.parameters()),
    }
    if not args.skip_train:
        report.update(bench_training(ref, ours, config, args, device))
    if not args.skip_sample:
        report.update(bench_sampling(ref, ours, config, args, device))
    if args.config == "released":
        report["reference_h100"] = REFERENCE_H100
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
