#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian 12 / Ubuntu machine with Python 3.11, idempotently:
# Debian packages (only the missing ones; `apt-get update` first), a virtualenv in .venv, and the Python
# dependencies from the hash-locked requirements files.  Usage: scripts/setup.sh [--dev]
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
[ "${1:-}" = "--dev" ] && dev=1

log() { printf '[setup] %s\n' "$*" >&2; }

# ---------------------------------------------------------------- Debian packages
# fonts-noto-cjk: Chinese text on the kiosk and in browser screenshots.
# libzbar0: the fallback QR decoder (pyzbar).
# The Kivy kiosk: libgl1/libegl1 (+ libgl1-mesa-dri for software GL under Xvfb) and libmtdev1 for the SDL2 window of
# Kivy's wheel; espeak-ng for the care mode's Mandarin voice prompts; xvfb for `yibao kiosk screens` without a screen.
apt_pkgs=(python3 python3-venv mosquitto ca-certificates fonts-noto-cjk libzbar0
  libgl1 libegl1 libgl1-mesa-dri libmtdev1 espeak-ng xvfb xauth)
if [ "$dev" = 1 ]; then
  # PostgreSQL for the server test matrix; Chromium to check the web pages in a real browser.
  apt_pkgs+=(postgresql chromium)
fi
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    log "missing Debian packages: ${missing[*]} (run as root, or install them first)"; exit 1
  fi
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# ---------------------------------------------------------------- Python 3.11
py=""
for cand in python3.11 python3; do
  if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    py=$(command -v "$cand"); break
  fi
done
[ -n "$py" ] || { log "Python 3.11 not found (need python3.11 on PATH)"; exit 1; }

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  log "creating .venv with $py"
  rm -rf .venv
  "$py" -m venv .venv
fi
if [ ! -x .venv/bin/uv ]; then
  log "installing uv into .venv"
  .venv/bin/python -m pip install -q --disable-pip-version-check 'uv>=0.13,<0.14'
fi

# The dev lock is a superset of the runtime lock: a venv synced to it serves the demo too, so running the demo
# after the tests does not strip the test tools (and the other way round re-syncs to the superset).
stamp_of() { echo ".venv/.synced-$(basename "$1" .txt)-$(sha256sum "$1" pyproject.toml | sha256sum | cut -c1-16)"; }
lock=requirements/runtime.txt
[ "$dev" = 1 ] && lock=requirements/dev.txt
if [ ! -f "$(stamp_of "$lock")" ] && { [ "$dev" = 1 ] || [ ! -f "$(stamp_of requirements/dev.txt)" ]; }; then
  log "installing Python packages from $lock"
  UV_PYTHON_DOWNLOADS=never .venv/bin/uv pip sync -q --python .venv/bin/python --require-hashes "$lock"
  UV_PYTHON_DOWNLOADS=never .venv/bin/uv pip install -q --python .venv/bin/python --no-deps -e .
  rm -f .venv/.synced-*
  touch "$(stamp_of "$lock")"
fi
# Converted models (the dlib ResNet → ONNX) into $YIBAO_MODELS_DIR or var/models; skips quickly when built.
.venv/bin/yibao models build >&2
log "ready"
