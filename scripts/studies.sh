#!/usr/bin/env bash
# Reproduces the figures of docs/STUDIES.md on this machine: three sweeps and the spread of
# hand-written templates, all with SmolLM2-135M-Instruct. Finished cells are kept, so rerunning
# the script resumes an interrupted study. Tables and plots are copied into docs/studies/.
#   scripts/studies.sh            # about an hour on 2 cores (release build first)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p softprompt-cli
sp=target/release/softprompt
out=${STUDIES_OUT:-runs/studies}
docs=docs/studies
mkdir -p "$out" "$docs"

# (a) prompt length × initialisation, 2 seeds.
$sp sweep --config examples/studies/length-init.toml \
  --grid num_virtual_tokens=1,5,20,50 --grid init=random,vocab,labels,text --seeds 2 \
  --output "$out/length-init"

# (b) where 20 virtual tokens sit: all before the input / split before input and label /
# around the input.
$sp sweep --config examples/studies/position.toml \
  --grid 'template=["[soft:20]Review: {text}\nSentiment: {label}", "[soft:10]Review: {text}\n[soft:10]Sentiment: {label}", "[soft:10]Review: {text}[soft:10]\nSentiment: {label}"]' \
  --seeds 2 --output "$out/position"

# (c) capital facts: ten hand-written templates (zero-shot) against a trained prompt.
$sp eval smollm2-135m --data data/facts-countries/capital/test.jsonl --target-field target \
  --task generate --templates examples/capital-templates.txt --json > "$out/capital-templates.json"
$sp sweep --config examples/studies/capital-trained.toml --grid init=text,vocab --seeds 2 \
  --output "$out/capital-trained"

for study in length-init position capital-trained; do
  cp "$out/$study/results.md" "$docs/$study.md"
  for png in "$out/$study"/plot-*.png; do cp "$png" "$docs/$study-$(basename "$png")"; done
done
cp "$out/capital-templates.json" "$docs/capital-templates.json"
echo "studies written to $docs"
