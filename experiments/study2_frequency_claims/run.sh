#!/usr/bin/env bash
# Study 2: every claim of claims.yaml on the embedded benchmark, as fine-tunes from one base backbone (as ConsisID
# fine-tunes CogVideoX-5B-I2V), paired seeds, then the report with verdicts.
# 1. the base: `+experiment=i2v_base` (BASE_STEPS, seed 0), exported with `consisid_lab.export layout=backbone`;
# 2. every composition fine-tuned from it for STEPS steps (`+experiment=[NAME,from_base]`), SEEDS paired seeds.
# Resumable: the sweep dirs are fixed, so running this again skips what is done (the base, completed members) and
# resumes the unfinished members from their last.ckpt.
# CPU scale (2 cores, two members at a time on one thread each; under 90 minutes): STEPS=150, SEEDS=0,1,2.
# On a GPU: BASE_STEPS=3000 STEPS=1500 SEEDS=0,1,2,3,4 OMP_NUM_THREADS=8 N_JOBS=1 bash experiments/study2_frequency_claims/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=experiments/study2_frequency_claims
SWEEP=${SWEEP:-$OUT/sweep}
BASE_SWEEP=${BASE_SWEEP:-${SWEEP}_base}
STEPS=${STEPS:-150}
BASE_STEPS=${BASE_STEPS:-600}
SEEDS=${SEEDS:-0,1,2}
N_JOBS=${N_JOBS:-2}
# no_global_zeroed, not no_global: the global route is ablated by zeroing the image channels, which the base has.
EXPERIMENTS=${EXPERIMENTS:-full,no_global_zeroed,no_local,no_keypoints,inject_after_block,inject_attn_input,arcface_penultimate,arcface_last,arcface_only,clip_only,no_mask_loss,no_cross_face,coarse_to_fine}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=.venv/bin/python
# The rendered clips are cached on disk (data.cache_dir, about 0.7 GB per seed): the members of a seed render them
# once and read them after (the same arrays: the metrics do not change).
CACHE=(logger=csv 'data.cache_dir=${paths.cache_dir}/clips')

# 1. The base backbone, trained once on both cores (a one-member sweep: rerun, it is skipped or resumed).
BASE=$(realpath -m "$BASE_SWEEP/backbone")
if [[ ! -f "$BASE/base.json" ]]; then
  OMP_NUM_THREADS=${BASE_THREADS:-2} $PY -m consisid_lab.train -m +experiment=i2v_base seed=0 \
    trainer.max_steps="$BASE_STEPS" trainer.val_check_interval="$BASE_STEPS" "${CACHE[@]}" \
    "hydra.sweep.dir=$BASE_SWEEP/train"
  rm -rf "$BASE"  # an export killed half-way is redone
  $PY -m consisid_lab.export ckpt_path="$BASE_SWEEP/train/0/checkpoints/last.ckpt" out_dir="$BASE" layout=backbone
fi

# 2. The fine-tunes. Validation at half and at the end of training (the learning curves); the per-validation
# frequency analysis is off (the test pass still writes spectra/generated_faces.npz for the Fig. 7 analogue).
COMMON=(trainer.max_steps="$STEPS" trainer.val_check_interval=$((STEPS / 2)) model.sampling.test_batches=2
  "base_dir=$BASE" callbacks.frequency.every_n_val_epochs=0 callbacks.frequency.figures=false "${CACHE[@]}"
  hydra/launcher=local_parallel hydra.launcher.n_jobs="$N_JOBS")
# `+experiment=[a,from_base],[b,from_base]`: each composition fine-tuned from the base
from_base() { local IFS=,; local items=(); for e in $1; do items+=("[$e,from_base]"); done; echo "${items[*]}"; }
train() { $PY -m consisid_lab.train -m "$@" "seed=$SEEDS" "${COMMON[@]}"; }
# every composition on the benchmark's identities (both bands)
train "+experiment=$(from_base "$EXPERIMENTS")" "hydra.sweep.dir=$SWEEP/main"
# Finding 2's band split: identities that differ only in their high (low) band, with and without the route that
# should carry it
train "+experiment=$(from_base full,no_local)" data.identity_mode=high_only "hydra.sweep.dir=$SWEEP/high_only"
train "+experiment=$(from_base full,no_global_zeroed)" data.identity_mode=low_only "hydra.sweep.dir=$SWEEP/low_only"
$PY -m consisid_lab.report "$SWEEP" --claims "$OUT/claims.yaml" --out "$OUT"
# Fig. 7 analogue on the faces found in the generated test videos (the seed-0 runs of the main sweep).
SEED0=$(grep -l '"seed": 0' "$SWEEP"/main/*/metrics.json | xargs -n1 dirname)
$PY -m consisid_lab.analyze $SEED0 --out "$OUT/figures"
