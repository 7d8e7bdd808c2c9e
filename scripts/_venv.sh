# Sourced by scripts/run and scripts/test: make .venv (Python >= 3.12) with the pinned dependencies.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

find_python() {
  local candidates=("${OUTPOST_PYTHON:-}" python3.13 python3.12 python3)
  if command -v pyenv >/dev/null 2>&1; then
    local root; root="$(pyenv root)"
    candidates+=("$root"/versions/3.13*/bin/python3 "$root"/versions/3.12*/bin/python3)
  fi
  candidates+=("$HOME"/.pyenv/versions/3.1[3-9]*/bin/python3 "$HOME"/.pyenv/versions/3.12*/bin/python3)
  for py in "${candidates[@]}"; do
    [ -n "$py" ] || continue
    command -v "$py" >/dev/null 2>&1 || [ -x "$py" ] || continue
    if "$py" -c 'import sys, venv; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      echo "$py"; return 0
    fi
  done
  echo "No Python >= 3.12 found. Install one (e.g. pyenv install 3.13) or set OUTPOST_PYTHON." >&2
  return 1
}

ensure_venv() {
  local lock="$ROOT/requirements.lock" stamp="$VENV/.installed" wanted="$VENV/.wanted"
  if [ ! -x "$VENV/bin/python" ]; then
    local py; py="$(find_python)"
    echo "creating $VENV with $("$py" --version)" >&2
    "$py" -m venv "$VENV"
  fi
  cat "$lock" "$ROOT/pyproject.toml" > "$wanted"  # the lock and the package's entry points
  if [ ! -f "$stamp" ] || ! cmp -s "$wanted" "$stamp"; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$lock" 2> >(grep -v "^WARNING: Location" >&2)
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e "$ROOT" 2> >(grep -v "^WARNING: Location" >&2)
    cp "$wanted" "$stamp"
  fi
  rm -f "$wanted"
}
ensure_venv
