#!/usr/bin/env bash
# A 2-rank `softprompt train` across two "hosts" on this machine: two network namespaces joined
# by a veth pair, each with only its own address (10.77.0.1 and 10.77.0.2), Open MPI over TCP
# between them (no shared-memory transport, no loopback between the ranks). Rank 1 is started in
# the second namespace by an `ssh`-like launch agent (`ip netns exec`), the way mpirun starts
# ranks on other hosts. The adapter must equal the one a single process trains (to rounding): so
# nothing in softprompt's data-parallel training assumes one host.
#
#   scripts/mpi_two_hosts.sh [OUT]      # as root (network namespaces); default OUT = runs/mpi-two-hosts
#
# Needs Open MPI 4 (Debian's openmpi-bin, libopenmpi-dev) and libclang-dev to build feature `mpi`;
# SOFTPROMPT_BIN may name a build with feature mpi (otherwise one is built here).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-runs/mpi-two-hosts}")
[ "$(id -u)" -eq 0 ] || { echo "$0: needs root (ip netns)" >&2; exit 1; }
command -v mpirun >/dev/null || { echo "$0: needs Open MPI's mpirun (apt-get install openmpi-bin libopenmpi-dev libclang-dev)" >&2; exit 1; }
if [ -n "${SOFTPROMPT_BIN:-}" ]; then
  BIN=$(realpath "$SOFTPROMPT_BIN")  # a build with feature mpi
else
  cargo build --release -q -p softprompt-cli --features mpi
  BIN=$(realpath target/release/softprompt)
fi
mkdir -p "$OUT"

A=sp-host-a B=sp-host-b
cleanup() { ip netns del "$A" 2>/dev/null || true; ip netns del "$B" 2>/dev/null || true; }
trap cleanup EXIT
cleanup
ip netns add "$A"
ip netns add "$B"
ip link add sp-veth-a netns "$A" type veth peer name sp-veth-b netns "$B"
ip -n "$A" addr add 10.77.0.1/24 dev sp-veth-a
ip -n "$B" addr add 10.77.0.2/24 dev sp-veth-b
for ns in "$A" "$B"; do
  ip -n "$ns" link set lo up
done
ip -n "$A" link set sp-veth-a up
ip -n "$B" link set sp-veth-b up

# The launch agent mpirun uses instead of ssh: `AGENT HOST COMMAND…` runs COMMAND in HOST's
# namespace.
AGENT="$OUT/netns-agent.sh"
cat > "$AGENT" <<EOF
#!/usr/bin/env bash
host=\$1; shift
while [ "\${host#-}" != "\$host" ]; do host=\$1; shift; done  # skip ssh options, if any
case \$host in
  10.77.0.1) ns=$A ;;
  10.77.0.2) ns=$B ;;
  *) echo "netns-agent: unknown host \$host" >&2; exit 1 ;;
esac
exec ip netns exec "\$ns" /bin/sh -c "\$*"
EOF
chmod +x "$AGENT"
printf '10.77.0.1 slots=1\n10.77.0.2 slots=1\n' > "$OUT/hosts"

# A short run of the sentiment recipe (3 steps of 6 rows, 8 dev and 8 test rows).
flags=(--steps 3 --batch 6 --eval-every 0 --dev-rows 8 --test-rows 8 --threads 1)
"$BIN" train --config examples/sentiment.toml "${flags[@]}" --output "$OUT/one-process" --overwrite \
  > "$OUT/one-process.json"

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mpi=(mpirun --allow-run-as-root -np 2 --hostfile "$OUT/hosts"
  --mca plm_rsh_agent "$AGENT"
  --mca oob_tcp_if_include 10.77.0.0/24
  --mca btl tcp,self --mca btl_tcp_if_include 10.77.0.0/24
  --mca pml ob1
  -x PATH -wdir "$PWD")
# Where each rank runs: its namespace's only address.
ip netns exec "$A" "${mpi[@]}" sh -c \
  'echo "rank $OMPI_COMM_WORLD_RANK runs on $(ip -o -4 addr show | grep -o "10\.77\.0\.[0-9]*")"' | sort
ip netns exec "$A" "${mpi[@]}" \
  "$BIN" train --config examples/sentiment.toml "${flags[@]}" --output "$OUT/two-hosts" --overwrite \
  > "$OUT/two-hosts.json"

python3 - "$OUT" <<'PY'
import json, struct, sys, pathlib
out = pathlib.Path(sys.argv[1])
def tensors(path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    result = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        a, b = t["data_offsets"]
        result[name] = struct.unpack(f"<{(b - a) // 4}f", data[a:b])
    return result
one = tensors(out / "one-process" / "adapter_model.safetensors")
two = tensors(out / "two-hosts" / "adapter_model.safetensors")
worst = 0.0
for name, values in one.items():
    scale = max(abs(v) for v in values)
    worst = max(worst, max(abs(a - b) for a, b in zip(values, two[name])) / scale)
print(f"2 ranks on two network namespaces vs one process: largest difference {worst:.2e} of the tensor's largest value")
sys.exit(0 if worst <= 1e-3 else 1)
PY
