#!/usr/bin/env bash
# Generation side by side with HF PEFT + transformers, back to back in one session so that load
# from anything else on the machine hits both alike: ROUNDS × (softprompt `bench --generate`,
# then scripts/reference/peft_generate_speed.py), JSON lines appended to OUT.
# Usage: scripts/bench_generate_vs_peft.sh PYTHON [ROUNDS] [OUT]
#   PYTHON: an interpreter with torch, transformers, peft (the README's reference environment:
#   python3 -m venv .venv-ref && .venv-ref/bin/pip install torch==2.15.0 transformers==5.24.0
#   peft==0.21.2 safetensors tokenizers gguf).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:?usage: $0 PYTHON [ROUNDS] [OUT]}
rounds=${2:-2}
out=${3:-docs/perf/generate.jsonl}
home=${SOFTPROMPT_HOME:-$HOME/.cache/softprompt}
bench=${BENCH_DIR:-scripts/reference}
cargo build --release -q -p softprompt-cli
mkdir -p "$(dirname "$out")"
for r in $(seq 1 "$rounds"); do
  echo "{\"round\": $r, \"start\": \"$(date -u +%FT%TZ)\", \"load\": \"$(cut -d' ' -f1-3 /proc/loadavg)\"}" >> "$out"
  ./target/release/softprompt bench --generate --json --reps 2 --max-tokens 32 --virtual 20 \
    --clients 16 --adapters 4 >> "$out"
  "$py" "$bench/peft_generate_speed.py" "$home/models/smollm2-135m" SmolLM2-135M-Instruct.Q4_1.gguf 32 20 2 >> "$out"
done
echo "wrote $out"
