#!/usr/bin/env bash
# The dense default model's full table, one eval.py process per task (a long run keeps what it has; a task
# whose JSON exists is skipped; a killed multiple-choice task continues from out/dense_cache). Results in
# lm-evaluation-harness's layout (results.read_results reads them); raw data through data/fetch.py (data/cache/,
# then $DATA_MIRROR, then a download). Progress lines go to each task's log.
# Run from the repo root:  bash scripts/dense_table.sh [task ...]
set -u
cd "$(dirname "$0")/.."
tasks=${*:-"openbookqa winogrande arc_challenge arc_easy piqa boolq hellaswag wikitext2 ptb gsm8k"}
for t in $tasks; do
  [ -s results/dense/$t.json ] && continue
  echo "$(date -u +%FT%TZ) start $t"
  extra="--use_cache out/dense_cache"  # a stopped multiple-choice task continues where it stopped
  [ "$t" = gsm8k ] && extra="--batch_size 32 --samples results/dense/gsm8k_samples.jsonl"  # + generations
  python eval.py --model models/smollm2-135m-instruct --tasks $t $extra --output results/dense/$t.json > results/dense/$t.log 2>&1
  rc=$?
  echo "$(date -u +%FT%TZ) end $t rc=$rc"
done
