#!/usr/bin/env bash
# Prompt transfer (SPoT, Vu et al. 2022) on the three tasks of the examples: capital and continent
# (facts, generation, exact match) and movie-review sentiment (classification), each with a
# 10-token prompt on SmolLM2-135M so that any prompt can start any other task's.
#
#   scripts/spot_transfer.sh [OUT]   # default OUT = runs/spot; SEEDS=3, SENTIMENT_SEEDS=$SEEDS
#
# About 40 minutes for the facts tasks and 10 per sentiment seed on 2 quiet cores; runs already
# finished in OUT are kept (rerun to resume).
#
# 1. Source prompts: each task's recipe (examples/*.toml) trained to the end, seed 42.
# 2. Target probes: each task trained for 10 steps (SPoT's early prompt as the task's embedding).
# 3. `softprompt similar PROBE SOURCE…` ranks the two other tasks' source prompts for the target.
# 4. Each target trained with its recipe's own start (init text) and from each other task's source
#    prompt (init from), SEEDS seeds each (SENTIMENT_SEEDS for sentiment); test accuracy@1 (and
#    greedy exact match for the facts tasks), mean ± sd, in OUT/transfer.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/spot}
SEEDS=${SEEDS:-3}
SENTIMENT_SEEDS=${SENTIMENT_SEEDS:-$SEEDS}
seeds_of() { if [ "$1" = sentiment ]; then echo "$SENTIMENT_SEEDS"; else echo "$SEEDS"; fi; }
BIN=${SOFTPROMPT_BIN:-target/release/softprompt}
[ -x "$BIN" ] || cargo build --release -q -p softprompt-cli
mkdir -p "$OUT"

tasks=(capital continent sentiment)
# The sentiment recipe with a 10-token prompt (the facts recipes already have 10).
extra() {
  case $1 in
    sentiment) printf '%s\0' --template $'[soft:10]Review: {text}\nSentiment: {label}' ;;
  esac
}
train() { # TASK OUTPUT [flags…]
  local task=$1 out=$2; shift 2
  local flags=()
  while IFS= read -r -d '' f; do flags+=("$f"); done < <(extra "$task")
  if [ -f "$out.result.json" ]; then return; fi
  "$BIN" train --config "examples/$task.toml" "${flags[@]}" --output "$out" --overwrite "$@" \
    > "$out.tmp.json" 2> "$out.log"
  mv "$out.tmp.json" "$out.result.json"
}

for t in "${tasks[@]}"; do
  echo "source $t" >&2
  train "$t" "$OUT/source-$t"
  echo "probe $t" >&2
  train "$t" "$OUT/probe-$t" --steps 10 --warmup 2 --eval-every 0
done

for t in "${tasks[@]}"; do
  others=()
  for s in "${tasks[@]}"; do [ "$s" = "$t" ] || others+=("$OUT/source-$s"); done
  "$BIN" similar "$OUT/probe-$t" "${others[@]}" --json > "$OUT/similar-$t.jsonl"
  for seed in $(seq 42 $((42 + $(seeds_of "$t") - 1))); do
    echo "target $t seed $seed" >&2
    train "$t" "$OUT/target-$t-text-$seed" --seed "$seed"
    for s in "${tasks[@]}"; do
      [ "$s" = "$t" ] && continue
      train "$t" "$OUT/target-$t-from-$s-$seed" --seed "$seed" --init from --init-from "$OUT/source-$s"
    done
  done
done

python3 - "$OUT" "$SEEDS" "$SENTIMENT_SEEDS" <<'PY'
import json, statistics, sys, pathlib
out, seeds = pathlib.Path(sys.argv[1]), {"capital": int(sys.argv[2]), "continent": int(sys.argv[2]), "sentiment": int(sys.argv[3])}
tasks = ["capital", "continent", "sentiment"]
def result(name):
    return json.loads((out / f"{name}.result.json").read_text())
def cell(values):
    m = statistics.mean(values) * 100
    return f"{m:.1f} ± {statistics.stdev(values) * 100:.1f}" if len(values) > 1 else f"{m:.1f}"
def figures(names):
    rs = [result(n) for n in names]
    text = cell([r["test_accuracy"] for r in rs])
    if rs[0].get("test_exact_match") is not None:
        text += " / " + cell([r["test_exact_match"] for r in rs])
    return text
lines = ["| target | start | seeds | SPoT similarity to the target's 10-step probe (average / best-matched tokens) | test accuracy@1 / greedy exact match (%) |",
         "|---|---|---:|---:|---:|"]
for t in tasks:
    sims = {}
    for l in (out / f"similar-{t}.jsonl").read_text().splitlines():
        r = json.loads(l)
        a, b = pathlib.Path(r["a"]).name, pathlib.Path(r["b"]).name
        if a == f"probe-{t}" and b.startswith("source-"):
            sims[b[len("source-"):]] = (r["average_tokens"], r["best_matched_tokens"])
    ks = range(42, 42 + seeds[t])
    lines.append(f"| {t} | its own text init | {seeds[t]} | – | {figures([f'target-{t}-text-{k}' for k in ks])} |")
    for s in sorted(sims, key=lambda s: -sims[s][0]):
        avg, best = sims[s]
        lines.append(f"| {t} | from the {s} prompt | {seeds[t]} | {avg:.3f} / {best:.3f} | {figures([f'target-{t}-from-{s}-{k}' for k in ks])} |")
(out / "transfer.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
