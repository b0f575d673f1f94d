#!/usr/bin/env bash
# Regenerates docs/perf/*.jsonl: `softprompt bench --json` over how cost grows with sequence
# length, prompt length, batch and model width (each point in its own process, so the peak RSS
# is that point's). Then `python3 scripts/plot_perf.py` draws docs/perf/*.png.
# Takes about 15 minutes on a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p softprompt-cli
bin=$(mktemp -d)/softprompt
cp target/debug/softprompt "$bin"   # a copy: rebuilding during the sweep must not change it
out=docs/perf
mkdir -p "$out"
run() { "$bin" bench --json --reps 2 "$@" | head -1; }

: > "$out/seq_len.jsonl"   # one row, a 20-token prompt shared by nothing (batch 1)
for len in 32 64 128 256 512 1024; do run --batch 1 --len "$len" >> "$out/seq_len.jsonl"; done

: > "$out/prompt_len.jsonl"   # batch 8, 32 text tokens after a prompt of P virtual tokens (shared)
for p in 1 5 20 50 100; do run --batch 8 --len $((p + 32)) --shared-prefix "$p" >> "$out/prompt_len.jsonl"; done

: > "$out/batch.jsonl"   # the sentiment shape: 20 shared + 32 tokens per row
for b in 1 2 4 8 16 32; do run --batch "$b" --len 52 --shared-prefix 20 >> "$out/batch.jsonl"; done

: > "$out/width.jsonl"   # random Llamas: SmolLM2-135M, SmolLM2-360M, Llama-3.2-1B shapes (32k vocabulary)
for shape in 576x30x9x3x1536 960x32x15x5x2560 2048x16x32x8x8192; do
  run --random-llama "$shape" --batch 8 --len 52 --shared-prefix 20 >> "$out/width.jsonl"
done
