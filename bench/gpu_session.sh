#!/usr/bin/env bash
# Every check that needs a GPU, in one command, with its results written to one folder:
# the parity tiers natively, the benchmarks and their report, a tuning table, and the shakespeare
# and addition runs at GPU size. Run from the repository root on a machine with a CUDA GPU:
#
#   bash bench/gpu_session.sh h100 [OUT]           # OUT defaults to out/gpu-<name>-<date>
#
# The GPU's Python needs torch, triton, pytest, pytest-benchmark, tabulate, numpy, safetensors,
# tqdm and matplotlib. For cuTile on a machine that cannot install packages, build .tiletk/ first
# with the workspace's tile-toolkit script; the lines below unpack it when it is there.
# Each step logs to OUT/<step>.log and a failing step does not stop the ones after it; the exit
# status is non-zero when any step failed.
set -uo pipefail
gpu=${1:?usage: bash bench/gpu_session.sh GPU_NAME [OUT]  (e.g. h100, rtx5070)}
out=${2:-out/gpu-$gpu-$(date -u +%Y%m%d-%H%M)}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ -f .tiletk/tk.tar.xz ]; then
  tar xJf .tiletk/tk.tar.xz -C /tmp && python3 -m pip install -q --no-index --no-deps --target /tmp/site \
    .tiletk/cuda_tile-*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH PATH=/tmp/tk/bin:$PATH CUDA_HOME=/tmp/tk
fi

failed=()
step() {  # step NAME COMMAND...: run, log, remember failures
  local name=$1; shift
  echo "== $name: $*"
  if "$@" >"$out/$name.log" 2>&1; then echo "   ok"; else echo "   FAILED (see $out/$name.log)"; failed+=("$name"); fi
}

step environment python3 -c "import torch, looplm; print(torch.__version__, torch.cuda.get_device_name()); \
print(looplm.available_backends())"
step parity python3 -m pytest -q -k hierarchical_parity --junitxml="$out/parity.xml"
step tests python3 -m pytest -q tests
step bench python3 -m pytest bench --benchmark-only --benchmark-json="$out/bench.json"
step bench-report python3 -m bench.report "$out/bench.json"
# the design's roofline estimate (bench/results/roofline_estimate.md) with this GPU's measured percent beside it
step roofline python3 -m bench.report --static "$out/bench.json" --out "$out/roofline"
# what the default configs compile to with this machine's toolchain (the committed table is from the CPU machine)
step resources python3 -m tuning.resources --out "$out/kernel_resources"
step autotune python3 -m tuning.autotune --gpu "$gpu" --out "$out/$gpu.json"
step shakespeare python3 -m looplm.train configs/shakespeare_loop1x12.py --out_dir="$out/shakespeare_loop1x12" \
  --progress=False
step addition python3 -m looplm.train configs/addition_loop.py --out_dir="$out/addition" --progress=False
step addition-eval python3 -m looplm.eval_addition "$out/addition/best" --digits 1-20

echo "results in $out"
if [ ${#failed[@]} -gt 0 ]; then echo "failed: ${failed[*]}"; exit 1; fi
