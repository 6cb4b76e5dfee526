#!/usr/bin/env bash
# Study 2: every claim of claims.yaml on the embedded benchmark, paired seeds, then the report with verdicts.
# Resumable: the sweep dir is fixed, so running this again skips completed members and resumes the others.
# CPU scale (2 cores, about 85 minutes): STEPS=200, SEEDS=0,1,2. On a GPU: STEPS=3000 SEEDS=0,1,2,3,4 and drop OMP_NUM_THREADS.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=experiments/study2_frequency_claims
SWEEP=${SWEEP:-$OUT/sweep}
STEPS=${STEPS:-200}
SEEDS=${SEEDS:-0,1,2}
EXPERIMENTS=${EXPERIMENTS:-full,no_global,no_local,no_keypoints,inject_after_block,inject_attn_input,arcface_penultimate,arcface_last,arcface_only,clip_only,no_mask_loss,no_cross_face,coarse_to_fine}
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} .venv/bin/python -m consisid_lab.train -m hydra/launcher=local_parallel \
  "+experiment=$EXPERIMENTS" "seed=$SEEDS" \
  trainer.max_steps="$STEPS" trainer.val_check_interval=$((STEPS / 3)) model.sampling.test_batches=2 \
  logger=csv "hydra.sweep.dir=$SWEEP"
.venv/bin/python -m consisid_lab.report "$SWEEP" --claims "$OUT/claims.yaml" --out "$OUT"
# Fig. 7 analogue on the faces found in the generated videos (seed 0 runs).
SEED0=$(grep -l '"seed": 0' "$SWEEP"/*/metrics.json | xargs -n1 dirname)
.venv/bin/python -m consisid_lab.analyze $SEED0 --out "$OUT/figures"
