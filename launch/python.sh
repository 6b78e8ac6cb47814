# Sourced by the launch scripts: sets PYTHON to the interpreter longctx is installed in, so a
# launcher works without an activated virtual environment. In order: $PYTHON; the active venv
# ($VIRTUAL_ENV); .venv/ of this checkout; python3 on PATH. Stops with one line when that
# interpreter cannot find torch and longctx (run from the checkout root, or pip install -e .).
if [[ -z "${PYTHON:-}" ]]; then
  _checkout=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  if [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
    PYTHON=$VIRTUAL_ENV/bin/python
  elif [[ -x "$_checkout/.venv/bin/python" ]]; then
    PYTHON=$_checkout/.venv/bin/python
  else
    PYTHON=$(command -v python3 || command -v python || echo python3)
  fi
fi
export PYTHON
# find_spec: no import, so this costs milliseconds
if ! "$PYTHON" -c 'import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ("torch", "hydra", "trainer")))' 2>/dev/null; then
  echo "$(basename "$0"): $PYTHON cannot import torch, hydra and trainer: set PYTHON=/path/to/venv/bin/python" \
    "(the environment longctx is installed in) or activate that venv, and run from the longctx checkout" >&2
  exit 2
fi
