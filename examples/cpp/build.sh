#!/usr/bin/env bash
# Build the C++ scorers into BUILD_DIR with one command:
#
#   examples/cpp/build.sh BUILD_DIR
#
# - ONNX Runtime headers: Debian's libonnxruntime-dev (bookworm lacks it; sid has it), fetched with
#   `apt-get download` through a private sources list and apt state under BUILD_DIR/apt, unpacked
#   with `dpkg-deb -x` into BUILD_DIR/ort-headers. Nothing is installed; the system's apt state is
#   not touched. Skipped when the headers are there already (or ORT_INCLUDE_DIR names them).
# - ONNX Runtime library: the onnxruntime wheel of $PYTHON (onnxruntime/capi/libonnxruntime.so.1.*),
#   or ORT_LIBRARY. Its C API is ABI-stable across versions; the scorer refuses at start-up a library
#   older than the headers.
# - The AOTI scorer too when $PYTHON has torch (its CMake files are in the wheel).
#
# Variables: PYTHON (default: python3 on PATH), ORT_INCLUDE_DIR, ORT_LIBRARY, ORT_DEB_SUITE (sid),
# ORT_DEB_MIRROR (http://deb.debian.org/debian), JOBS (2).
# Prerequisites (Debian): cmake g++ nlohmann-json3-dev libssl-dev (scripts/setup.sh installs them).
set -euo pipefail

if [ $# -ne 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: examples/cpp/build.sh BUILD_DIR" >&2
  exit 2
fi
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$1"
BUILD=$(cd "$1" && pwd)
PYTHON=${PYTHON:-python3}
SUITE=${ORT_DEB_SUITE:-sid}
MIRROR=${ORT_DEB_MIRROR:-http://deb.debian.org/debian}

fail() { echo "error: $1" >&2; exit "${2:-3}"; }
for tool in cmake g++ apt-get dpkg-deb; do
  command -v "$tool" >/dev/null || fail "$tool is not installed (run scripts/setup.sh, or apt-get install cmake g++)"
done

ORT_INCLUDE_DIR=${ORT_INCLUDE_DIR:-$BUILD/ort-headers/usr/include/onnxruntime}
if [ ! -f "$ORT_INCLUDE_DIR/onnxruntime_cxx_api.h" ]; then
  APT="$BUILD/apt"
  mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/debs"
  echo "deb $MIRROR $SUITE main" > "$APT/sources.list"
  opts=(-o "Dir::Etc::sourcelist=$APT/sources.list" -o "Dir::Etc::sourceparts=-"
        -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache=$APT/cache" -o "APT::Get::List-Cleanup=0" -qq)
  echo "fetching libonnxruntime-dev headers from Debian $SUITE into $BUILD/ort-headers" >&2
  apt-get "${opts[@]}" update >/dev/null || fail "apt-get update from $MIRROR $SUITE failed (is the network up?)"
  (cd "$APT/debs" && apt-get "${opts[@]}" download libonnxruntime-dev 2>/dev/null) ||
    fail "apt-get download libonnxruntime-dev from $MIRROR $SUITE failed"
  rm -rf "$BUILD/ort-headers"
  dpkg-deb -x "$APT"/debs/libonnxruntime-dev_*.deb "$BUILD/ort-headers"
  [ -f "$ORT_INCLUDE_DIR/onnxruntime_cxx_api.h" ] || fail "libonnxruntime-dev holds no $ORT_INCLUDE_DIR/onnxruntime_cxx_api.h"
fi

if [ -z "${ORT_LIBRARY:-}" ]; then
  ORT_LIBRARY=$("$PYTHON" -c '
import glob, os, onnxruntime
found = sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so.1.*")))
print(found[-1] if found else "")' 2>/dev/null) ||
    fail "$PYTHON cannot import onnxruntime: pip install onnxruntime, or set ORT_LIBRARY"
  [ -n "$ORT_LIBRARY" ] || fail "the onnxruntime wheel of $PYTHON has no capi/libonnxruntime.so.1.*; set ORT_LIBRARY"
fi

cmake_args=(-S "$HERE" -B "$BUILD" "-DORT_INCLUDE_DIR=$ORT_INCLUDE_DIR" "-DORT_LIBRARY=$ORT_LIBRARY")
TORCH_CMAKE=$("$PYTHON" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)' 2>/dev/null || true)
[ -n "$TORCH_CMAKE" ] && cmake_args+=("-DCMAKE_PREFIX_PATH=$TORCH_CMAKE")
cmake "${cmake_args[@]}"
cmake --build "$BUILD" -j "${JOBS:-2}"
echo "built: $(cd "$BUILD" && ls mixexport_score_* 2>/dev/null | tr '\n' ' ')" >&2
