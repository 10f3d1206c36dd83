# Source on a GPU machine without network access before a benchmark. Everything it needs travels in
# two runs on the same warm machine (a run carries at most 64 MiB; ../shared/tools/stage-for-device.sh
# splits the default model, benchmarks/device_wheels.sh fetches the wheels the image lacks):
#   run 1, carry .dev-model-a .dev-wheels:            . benchmarks/device_env.sh   (stages; says what is left)
#   run 2, carry .dev-model-b .dev-data [.dev-generated]: . benchmarks/device_env.sh && python benchmarks/qat.py ...
# It keeps the model's first half, the installed wheels (gguf, lm-eval and the part of its
# dependencies the image lacks) and the evaluation data under /root, assembles and checks the model
# once the second half is here, and points littlebit at the model and the data there: a later command
# on the same machine carries nothing (a call that does not carry a path removes it from the working
# copy, which a detached queue still reading .dev-data would not survive). It returns non-zero while
# anything is missing, so a command chained after it with && does not start without it.
model=/root/m/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p /root/m
[ -f .dev-model-a/part-a ] && [ ! -f "$model" ] && cp .dev-model-a/part-a /root/m/
export PYTHONPATH=$PWD/src:/root/site
if [ -d .dev-wheels ] && ! python -c "import gguf, lm_eval" 2>/dev/null; then
  python -m pip install -q --no-index --no-deps --no-compile --upgrade --target /root/site .dev-wheels/*.whl
fi
if [ -f .dev-model-b/part-b ] && [ ! -f "$model" ]; then
  cat /root/m/part-a .dev-model-b/part-b > "$model" && sha256sum -c .dev-model-b/SHA256 || { rm -f "$model"; return 1; }
fi
python -c "import gguf, lm_eval" 2>/dev/null || { echo "gguf or lm-eval missing: carry .dev-wheels"; return 1; }
[ -f "$model" ] || { echo "default model incomplete: carry .dev-model-b (first half: .dev-model-a)"; return 1; }
[ -d .dev-data ] && mkdir -p /root/data && cp -r .dev-data/. /root/data/
[ -d /root/data/wikitext-2-raw ] || { echo "evaluation data missing: carry .dev-data"; return 1; }
export LITTLEBIT_DEFAULT_GGUF=$model LITTLEBIT_DATA=/root/data
