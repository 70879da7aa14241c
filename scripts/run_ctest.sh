#!/usr/bin/env bash
# Configures, builds and runs the C++ unit tests with CMake and CTest, in build/cmake.
#
#   scripts/run_ctest.sh            # uses .venv/bin/python if present, else python3
#   PYTHON=/path/to/python scripts/run_ctest.sh
#   JOBS=4 EF21_REQUIRE_CPP_TESTS=1 scripts/run_ctest.sh   # more jobs; fail if GoogleTest is missing
#   BUILD_DIR=/tmp/b scripts/run_ctest.sh -DEF21_BUILD_PYTHON=OFF   # extra arguments go to cmake
#
# Needs: cmake >= 3.18, a C++20 compiler, torch importable by $PYTHON, and GoogleTest
# (Debian/Ubuntu: apt-get install libgtest-dev). Uses Ninja when available.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON="$root/.venv/bin/python"; else PYTHON="$(command -v python3)"; fi
fi
build="${BUILD_DIR:-$root/build/cmake}"
jobs="${JOBS:-2}"

torch_prefix="$("$PYTHON" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
generator=()
if command -v ninja >/dev/null 2>&1 && [[ ! -f "$build/Makefile" ]]; then generator=(-G Ninja); fi

cmake -S "$root" -B "$build" "${generator[@]}" \
  -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$torch_prefix" \
  -DPython3_EXECUTABLE="$PYTHON" "$@"
cmake --build "$build" -j "$jobs"
# Without GoogleTest the library is still built (so it compiles); the tests are skipped, loudly,
# unless EF21_REQUIRE_CPP_TESTS=1 makes that an error.
if ! grep -q '^EF21_CPP_TESTS:INTERNAL=ON$' "$build/CMakeCache.txt"; then
  echo "run_ctest: GoogleTest not found (apt-get install libgtest-dev): C++ tests SKIPPED" >&2
  [[ "${EF21_REQUIRE_CPP_TESTS:-0}" == 1 ]] && exit 1
  exit 0
fi
ctest --test-dir "$build" --output-on-failure --no-tests=error -j "$jobs"
