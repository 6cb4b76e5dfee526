"""Training throughput of the default experiment on CPU: samples/s and peak memory (RSS).

    python benchmarks/bench_train.py [--steps N] [--threads T] [hydra overrides...]

Builds the composition from `conf/train.yaml` exactly as `python -m consisid_lab.train` does, then times
optimisation steps (forward, backward, AdamW) on batches from the synthetic datamodule, after warm-up.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch

CONF = Path(__file__).resolve().parents[1] / "conf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from consisid_lab.utils.instantiate import instantiate

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=args.overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = tempfile.mkdtemp(prefix="bench_train_")
    HydraConfig.instance().set_config(cfg)

    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    model = instantiate(cfg.model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loader = iter(datamodule.train_dataloader())
    batches = [next(loader) for _ in range(min(args.steps + args.warmup, 8))]

    def step(i: int) -> None:
        loss, _ = model.compute_loss(batches[i % len(batches)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(args.warmup):
        step(i)
    start = time.perf_counter()
    for i in range(args.steps):
        step(i)
    seconds = time.perf_counter() - start
    batch_size = batches[0].batch_size
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = {
        "experiment": cfg.experiment_name,
        "threads": args.threads,
        "batch_size": batch_size,
        "frames": int(batches[0].video.shape[1]),
        "resolution": list(batches[0].video.shape[-2:]),
        "trainable_params": trainable,
        "s_per_step": seconds / args.steps,
        "samples_per_s": batch_size * args.steps / seconds,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
