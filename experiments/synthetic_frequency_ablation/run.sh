#!/usr/bin/env bash
# The first study on the embedded benchmark: the route, ArcFace-layer, keypoint and injection-place ablations,
# 3 seeds each, at a CPU scale (32 x 32, 9 frames, 250 steps), then the ablation table and the Fig. 7 analogue.
# On a GPU, raise trainer.max_steps and the data size and drop OMP_NUM_THREADS. Interrupted? Run this script
# again: the sweep dir is fixed, so completed members are skipped and unfinished ones resume from last.ckpt.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=experiments/synthetic_frequency_ablation
SWEEP=${SWEEP:-$OUT/sweep}
EXPERIMENTS=${EXPERIMENTS:-consisid,full,no_global,no_local,no_keypoints,arcface_only,clip_only,arcface_last,inject_after_block,inject_attn_input}
OMP_NUM_THREADS=1 .venv/bin/python -m consisid_lab.train -m hydra/launcher=local_parallel \
  "+experiment=$EXPERIMENTS" seed=0,1,2 \
  trainer.max_steps=250 trainer.val_check_interval=250 model.sampling.test_batches=1 \
  logger=csv "hydra.sweep.dir=$SWEEP"
.venv/bin/python -m consisid_lab.report "$SWEEP" --claims "$OUT/claims.yaml" --out "$OUT"
# Fig. 7 analogue: one panel per experiment (seed 0 runs).
SEED0=$(grep -l '"seed": 0' "$SWEEP"/*/metrics.json | xargs -n1 dirname)
.venv/bin/python -m consisid_lab.analyze $SEED0 --out "$OUT/figures"
