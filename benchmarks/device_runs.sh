# The GPU runs behind BENCHMARKS.md, as the lent machine takes them: commands of at most 10 minutes,
# the machine kept between commands only while they follow each other. Run from the repository root on
# the GPU machine after benchmarks/device_env.sh; results land in $OUT as one results.tgz.
#
#   bash benchmarks/device_runs.sh scale [WHAT...]       # FSDP2 step (world 1), streamed 7B/70B compression
#   bash benchmarks/device_runs.sh speed [WHAT...]       # many-token kernels: prefill, eval (needs the model)
#   bash benchmarks/device_runs.sh generate TOKENS [SEED] # the teacher's text
#   bash benchmarks/device_runs.sh queue SPEC...         # train SPECs one after another, detached
#   bash benchmarks/device_runs.sh pipeline TOKENS SPEC... # the queue, detached, each data order's TOKENS of
#                                                          # text generated before its first run
#   bash benchmarks/device_runs.sh wait SECONDS          # wait for the queue, pack what finished
#
# A SPEC is BPW[@TOKENS]:VARIANT[+VARIANT...][:INIT[:GRAD]] (variants in benchmarks/qat_variants.py, those
# joined by + in one process from one initial student; TOKENS, the run's budget, 1,638,400 unless given;
# INIT and GRAD, the --grad-power of the initialisation, those of littlebit train, itq-refined and 0.5,
# unless given), ptq, text (a pipeline's TOKENS of text and no run), or speed=WHAT[+WHAT...] (the speed measurements below, in the queue's turn, so
# that they do not share the GPU with a training run). The queue runs one job at a
# time: runs of the default model are launch-bound, and two processes on one GPU time-slice it, so
# side by side each ran several times slower than alone (measured on the H200: 4 runs and the PTQ
# benchmark together finished nothing but the PTQ benchmark in 9 minutes). The queue is detached so
# that it goes on between commands; each run saves a checkpoint every 5 minutes (the default
# save_interval_s) and resumes from it when restarted.
set -u
OUT=${OUT:?run on the device machine, where OUT is set}
ROOT=/root/lbruns
GEN=/root/lbgen
mkdir -p "$ROOT"

scale() {
  # What to measure, any of: fsdp compress7b reconstruct7b reconstruct70b (default: all; their time
  # limits add up to 560 s, under a command's 600)
  local what=${*:-fsdp compress7b reconstruct7b reconstruct70b}
  export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
  local stream=(python benchmarks/stream_compress.py --device cuda --threads 16)
  touch "$ROOT/.scale-start"  # the result files written after it are this run's
  for w in $what; do
    case $w in
      fsdp) rm -f "$ROOT/fsdp_step.json"
        timeout 120 python benchmarks/fsdp_step.py --out "$ROOT/fsdp_step.json" > "$ROOT/fsdp_step.log" 2>&1 ;;
      # 8 of the 32 layers: memory is the same as the whole model's, time is extrapolated from them
      compress7b) timeout 180 "${stream[@]}" --layers 8 --workdir /root/sc7 > "$ROOT/stream7b.log" 2>&1 ;;
      reconstruct7b) timeout 170 "${stream[@]}" --layers 4 --reconstruct --workdir /root/sc7r \
        > "$ROOT/stream7b_rec.log" 2>&1 ;;
      reconstruct70b) timeout 90 "${stream[@]}" --shape llama2-70b --layers 1 --reconstruct --workdir /root/sc70 \
        > "$ROOT/stream70b_rec.log" 2>&1 ;;
      *) echo "scale: unknown measurement $w" >&2 ;;
    esac
  done
  find benchmarks/results -name 'stream_*cuda*.json' -newer "$ROOT/.scale-start" -exec cp {} "$ROOT/" \;
  pack
}

speed() {
  # Any of: tests, trainingtests, gemm, acceptance, threshold, tiles, serving, expand, overlap, host, compile, bounds, causalbounds, compiledprofile, trainstep,
  # blockstep (below), prefill (per layer, time to first token, serving; about 8
  # minutes), eval (WikiText-2, every test window, recorded and eager, and all of PIQA; the default model
  # packed against FP, bf16; about 4 minutes),
  # profile (one 2048-token forward of the 7B shape, FP16 and packed, its time by kernel kind) and
  # generate (the teacher's text, three shards, one of each start kind, decoding steps recorded and eager;
  # then one decoding step of each sampler and loop at batch 256, and the loop's attention against
  # transformers' over 448 steps; needs the model).
  local what=${*:-profile prefill eval}
  # the layers, token counts, models, prompts and serving batches of the gemm and acceptance runs
  local grid=(--layers 70b-up,7b-up,7b-down --tokens 128,512,2048,8192 --models fp16,0.1,0.55,1.0
    --ttft 128,2048,8192 --serve 64,256 --steps 16 --reference-ttft 0)
  export PYTHONUNBUFFERED=1
  touch "$ROOT/.speed-start"
  for w in $what; do
    case $w in
      profile) timeout 150 python benchmarks/dev/ttft_profile.py > "$ROOT/ttft_profile.log" 2>&1 ;;
      prefill) timeout 480 python benchmarks/prefill.py --out "$ROOT/prefill.json" > "$ROOT/prefill.log" 2>&1 ;;
      eval) timeout 300 python benchmarks/eval_speed.py --device cuda --dtype bf16 --windows 1000 --limit 1838 \
        --reps 1 --tag eval_speed_gpu > "$ROOT/eval_speed.log" 2>&1 ;;
      generate) timeout 300 python benchmarks/generate_rate.py --shards 3 > "$ROOT/generate_rate.log" 2>&1
        timeout 120 python benchmarks/sampling_speed.py --batch 256 > "$ROOT/sampling_speed.log" 2>&1
        # the loop's grouped attention against transformers' own over a cache of 449 slots
        timeout 150 python benchmarks/sampling_speed.py --batch 256 --steps 448 \
          --routes littlebit-loop,littlebit-loop-transformers-sdpa >> "$ROOT/sampling_speed.log" 2>&1 ;;
      # the many-token kernels, the recorded decoding step and perplexity windows on the GPU itself (the
      # decoding step needs the model's tokenizer), then the GEMM path against the prefill kernels: per
      # layer, time to first token and batch-256 decoding of the 7B shape, and around its threshold;
      # expand: its expansion alone and in the whole call (about a minute); compile: compiled time to
      # first token of 8 layers
      tests) timeout 240 python -m pytest -q tests/test_prefill.py tests/test_batch_decoding.py tests/test_perplexity.py \
        > "$ROOT/test_prefill.log" 2>&1 ;;
      # recorded training steps, eager and compiled, against each other (about a minute)
      trainingtests) timeout 150 python -m pytest -q tests/test_compiled_steps.py tests/test_training.py -k recorded \
          > "$ROOT/test_training_gpu.log" 2>&1 ;;
      gemm) timeout 450 python benchmarks/prefill.py "${grid[@]}" --order layers,models,gemm-threshold \
        --out "$ROOT/prefill_gemm.json" > "$ROOT/prefill_gemm.log" 2>&1 ;;
      # acceptance: the same per layer and end to end without the threshold sweep (about 6 minutes)
      acceptance) timeout 400 python benchmarks/prefill.py "${grid[@]}" --order layers,models \
        --out "$ROOT/prefill_acceptance.json" > "$ROOT/prefill_acceptance.log" 2>&1 ;;
      # threshold: the GEMM path against the register-decoding kernels at 32-2048 tokens (about 4 minutes)
      threshold) timeout 300 python benchmarks/prefill.py --order gemm-threshold --tokens "" --ttft "" --serve "" \
        --out "$ROOT/prefill_threshold.json" > "$ROOT/prefill_threshold.log" 2>&1 ;;
      # tiles: the prefill kernels' tiles (``SWEEP``) on prompts and 256-token batches, and where they take
      # over from the 2-64-token kernels (about 4 minutes)
      tiles) timeout 300 python benchmarks/prefill.py --order sweep --tokens "" --ttft "" --serve "" \
        --out "$ROOT/prefill_tiles.json" > "$ROOT/prefill_tiles.log" 2>&1 ;;
      # serving: batched decoding of the 7B shape at batch 64 and 256 and an eager 96-token prompt (the
      # prefill kernels' range, where their extra launches cost host time), on the shipped routing and
      # with every call of 2 tokens or more on the prefill kernels (about 4 minutes; SERVING_ROUTES picks
      # one of the two)
      serving) for route in ${SERVING_ROUTES:-shipped prefill}; do
          local cfg='{}'
          [ "$route" = prefill ] && cfg='{"prefill_min_tokens": 2, "gemm_min_tokens": 1073741824}'
          timeout 150 python benchmarks/prefill.py --order models --models fp16,0.1,0.55 --ttft 96 --serve 64,256 \
            --steps 16 --reference-ttft 0 --kernel-config "$cfg" --out "$ROOT/serving_$route.json" \
            >> "$ROOT/serving.log" 2>&1
        done ;;
      expand) timeout 150 python benchmarks/dev/gemm_expand.py > "$ROOT/gemm_expand.log" 2>&1 ;;
      # overlap: one 7B decoder layer's packed calls at 256 and 64 tokens with each call's expansion on a
      # second stream behind the previous call's GEMMs, against dense and the packed op, and each call's parts (about two minutes)
      overlap) timeout 180 python benchmarks/dev/expand_overlap.py > "$ROOT/expand_overlap.log" 2>&1 ;;
      # host: one packed call's host time piece by piece on a tiny layer and on the 7B up projection (op,
      # backend, one launch; under two minutes)
      host) timeout 90 python benchmarks/dev/host_overhead.py > "$ROOT/host_overhead.log" 2>&1
        timeout 90 python benchmarks/dev/host_overhead.py --layer 7b-up >> "$ROOT/host_overhead.log" 2>&1 ;;
      compile) timeout 150 python benchmarks/dev/ttft_compile.py --layers 8 --models fp16,0.1,0.55,1.0 \
        --name ttft_compile_gemm > "$ROOT/ttft_compile_gemm.log" 2>&1 ;;
      # bounds: the same compiled forward with cuBLAS on unpacked low-rank factors in place of the packed
      # layers (what any packed kernel running the same GEMMs can reach) and with a copy in place of every
      # decoder linear (the rest of the forward, which no layer kernel removes), beside them (about three minutes)
      # trainstep: a global-distillation step of the default model at the default batch (2 x 512),
      # recorded eager against recorded compiled layers, recompilations logged (about four minutes)
      trainstep) for c in off on; do
          TORCH_LOGS=recompiles timeout 200 python benchmarks/dev/train_profile.py --batch-size 2 --steps 20 \
            --compile $c --out "$ROOT/train_profile_b2.json" >> "$ROOT/train_profile.log" 2>&1
        done ;;
      # blockstep: block-stage steps, eager against compiled, on a random model of the default model's
      # shape (no model needed; under a minute)
      blockstep) timeout 170 python benchmarks/dev/block_stage_speed.py --layers 6 --sequences 64 \
          --out "$ROOT/block_stage_speed.json" > "$ROOT/block_stage_speed.log" 2>&1 ;;
      bounds) timeout 240 python benchmarks/dev/ttft_compile.py --layers 8 \
        --models fp16,no-linear,lowrank-0.1,0.1,lowrank-0.55,0.55 --name ttft_bounds > "$ROOT/ttft_bounds.log" 2>&1 ;;
      # the same with the attention on SDPA's own causal mask, no mask tensor (about three minutes)
      causalbounds) timeout 240 python benchmarks/dev/ttft_compile.py --layers 8 --causal-attention \
        --models fp16,no-linear,lowrank-0.1,0.1,lowrank-0.55,0.55 --name ttft_bounds_causal > "$ROOT/ttft_bounds_causal.log" 2>&1 ;;
      # compiledprofile: the same compiled forwards' kernel time by kind (cuBLAS, attention, expansion,
      # Inductor's fused kernels), FP16, the unpacked stand-in and packed at 0.1 BPW (about two minutes)
      compiledprofile) timeout 200 python benchmarks/dev/ttft_profile.py --compile --layers 8 \
        --models fp16,no-linear,lowrank-0.1,0.1 --name ttft_profile_compiled > "$ROOT/ttft_profile_compiled.log" 2>&1 ;;
      *) echo "speed: unknown measurement $w" >&2 ;;
    esac
  done
  find benchmarks/results \( -name 'eval_speed_gpu*.json' -o -name 'ttft_profile.json' -o -name 'generate_rate_cuda.json' \
    -o -name 'ttft_compile_gemm.json' -o -name 'ttft_bounds*.json' -o -name 'ttft_profile_compiled.json' -o -name 'gemm_expand.json' -o -name 'expand_overlap.json' -o -name 'host_overhead_cuda*.json' -o -name 'sampling_speed_cuda*.json' \) \
    -newer "$ROOT/.speed-start" -exec cp {} "$ROOT/" \;
  pack
}

generate() {
  # TOKENS of the teacher's text for one data order (SEED, default 0: what runs without -seed1 use).
  # Shards brought back from an earlier machine are not sampled again: carry them in .dev-generated,
  # as the archive wait brings back (generated.tgz, its parts joined with cat) or unpacked.
  local tokens=$1 seed=${2:-0}
  if [ -f .dev-generated/generated.tgz ]; then
    mkdir -p "$GEN" && tar xzf .dev-generated/generated.tgz -C "$GEN"
  elif [ -d .dev-generated ]; then
    mkdir -p "$GEN" && cp -r .dev-generated/. "$GEN/"
  fi
  # A time limit that fits one 10-minute command; a detached pipeline lifts it (GEN_LIMIT_S).
  timeout "${GEN_LIMIT_S:-540}" python -m littlebit.cli generate-data --seed "$seed" --out "$GEN" \
    --tokens "$tokens" > "$ROOT/generate-seed$seed.log" 2>&1 && touch "$ROOT/generated-seed$seed.done"
  tail -n 3 "$ROOT"/generate-*.log
  # int32 tokens, brought back and carried to later machines: in parts of 15 MiB, under the 16 MiB a
  # returned file may have, once the text passes about 4M tokens
  if [ -d "$GEN" ]; then
    rm -f "$OUT"/generated.tgz*
    tar czf "$OUT/generated.tgz" -C "$GEN" .
    if [ "$(stat -c %s "$OUT/generated.tgz")" -gt $((15 << 20)) ]; then
      split -b 15M -d "$OUT/generated.tgz" "$OUT/generated.tgz.part-" && rm "$OUT/generated.tgz"
    fi
  fi
  pack
}

queue() {
  _detach run-queue "$@"
}

pipeline() {
  # The teacher's text and the runs that need it in one detached job: the generation goes on between
  # commands instead of holding one, and the first run starts as soon as the text is there.
  _detach run-pipeline "$@"
}

_detach() {
  if [ -f "$ROOT/queue.pid" ] && kill -0 "$(cat "$ROOT/queue.pid")" 2>/dev/null; then
    echo "a queue is running already ($(cat "$ROOT/queue.pid")): wait for it, then queue these" >&2
    return 1
  fi
  # The queue outlives this command, whose OUT goes away with it: results go under ROOT.
  mkdir -p "$ROOT/out"
  OUT=$ROOT/out OMP_NUM_THREADS=8 setsid nohup bash "$0" "$@" >> "$ROOT/queue.log" 2>&1 < /dev/null &
  echo $! > "$ROOT/queue.pid"
}

run_queue() {
  for spec in "$@"; do
    local name=${spec//:/-}
    [ -f "$ROOT/$name.done" ] && continue
    if [[ $spec == speed=* ]]; then  # speed measurements after (or between) the training runs
      local what=${spec#speed=}
      speed ${what//+/ } && touch "$ROOT/$name.done"
      continue
    fi
    if [ "$spec" = text ]; then  # a pipeline's text alone, brought back by wait for a later machine
      [ -f "$ROOT/generated-seed0.done" ] || GEN_LIMIT_S=3600 generate "${GEN_TOKENS:?text needs a pipeline}" 0
      [ -f "$ROOT/generated-seed0.done" ] && touch "$ROOT/text.done"
      continue
    fi
    if [ "$spec" = ptq ]; then
      python benchmarks/ptq.py >> "$ROOT/ptq.log" 2>&1 && cp benchmarks/results/ptq.json "$ROOT/" && touch "$ROOT/ptq.done"
      continue
    fi
    local seeds=0
    [[ $spec == *seed1* ]] && seeds="0 1"
    # A pipeline writes the text of each data order before its first run (nothing to do when it is
    # there); a run would otherwise sample it eagerly, on the clock.
    for seed in $seeds; do
      if [ -n "${GEN_TOKENS:-}" ] && [ ! -f "$ROOT/generated-seed$seed.done" ]; then
        GEN_LIMIT_S=3600 generate "$GEN_TOKENS" "$seed"
      fi
    done
    case $spec in
      *generated* | *gen0*)
        local seed=${seeds##* }
        [ -f "$ROOT/generated-seed$seed.done" ] || { echo "$spec: no generated text" >> "$ROOT/$name.log"; continue; } ;;
    esac
    local bpw=${spec%%:*} rest=${spec#*:} init=itq-refined grad=0.5 budget=()
    [[ $bpw == *@* ]] && budget=(--tokens "${bpw#*@}") && bpw=${bpw%@*}
    [[ $rest == *:* ]] && init=${rest#*:}
    [[ $init == *:* ]] && grad=${init#*:} && init=${init%%:*}
    local variants=${rest%%:*}
    # VARIANT+VARIANT...: one process, one initial student (--reuse-init), one model load and FP score
    python benchmarks/qat.py --runs "$bpw:$init" --variant ${variants//+/ } "${budget[@]}" --reuse-init --grad-power "$grad" \
      --generated-dir "$GEN" --work "$ROOT/work-$name" --resume --fp-scores "$ROOT/fp.json" \
      --out "$ROOT/$name.json" --logs "$ROOT/$name.jsonl" >> "$ROOT/$name.log" 2>&1 \
      && python -c 'import json, sys; sys.exit(len({r["variant"] for r in json.load(open(sys.argv[1])) if "headline" in r}) < int(sys.argv[2]))' \
        "$ROOT/$name.json" "$(tr '+' '\n' <<< "$variants" | wc -l)" && touch "$ROOT/$name.done"
  done
}

wait_queue() {
  local until=$((SECONDS + $1))
  while [ $SECONDS -lt $until ] && [ -f "$ROOT/queue.pid" ] && kill -0 "$(cat "$ROOT/queue.pid")" 2>/dev/null; do
    sleep 5
  done
  for log in "$ROOT"/*.log; do echo "== $log"; tr '\r' '\n' < "$log" | grep -v 'it/s\]' | tail -n 3; done
  pack
}

pack() {
  # One archive: the machine returns a limited number of files per command.
  tar czf "$OUT/results.tgz" -C "$ROOT" --exclude='work-*' --exclude=out .
  # a detached pipeline's generated text, to carry to the next machine
  [ "$OUT" != "$ROOT/out" ] && compgen -G "$ROOT/out/generated.tgz*" > /dev/null && cp "$ROOT"/out/generated.tgz* "$OUT/"
  return 0
}

case ${1:-} in
  scale) shift; scale "$@" ;;
  speed) shift; speed "$@" ;;
  generate) generate "${2:?generate TOKENS [SEED]}" "${3:-0}" ;;
  queue) shift; queue "$@" ;;
  pipeline) shift; pipeline "$@" ;;
  run-queue) shift; run_queue "$@" ;;
  run-pipeline) shift; GEN_TOKENS=$1; shift; run_queue "$@" ;;
  wait) wait_queue "${2:?wait SECONDS}" ;;
  *) echo "usage: device_runs.sh scale [WHAT...] | speed [WHAT...] | generate TOKENS [SEED] | queue SPEC... | pipeline TOKENS SPEC... | wait SECONDS" >&2; exit 2 ;;
esac
