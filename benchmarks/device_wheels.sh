# Run here (with PyPI access) before staging a GPU machine: the wheels the GPU image lacks, into .dev-wheels/ (git
# ignores it), at the versions of requirements/lock.txt. The image has torch, transformers, triton,
# pandas, pyarrow, scikit-learn and sacrebleu but not gguf (the default model's loader) nor lm-eval and
# the part of its dependencies outside that list (PIQA in every training benchmark needs it).
# benchmarks/device_env.sh installs them there; carry .dev-wheels with .dev-model-a (run 1).
#   bash benchmarks/device_wheels.sh
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
pins() { for name in "$@"; do grep -i -m1 "^${name}==" requirements/lock.txt || { echo "$name: not in requirements/lock.txt" >&2; exit 1; }; done; }
binary=(gguf lm_eval datasets evaluate dill multiprocess pytablewriter DataProperty mbstrdecoder pathvalidate
  tabledata tcolorpy typepy chardet nltk more-itertools)
source_only=(rouge_score sqlitedict word2number)  # published as sources only: built here, pure Python
mkdir -p .dev-wheels
grep -qx "/.dev-wheels/" .git/info/exclude 2>/dev/null || echo "/.dev-wheels/" >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d .dev-wheels $(pins "${binary[@]}")
python3 -m pip wheel -q --no-deps -w .dev-wheels $(pins "${source_only[@]}")
du -sh .dev-wheels
