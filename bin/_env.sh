# Sourced by bin/demo and bin/test: create .venv and install the project once (re-done when
# pyproject.toml changes).  torch is pinned to the CPU build first so that pip does not pull
# a multi-GB CUDA build to satisfy the plain `torch` requirement.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.ffo-installed"
shopt -s nullglob
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT"/plugins/*/pyproject.toml | sha1sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[ffo] setting up $VENV (first run or pyproject changed) ..." >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  "$VENV/bin/python" -m pip install -q "torch==2.13.0" >&2
  "$VENV/bin/python" -m pip install -q -e "$ROOT[dev,solvers,bench,ray]" >&2
  for plugin in "$ROOT"/plugins/*/pyproject.toml; do
    "$VENV/bin/python" -m pip install -q -e "$(dirname "$plugin")" >&2
  done
  echo "$WANT" > "$STAMP"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PATH="$VENV/bin:$PATH"
