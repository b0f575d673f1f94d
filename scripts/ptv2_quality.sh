#!/usr/bin/env bash
# P-tuning v2 against prompt tuning on MiniLM (seq-cls sentiment, issue #10 items 2 and 5): the
# two recipes examples/minilm-sentiment-{ptv2,prompt}.toml (same data, 300 steps, batch 16,
# 20 virtual tokens or K/V positions, a linear head on the pooler, dev 200 rows every 100 steps,
# the whole 1,500-row test set), seed 42, one run each.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p softprompt-cli
sp=target/release/softprompt
out=${QUALITY_OUT:-runs/ptv2-quality}
mkdir -p "$out"
for m in prompt ptv2; do
    $sp train --config examples/minilm-sentiment-$m.toml --output "$out/$m" --overwrite | tee "$out/$m.json"
done
