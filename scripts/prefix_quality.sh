#!/usr/bin/env bash
# The quality table of prefix tuning and Cartridges against prompt tuning (README, issue #10):
# the sentiment-quality recipe (300 steps, batch 8, 20 virtual tokens or K/V positions, dev 200
# rows every 100 steps, first 500 test rows), one run per method, seed 42. Name runs to do only
# those: scripts/prefix_quality.sh prefix-zero cartridge
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p softprompt-cli
sp=target/release/softprompt
out=${QUALITY_OUT:-runs/quality}
recipe=examples/sentiment-quality.toml
plain='Review: {text}\nSentiment: {label}'
# the K/V inits prefill a text of at least num_virtual_tokens (20) tokens; the recipe's is 13
long='Classify the sentiment of the movie review as positive or negative. Read the whole review first, then answer with a single word:'
wanted() { [ -z "$only" ] || [[ " $only " == *" $1 "* ]]; }
only="$*"
run() { local name=$1; shift; wanted "$name" || return 0; $sp train --config $recipe --output "$out/$name" --overwrite "$@" | tee "$out/$name.json"; }
mkdir -p "$out"
run prompt-tuning
run prefix-zero --template "$plain" --method prefix-tuning --num-virtual-tokens 20 --init zero --lr 0.01
run prefix-text --template "$plain" --method prefix-tuning --num-virtual-tokens 20 --init text --init-text "$long" --lr 0.01
run cartridge --template "$plain" --method cartridge --num-virtual-tokens 20 --init text --init-text "$long" --lr 0.01
