# Sourced by bin/demo, bin/test and bin/docs: create .venv and install the project once
# (again whenever pyproject.toml or constraints.txt changes).  torch is pinned to the CPU build
# first so that pip does not pull a multi-GB CUDA build to satisfy the plain `torch`
# requirement; every other package comes at the version constraints.txt pins (bin/update-pins
# moves the pins to the newest releases once the tests pass on them).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
EXTRAS="${FFO_EXTRAS:-dev,solvers,bench,moreau,ray,docs}"
CONSTRAINTS="${FFO_CONSTRAINTS:-$ROOT/constraints.txt}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.ffo-installed"
shopt -s nullglob
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT"/plugins/*/pyproject.toml "$CONSTRAINTS" 2>/dev/null \
        | sha1sum | cut -d' ' -f1)$EXTRAS"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  pin=()
  [ -f "$CONSTRAINTS" ] && pin=(-c "$CONSTRAINTS")
  echo "[ffo] setting up $VENV (first run, or pyproject.toml/constraints.txt changed;" \
       "about 3 minutes on a fresh machine)" >&2
  echo "[ffo] 1/3 pip and torch (CPU build) ..." >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  "$VENV/bin/python" -m pip install -q "torch==2.13.0" >&2
  echo "[ffo] 2/3 the project with its solvers and tools [$EXTRAS] ..." >&2
  "$VENV/bin/python" -m pip install -q "${pin[@]}" -e "$ROOT[$EXTRAS]" >&2
  echo "[ffo] 3/3 the example plugins ..." >&2
  for plugin in "$ROOT"/plugins/*/pyproject.toml; do
    "$VENV/bin/python" -m pip install -q "${pin[@]}" -e "$(dirname "$plugin")" >&2
  done
  echo "$WANT" > "$STAMP"
  echo "[ffo] set up." >&2
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PATH="$VENV/bin:$PATH"
