#!/usr/bin/env bash
# softprompt against llama.cpp on the same GGUF with the same threads, back to back in one
# session (load from anything else on the machine hits both alike):
#   decode, one stream:  llama-bench tg32 (after nothing)      vs  softprompt bench --generate
#                        (3 prompts, 32 new tokens each, a 20-token prompt-tuning adapter)
#   decode, 16 streams:  llama-batched-bench -npp 52 -ntg 32 -npl 16 (S_TG)  vs  --clients 16
#   prompt processing:   llama-bench pp52 and pp512            vs  the same --generate's prefill
#                        of a 52- and a 512-token prompt (up to the first token's logits)
# softprompt runs with --weights f32, file (the GGUF's own blocks) and q8_0.
#
# llama.cpp is built once from the sources vendored in PyPI's llama-cpp-python sdist (cmake,
# Release, GGML_NATIVE=ON) and cached in $LLAMACPP_DIR (default target/llamacpp).
#
# Usage: scripts/bench/llamacpp_side_by_side.sh [MODEL.gguf] [OUT.jsonl]
#   MODEL: default the fetched SmolLM2-135M-Instruct Q4_1 ($SOFTPROMPT_HOME/models/smollm2-135m)
#   THREADS (default 2), REPS (default 3), LLAMACPP_VERSION (default 0.3.36), WEIGHTS (default
#   "f32 file q8_0") and SOFTPROMPT (a built binary; default: cargo build --release) change it.
# Needs: cmake, a C/C++ compiler, pip, python3 (apt-get install -y cmake where it is missing).
set -euo pipefail
cd "$(dirname "$0")/../.."
home=${SOFTPROMPT_HOME:-$HOME/.cache/softprompt}
model=${1:-$home/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf}
out=${2:-}
threads=${THREADS:-2}
reps=${REPS:-3}
version=${LLAMACPP_VERSION:-0.3.36}
dir=${LLAMACPP_DIR:-target/llamacpp}
weights=${WEIGHTS:-f32 file q8_0}
[ -f "$model" ] || { echo "no model at $model (run: cargo run -p softprompt-cli -- fetch)" >&2; exit 1; }

# --- llama.cpp, built once ---
bin=$dir/$version/build/bin
if [ ! -x "$bin/llama-bench" ] || [ ! -x "$bin/llama-batched-bench" ]; then
  src=$dir/$version/src
  mkdir -p "$src"
  if [ ! -d "$src/llama_cpp_python-$version" ]; then
    # The sdist itself (--no-binary for this package only: `:all:` would build pip's build
    # dependencies, cmake among them, from source too).
    python3 -m pip download --no-deps --no-binary llama-cpp-python "llama-cpp-python==$version" -d "$src"
    tar xzf "$src/llama_cpp_python-$version.tar.gz" -C "$src"
  fi
  cmake -S "$src/llama_cpp_python-$version/vendor/llama.cpp" -B "$dir/$version/build" \
    -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_APP=OFF >/dev/null
  cmake --build "$dir/$version/build" --config Release -j "$(nproc)" --target llama-bench llama-batched-bench
fi

# --- softprompt ---
sp=${SOFTPROMPT:-}
if [ -z "$sp" ]; then
  cargo build --release -q -p softprompt-cli
  sp=target/release/softprompt
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
note() { echo "$1" | tee -a "$log" >/dev/null; }
note "{\"start\": \"$(date -u +%FT%TZ)\", \"load\": \"$(cut -d' ' -f1-3 /proc/loadavg)\", \"threads\": $threads, \"model\": \"$model\"}"

# llama.cpp: one JSON document per tool run, one line per test
"$bin/llama-bench" -m "$model" -t "$threads" -p 52,512 -n 32 -r "$reps" -o json 2>/dev/null |
  python3 -c 'import json,sys
for t in json.load(sys.stdin):
    kind = "tg%d" % t["n_gen"] if t["n_gen"] else "pp%d" % t["n_prompt"]
    print(json.dumps({"tool": "llama-bench", "test": kind, "tokens_per_s": t["avg_ts"]}))' >>"$log"
"$bin/llama-batched-bench" -m "$model" -t "$threads" -c 4096 -npp 52 -ntg 32 -npl 1,16 --output-format jsonl 2>&1 |
  python3 -c 'import json,sys
for line in sys.stdin:
    line = line.strip()
    if line.startswith("{"):
        r = json.loads(line)
        print(json.dumps({"tool": "llama-batched-bench", "parallel": r["pl"], "decode_tokens_per_s": r["speed_tg"], "prompt_tokens_per_s": r["speed_pp"]}))' >>"$log"

for w in $weights; do
  RAYON_NUM_THREADS=$threads "$sp" bench --generate --json --weights "$w" --reps "$reps" --max-tokens 32 \
    --virtual 20 --clients 16 --adapters 4 "$model" 2>/dev/null |
    python3 -c 'import json,sys
for line in sys.stdin:
    r = json.loads(line); r["tool"] = "softprompt"; r["weights"] = sys.argv[1]; print(json.dumps(r))' "$w" >>"$log"
done
note "{\"end\": \"$(date -u +%FT%TZ)\", \"load\": \"$(cut -d' ' -f1-3 /proc/loadavg)\"}"
[ -n "$out" ] && { mkdir -p "$(dirname "$out")"; cat "$log" >>"$out"; }

# --- the table ---
python3 - "$log" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
first, last = rows[0], rows[-1]
lc = {r["test"]: r["tokens_per_s"] for r in rows if r.get("tool") == "llama-bench"}
lb = {r["parallel"]: r["decode_tokens_per_s"] for r in rows if r.get("tool") == "llama-batched-bench"}
sp = [r for r in rows if r.get("tool") == "softprompt"]
def get(w, workload, key, **match):
    for r in sp:
        if r["weights"] == w and r["workload"] == workload and all(r.get(k) == v for k, v in match.items()):
            return r[key]
def line(name, ours, theirs):
    ratio = f"{ours / theirs:6.2f}" if ours and theirs else "     -"
    o = f"{ours:9.1f}" if ours else "        -"
    t = f"{theirs:9.1f}" if theirs else "        -"
    print(f"  {name:<44} {o} {t}   {ratio}")
print(f"{first['model']}, {first['threads']} threads; load average {first['load']} at the start, {last['load']} at the end")
print(f"  {'tokens/s':<44} {'softprompt':>9} {'llama.cpp':>9}   ratio")
for w in sorted({r["weights"] for r in sp}, key=lambda w: ["f32", "file", "q8_0"].index(w) if w in ["f32", "file", "q8_0"] else 9):
    line(f"decode, 1 stream (--weights {w}; tg32)", get(w, "generate_single", "tokens_per_s"), lc.get("tg32"))
    line(f"decode, 16 streams (--weights {w}; S_TG)", get(w, "generate_concurrent", "concurrent_tokens_per_s"), lb.get(16))
    line(f"prompt 52 (--weights {w}; pp52)", get(w, "generate_prefill", "tokens_per_s", prompt_tokens=52), lc.get("pp52"))
    line(f"prompt 512 (--weights {w}; pp512)", get(w, "generate_prefill", "tokens_per_s", prompt_tokens=512), lc.get("pp512"))
EOF
