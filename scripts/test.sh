#!/usr/bin/env bash
# Every test: the C++ tests (CTest) where scripts/run_ctest.sh exists, then the Python suite.
# Extra arguments go to pytest (e.g. -m "not slow"). Fails on any failure, and when pytest ran no test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
if [ -f scripts/run_ctest.sh ]; then
  bash scripts/run_ctest.sh
fi
status=0
.venv/bin/python -m pytest tests -q "$@" || status=$?
if [ "$status" = 5 ]; then
  echo "test.sh: pytest ran no test (exit 5): that is a failure" >&2
fi
exit "$status"
