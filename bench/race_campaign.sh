#!/usr/bin/env bash
# The race's draws (bench/README.md, "The race"): per calibration seed, ours in the configuration
# frozen on seed 1 (act-order + --clip gptq-loss + --equalize) and GPTQModel 7.6.0 in its best
# (act-order + its mse 2.4), bits 4 and 3, group 128, the same token ids; each output scored on the
# bundled held-out text and on the second genre (bench/second_text.py), 16 384 tokens each.
#
#   bash bench/race_campaign.sh WORK SEED...        e.g. bash bench/race_campaign.sh /tmp/sqbench/race 1 2 3 4 5
#
# Results: bench/results/race/{bundled,peer_bundled,wiki}_seedS.json; then `python bench/race.py`.
# Resumable: every finished run and score is kept in its file and skipped.
#
# RACE_RESULTS=DIR writes ours to DIR instead; RACE_PEERS=0 runs ours only (a new solver version
# against the peer runs already in bench/results/race/: `python bench/race.py --ours DIR`).
set -euo pipefail
work=$1; shift
cd "$(dirname "$0")/.."
export PYTHONPATH=.
py=${PYTHON:-.venv/bin/python}
model=$($py -m solar_quant demo-model)
res=${RACE_RESULTS:-bench/results/race}
peers=${RACE_PEERS:-1}
mkdir -p "$work" "$res"
[ -s "$work/wiki.txt" ] || $py bench/second_text.py "$work/wiki.txt"
common=(--model "$model" --nsamples 64 --seqlen 512 --no-floors --one-thread --quiet-load 2.5 --max-wait 30)
for seed in "$@"; do
  w=$work/seed$seed
  $py bench/gptq_vs_gptqmodel.py "${common[@]}" --work "$w" --calib-seed "$seed" --impls ours \
      --reps 4b-g128-act-gloss-eq=1,3b-g128-act-gloss-eq=1 --steps calibrate,quantize,eval \
      --baseline-cache "$work/cache-bundled" --out "$res/bundled_seed$seed.json"
  if [ "$peers" = 0 ]; then
    $py bench/gptq_vs_gptqmodel.py "${common[@]}" --work "$w-wiki" --calib-seed "$seed" --impls ours \
        --reps 4b-g128-act-gloss-eq=1,3b-g128-act-gloss-eq=1 --steps eval \
        --eval-text "$work/wiki.txt" --runs-from "$res/bundled_seed$seed.json" \
        --baseline-cache "$work/cache-wiki" --out "$res/wiki_seed$seed.json"
    continue
  fi
  $py bench/gptq_vs_gptqmodel.py "${common[@]}" --work "$w" --calib-seed "$seed" --impls theirs \
      --reps 4b-g128-act-mse=1,3b-g128-act-mse=1 --steps calibrate,quantize,eval \
      --baseline-cache "$work/cache-bundled" --out "$res/peer_bundled_seed$seed.json"
  $py bench/gptq_vs_gptqmodel.py "${common[@]}" --work "$w-wiki" --calib-seed "$seed" --impls ours,theirs \
      --reps 4b-g128-act-gloss-eq=1,3b-g128-act-gloss-eq=1,4b-g128-act-mse=1,3b-g128-act-mse=1 --steps eval \
      --eval-text "$work/wiki.txt" --runs-from "$res/bundled_seed$seed.json" "$res/peer_bundled_seed$seed.json" \
      --baseline-cache "$work/cache-wiki" --out "$res/wiki_seed$seed.json"
done
