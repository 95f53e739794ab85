#!/usr/bin/env bash
# One set-up for a fresh machine, used by the README's test command and by .ci/run:
# Debian packages first (the C++ example, the Redis Cluster tests), then a virtual environment in
# .venv with every Python package the tests use. Safe to run again: what is there is kept.
#
#   bash scripts/setup.sh          # creates/updates .venv; then: . .venv/bin/activate
set -euo pipefail
cd "$(dirname "$0")/.."

# --- Debian packages ------------------------------------------------------------------------
# nlohmann-json3-dev: the C++ examples parse the (untrusted) manifest with nlohmann/json
# libssl-dev: the C++ examples hash files with OpenSSL's EVP
# redis-server: the Redis Cluster table-store tests start their own nodes on loopback
APT_PACKAGES=(nlohmann-json3-dev libssl-dev redis-server)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if ! command -v apt-get >/dev/null; then
    echo "error: Debian packages missing (${missing[*]}) and no apt-get here; hint: install them with your package manager" >&2
    exit 3
  fi
  SUDO=$([ "$(id -u)" -eq 0 ] || echo sudo)
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# --- Python packages ------------------------------------------------------------------------
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# the CPU build of torch first: a plain `torch` requirement would pull the multi-GB CUDA build
python -m pip install -q torch==2.13.0
# trt-rtx: TensorRT-RTX builds engines on a GPU-less machine (pinned: the version the engine facts
# were measured with); triton: pytriton's tritonserver serves the python-backend flavour live;
# openvino: --target openvino and its bench peers (openvino, nncf); ray: verify/score --engine ray
# pyarrow<22: later pyarrow needs NumPy >= 2, and nvidia-pytriton (the triton extra) keeps NumPy < 2
python -m pip install -q -e ".[cpu,dev,trt-rtx,triton,openvino,ray,redis]" tensorrt-rtx-cu13==1.7.1.116 "pyarrow>=14,<22"
# MovieLens-100k ships inside this wheel; --no-deps: its own dependencies are heavy and unused
python -m pip install -q --no-deps recbole==1.2.1
echo "setup done: . .venv/bin/activate"
