#!/usr/bin/env bash
# Study 2: every claim of claims.yaml on the embedded benchmark, paired seeds, then the report with verdicts.
# Resumable: the sweep dirs are fixed, so running this again skips completed members and resumes the others.
# CPU scale (2 cores, two members at a time on one thread each; under 90 minutes): STEPS=200, SEEDS=0,1,2.
# On a GPU: STEPS=3000 SEEDS=0,1,2,3,4 OMP_NUM_THREADS=8 N_JOBS=1 bash experiments/study2_frequency_claims/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=experiments/study2_frequency_claims
SWEEP=${SWEEP:-$OUT/sweep}
STEPS=${STEPS:-200}
SEEDS=${SEEDS:-0,1,2}
N_JOBS=${N_JOBS:-2}
EXPERIMENTS=${EXPERIMENTS:-full,no_global,no_local,no_keypoints,inject_after_block,inject_attn_input,arcface_penultimate,arcface_last,arcface_only,clip_only,no_mask_loss,no_cross_face,coarse_to_fine}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Validation at half and at the end of training (the learning curves); the per-validation frequency
# analysis is off (the test pass still writes spectra/generated_faces.npz for the Fig. 7 analogue).
# The rendered clips are cached on disk (data.cache_dir, about 0.7 GB per seed): the 17 members of a seed render
# them once and read them after (the same arrays: the metrics do not change).
COMMON=(trainer.max_steps="$STEPS" trainer.val_check_interval=$((STEPS / 2)) model.sampling.test_batches=2
  logger=csv callbacks.frequency.every_n_val_epochs=0 callbacks.frequency.figures=false
  'data.cache_dir=${paths.cache_dir}/clips'
  hydra/launcher=local_parallel hydra.launcher.n_jobs="$N_JOBS")
train() { .venv/bin/python -m consisid_lab.train -m "$@" "seed=$SEEDS" "${COMMON[@]}"; }
# 1. every composition on the benchmark's identities (both bands)
train "+experiment=$EXPERIMENTS" "hydra.sweep.dir=$SWEEP/main"
# 2. Finding 2's band split: identities that differ only in their high (low) band, with and without the route
#    that should carry it
train "+experiment=full,no_local" data.identity_mode=high_only "hydra.sweep.dir=$SWEEP/high_only"
train "+experiment=full,no_global" data.identity_mode=low_only "hydra.sweep.dir=$SWEEP/low_only"
.venv/bin/python -m consisid_lab.report "$SWEEP" --claims "$OUT/claims.yaml" --out "$OUT"
# Fig. 7 analogue on the faces found in the generated test videos (the seed-0 runs of the main sweep).
SEED0=$(grep -l '"seed": 0' "$SWEEP"/main/*/metrics.json | xargs -n1 dirname)
.venv/bin/python -m consisid_lab.analyze $SEED0 --out "$OUT/figures"
