#!/usr/bin/env bash
# The GPU check that fits a short lease: at most 8 minutes on an H100 or H200 (16 cores), from the
# repository root:
#
#   bash bench/gpu_check.sh [OUT]              # OUT: default $OUT if set, else bench/results/<gpu>
#   bash bench/gpu_check.sh OUT --dry-run      # tiny shapes and no suite, on any machine: checks the files
#
# Steps, each time-boxed with `timeout` (a step that overruns is killed and the next one runs):
#   environment   devices, versions, which backends run natively        environment.json
#   suite         pytest -n 14 tests, natively (pytest-xdist)             check.log
#   ops           every kernel against PyTorch at the kernel targets'    ops.md, ops.json
#                 shapes, with the device-to-device copy as the ceiling
#   model         LoopLM 1Lx12 eval forward (B=64, T=256) per backend,    model.md, model.json
#                 halting with half the tokens stopping at loop 4; decode
#                 at batch 1 and 16 against Hugging Face GPT-2; the torch
#                 forward compiled (CUDA graphs), halting on a frozen plan
#   summary       each step's status and time                            summary.md
# At most these 7 files; the script commits nothing. cuTile runs natively only when `.tiletk/`
# (built by the workspace's tile-toolkit script) was carried along: it is unpacked first.
set -uo pipefail
dry_run=0
positional=()
for arg in "$@"; do
  case $arg in
    --dry-run) dry_run=1 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) positional+=("$arg") ;;
  esac
done
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "$dry_run" = 0 ] && [ -f .tiletk/tk.tar.xz ]; then  # the cuTile compiler set, as tile-toolkit.sh says
  timeout 60 tar xJf .tiletk/tk.tar.xz -C /tmp && timeout 60 "$py" -m pip install -q --no-index --no-deps \
    --target /tmp/site .tiletk/cuda_tile-*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH PATH=/tmp/tk/bin:$PATH \
    CUDA_HOME=/tmp/tk
fi

out=${positional[0]:-${OUT:-bench/results/$("$py" -m bench.gpu_check gpu-name)}}
mkdir -p "$out"
log="$out/check.log"
: > "$log"
summary=("| step | status | seconds |" "| --- | --- | --- |")
failed=0
began=$SECONDS

step() {  # step NAME SECONDS COMMAND...: run under timeout, log, record
  local name=$1 limit=$2 start=$SECONDS status
  shift 2
  echo "== $name (at most ${limit}s): $*" | tee -a "$log"
  timeout -k 10 "$limit" "$@" >>"$log" 2>&1
  case $? in
    0) status=ok ;;
    124|137) status="timed out after ${limit}s"; failed=1 ;;
    *) status=failed; failed=1 ;;
  esac
  echo "   $status" | tee -a "$log"
  summary+=("| $name | $status | $((SECONDS - start)) |")
}

dry=()
[ "$dry_run" = 1 ] && dry=(--dry-run)
step environment 30 "$py" -m bench.gpu_check env "$out"
if [ "$dry_run" = 1 ]; then
  summary+=("| suite | skipped (dry run) | 0 |")
else
  workers=()
  "$py" -c "import xdist" 2>/dev/null && workers=(-n "${GPU_CHECK_WORKERS:-14}")
  step suite 160 "$py" -m pytest -q -p no:cacheprovider "${workers[@]}" tests
fi
step ops 110 "$py" -m bench.gpu_check ops "$out" --budget 85 "${dry[@]}"
step model 160 "$py" -m bench.gpu_check model "$out" --budget 115 "${dry[@]}"

{
  echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "command: \`bash bench/gpu_check.sh $*\`; $((SECONDS - began)) s in all; tables: ops.md, model.md; output: check.log"
  echo
  printf '%s\n' "${summary[@]}"
  echo
  echo "suite: $(grep -E '^(=+ )?[0-9]+ (passed|failed)' "$log" | tail -1)"
} > "$out/summary.md"
cat "$out/summary.md"
exit $failed
