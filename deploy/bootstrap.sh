#!/usr/bin/env bash
# Set up synthmr on a fresh Debian machine and run the demo or the test suite.
#
#   bash deploy/bootstrap.sh demo    # install, then `synthmr demo`
#   bash deploy/bootstrap.sh test    # install, then the whole test suite
#
# Installs: the apt packages the real peers need (dcmtk, orthanc, dicom3tools, prometheus,
# chromium + chromium-driver for the web tests),
# a virtual environment in .venv (system site packages visible), and synthmr with its extras.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-test}"

SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi

need_apt=()
command -v python3 >/dev/null || need_apt+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
command -v storescu >/dev/null || need_apt+=(dcmtk)
command -v Orthanc >/dev/null || need_apt+=(orthanc)
command -v dciodvfy >/dev/null || need_apt+=(dicom3tools)
command -v promtool >/dev/null || need_apt+=(prometheus)
command -v chromium >/dev/null || need_apt+=(chromium)
command -v chromedriver >/dev/null || need_apt+=(chromium-driver)
if [ "${#need_apt[@]}" -gt 0 ]; then
  echo "bootstrap: apt-get install ${need_apt[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need_apt[@]}"
  # The Debian orthanc package starts a system service on 4242/8042; the tests run their own.
  if [ -x /usr/bin/systemctl ] && systemctl is-active --quiet orthanc 2>/dev/null; then
    $SUDO systemctl stop orthanc || true
  fi
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv --system-site-packages .venv
fi
. .venv/bin/activate
if { [ "$mode" = "test" ] || [ "$mode" = "train" ]; } && ! python -c 'import torch, onnx' 2>/dev/null; then
  # The FLAIR training (and its smoke test in tests/test_enhance.py) needs PyTorch + onnx.
  # Pinned to the CPU build 2.13.0 before the extras, so pip does not pull a multi-GB CUDA
  # build for "torch>=2.1"; without it the smoke test skips.
  python -m pip install -q --disable-pip-version-check "torch==2.13.0" "onnx>=1.15" \
    || echo "bootstrap: torch/onnx not installable here; the training smoke test will skip"
fi
extras="test"
[ "$mode" = "train" ] && extras="test,train"
python -m pip install -q --disable-pip-version-check -e ".[${extras}]"
# Compile every numba kernel into the on-disk cache now (~45 s once), not while the first
# series waits: the node's workers and the demo then load them in about a second.
synthmr warmup

case "$mode" in
  demo)
    shift || true
    exec synthmr demo "$@"
    ;;
  test)
    shift || true
    exec python -m pytest -q "$@"
    ;;
  train)
    exec python models/train_flair.py
    ;;
  *)
    echo "usage: bash deploy/bootstrap.sh [demo|test|train]" >&2
    exit 2
    ;;
esac
