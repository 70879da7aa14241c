#!/usr/bin/env bash
# Makes a fresh Debian machine (Python 3.11, pip configured with local wheels) ready to run and test
# ef21, and does nothing that is already done: Debian build tools, .venv with torch and the test and
# example dependencies, and the extension, rebuilt only when csrc/ or setup.py changed since the last
# build. Safe to run concurrently: builds are serialised by a lock.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.14.1
say() { echo "bootstrap: $*"; }
# Runs a command with its output kept aside, shown only when it fails.
quiet() {
  local log status=0
  log=$(mktemp)
  "$@" >"$log" 2>&1 || status=$?
  ((status)) && cat "$log" >&2
  rm -f "$log"
  return "$status"
}

# --- Debian packages: compilers and CMake/GoogleTest for the C++ tests --------------------------
if command -v dpkg >/dev/null; then
  missing=()
  for pkg in cmake g++ libgtest-dev ninja-build; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    sudo=""
    if [ "$(id -u)" != 0 ]; then
      if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo=sudo; else sudo=none; fi
    fi
    if [ "$sudo" = none ]; then
      say "not root: cannot install ${missing[*]} (C++ tests may be skipped)"
    else
      say "apt-get install ${missing[*]}"
      quiet $sudo apt-get update -qq
      quiet $sudo env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
  fi
fi

# --- Python environment ---------------------------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
  python=${PYTHON:-$(command -v python3.11 || command -v python3)}
  say "creating .venv with $($python --version 2>&1)"
  "$python" -m venv .venv
fi
py=.venv/bin/python

# Each requirement is installed only when its module is missing (torch also when its version differs).
missing=$("$py" - "$TORCH_VERSION" <<'EOF'
import importlib.metadata
import importlib.util
import sys

want = {"torch": f"torch=={sys.argv[1]}", "numpy": "numpy", "sklearn": "scikit-learn",
        "matplotlib": "matplotlib", "pytest": "pytest", "ninja": "ninja", "setuptools": "setuptools>=64"}
missing = [req for mod, req in want.items() if importlib.util.find_spec(mod) is None]
if want["torch"] not in missing and importlib.metadata.version("torch").split("+")[0] != sys.argv[1]:
    missing.append(want["torch"])
print(" ".join(missing))
EOF
)
if [ -n "$missing" ]; then
  say "pip install $missing"
  # shellcheck disable=SC2086  # one word per requirement
  quiet "$py" -m pip install $missing
fi

# --- The extension ----------------------------------------------------------------------------------
needs_build() {
  local so
  so=$(find python/ef21 -maxdepth 1 -name '_C*.so' -print -quit)
  [ -z "$so" ] && return 0
  [ -n "$(find csrc setup.py -newer "$so" -print -quit)" ] && return 0
  ! "$py" -c "import ef21._C" >/dev/null 2>&1  # not installed in this .venv, or built for another torch
}

# Decide again under the lock: another run may have just built it.
exec 9>/tmp/ef21-build.lock
flock 9
if needs_build; then
  say "building ef21._C (pip install --no-build-isolation -e .): 2-3 min CPU-only, 5-20 min with the CUDA kernels on 2 cores; EF21_FORCE_CPU=1 skips them"
  quiet "$py" -m pip install --no-build-isolation -e .
fi
flock -u 9
exec 9>&-

"$py" - <<'EOF'
import platform

import torch

import ef21

kernels = "CPU and CUDA kernels" if ef21._C.built_with_cuda() else "CPU kernels"
print(f"bootstrap: ready: Python {platform.python_version()}, torch {torch.__version__}, "
      f"ef21 {ef21.__version__} ({kernels})")
EOF
