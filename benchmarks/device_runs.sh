# The GPU runs behind BENCHMARKS.md, as the lent machine takes them: commands of at most 10 minutes,
# the machine kept between commands only while they follow each other. Run from the repository root on
# the GPU machine; results land in $OUT.
#
#   bash benchmarks/device_runs.sh scale                 # FSDP2 step (world 1), streamed 7B/70B compression
#   bash benchmarks/device_runs.sh recipe TOKENS SPEC... # generate the teacher's text, then train SPECs
#   bash benchmarks/device_runs.sh wait SECONDS          # wait for the training runs, copy what finished
#
# A SPEC is BPW:VARIANT (benchmarks/qat_variants.py) or ptq. The training runs are started detached and
# side by side: one run of the default model keeps an H200 mostly idle (launch-bound steps of 2 x 512
# tokens), so several at once take little longer than one; their times are then not a single run's,
# and each record says how many ran together. Each saves a checkpoint every 200 steps and, started
# again after an interruption, resumes from it.
set -u
OUT=${OUT:?run on the device machine, where OUT is set}
ROOT=/root/lbruns
mkdir -p "$ROOT"

scale() {
  export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
  timeout 130 python benchmarks/fsdp_step.py --out "$OUT/fsdp_step.json" > "$OUT/fsdp_step.log" 2>&1
  tail -n 4 "$OUT/fsdp_step.log"
  # 8 of the 32 layers: memory is the same as the whole model's, time is extrapolated from them
  timeout 200 python benchmarks/stream_compress.py --device cuda --threads 16 --shape llama2-7b --layers 8 \
    --workdir /root/sc7 > "$OUT/stream7b.log" 2>&1
  tail -n 12 "$OUT/stream7b.log"
  timeout 110 python benchmarks/stream_compress.py --device cuda --threads 16 --shape llama2-7b --layers 4 \
    --reconstruct --workdir /root/sc7r > "$OUT/stream7b_rec.log" 2>&1
  tail -n 12 "$OUT/stream7b_rec.log"
  timeout 110 python benchmarks/stream_compress.py --device cuda --threads 16 --shape llama2-70b --layers 1 \
    --reconstruct --workdir /root/sc70 > "$OUT/stream70b_rec.log" 2>&1
  tail -n 12 "$OUT/stream70b_rec.log"
  cp benchmarks/results/stream_*cuda*.json "$OUT/" 2>/dev/null
}

recipe() {
  local tokens=$1
  shift
  # Text for every run at once, before they start, so no two runs write the same shards.
  if [ ! -f "$ROOT/generated.done" ]; then
    timeout 400 python -m littlebit.cli generate-data --tokens "$tokens" --out /root/lbgen \
      > "$OUT/generate.log" 2>&1 && touch "$ROOT/generated.done"
    tail -n 5 "$OUT/generate.log"
    cp -r /root/lbgen "$OUT/generated"  # small (int32 tokens); lets a later machine skip the sampling
  fi
  local n=$#
  for spec in "$@"; do
    local name=${spec/:/-}
    [ -f "$ROOT/$name.done" ] && continue
    if [ -f "$ROOT/$name.pid" ] && kill -0 "$(cat "$ROOT/$name.pid")" 2>/dev/null; then continue; fi
    if [ "$spec" = ptq ]; then
      cmd=(python benchmarks/ptq.py)  # writes benchmarks/results/ptq.json
    else
      cmd=(python benchmarks/qat.py --runs "${spec%%:*}:itq" --variant "${spec#*:}" --generated-dir /root/lbgen
        --work "$ROOT/work-$name" --resume --save-every 200 --fp-scores "$ROOT/fp.json"
        --out "$ROOT/$name.json" --logs "$ROOT/$name.jsonl")
    fi
    echo "$n" > "$ROOT/$name.concurrent"
    OMP_NUM_THREADS=2 setsid nohup bash -c '"$@" && touch '"$ROOT/$name.done" _ "${cmd[@]}" \
      >> "$ROOT/$name.log" 2>&1 < /dev/null &
    echo $! > "$ROOT/$name.pid"
    # The first run scores the FP model once; the others read its scores.
    if [ ! -f "$ROOT/fp.json" ] && [ "$spec" != ptq ]; then
      for _ in $(seq 120); do [ -f "$ROOT/fp.json" ] && break; sleep 1; done
    fi
  done
}

wait_runs() {
  local until=$((SECONDS + $1))
  while [ $SECONDS -lt $until ]; do
    local busy=0
    for pid in "$ROOT"/*.pid; do
      [ -f "$pid" ] && kill -0 "$(cat "$pid")" 2>/dev/null && busy=1
    done
    [ $busy = 0 ] && break
    sleep 5
  done
  cp "$ROOT"/*.json "$ROOT"/*.log "$ROOT"/*.concurrent "$ROOT"/*.done "$OUT/" 2>/dev/null
  cp "$ROOT"/*.jsonl "$OUT/" 2>/dev/null
  [ -f "$ROOT/ptq.done" ] && cp benchmarks/results/ptq.json "$OUT/ptq.json"
  for log in "$ROOT"/*.log; do echo "== $log"; tail -n 3 "$log"; done
  ls /root/lbgen/*/ 2>/dev/null | head -3
}

case ${1:-} in
  scale) scale ;;
  recipe) shift; recipe "$@" ;;
  wait) wait_runs "$2" ;;
  *) echo "usage: device_runs.sh scale | recipe TOKENS SPEC... | wait SECONDS" >&2; exit 2 ;;
esac
