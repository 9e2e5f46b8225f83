#!/usr/bin/env bash
# Idempotent: .venv-bench, a plain virtualenv holding mergekit (never a vlsafe dependency), for the tests that
# compare vlsafe's merges with mergekit's (tests/test_merge_mergekit.py) and `vlsafe bench merge`.
# torch is pinned first so pip takes the CPU wheel on disk rather than a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
TORCH=torch==2.13.0
MERGEKIT=mergekit==0.1.5
stamp_want="$TORCH $MERGEKIT $(sha256sum scripts/bench-venv.sh | cut -c1-16)"
if [ -f .venv-bench/.vlsafe-bench ] && [ "$(cat .venv-bench/.vlsafe-bench)" = "$stamp_want" ] \
    && [ -x .venv-bench/bin/mergekit-yaml ]; then
  exit 0
fi
echo "setting up .venv-bench ($MERGEKIT) ..."
[ -x .venv-bench/bin/python ] || "$PYTHON" -m venv .venv-bench
PIP=".venv-bench/bin/python -m pip --disable-pip-version-check -q"
$PIP install "$TORCH"
$PIP install "$MERGEKIT" "$TORCH"
.venv-bench/bin/mergekit-yaml --help >/dev/null
echo "$stamp_want" > .venv-bench/.vlsafe-bench
echo ".venv-bench done"
