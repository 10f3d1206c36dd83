# Source on a GPU machine without network access before a benchmark (see ../shared/tools/stage-for-device.sh):
# assembles the default model from the two staged halves when they are here, installs the carried
# gguf wheel, and points littlebit at the model and the carried evaluation data.
#   . benchmarks/device_env.sh && python benchmarks/qat.py ...
model=/root/m/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -f .dev-model-b/part-b ] && [ ! -f "$model" ]; then
  cat /root/m/part-a .dev-model-b/part-b > "$model" && sha256sum -c .dev-model-b/SHA256 || return 1
fi
[ -f "$model" ] || { echo "default model missing on this machine: stage it again (run 1)"; return 1; }
python -c "import gguf" 2>/dev/null || python -m pip install -q --no-deps .dev-wheels/gguf-*.whl || return 1
export LITTLEBIT_DEFAULT_GGUF=$model LITTLEBIT_DATA=$PWD/.dev-data PYTHONPATH=$PWD/src
