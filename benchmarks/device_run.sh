#!/usr/bin/env bash
# Issue 3's GPU checks and measurements in one device call (see ../.library/device/README.md):
#
#   run(command="benchmarks/device_run.sh", carry=[".whl"], timeout_s=590)
#
# Before it, here (the device machine has torch, triton, transformers and peft but maybe
# not lark): echo /.whl/ >> .git/info/exclude, then
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 --platform any -d .whl \
#     lark interegular pytest iniconfig pluggy pygments pytest-xdist execnet
# Logs and the updated RESULTS.md come back under $OUT; copy the new RESULTS.md sections
# into benchmarks/RESULTS.md here. Each step has its own time limit so a slow one leaves
# the others' output intact; rows print as they are measured, so a step cut short still
# reports what it finished. torch.compile of the 22-layer model takes a while per provider,
# so the compile step covers two workloads at 8x512 only: run more in a second call.
# Arguments name the steps to run (default: all). The steps' limits add up to ~40 minutes,
# more than a session's device time (15 minutes in all, start-up included), so run the most
# telling first, e.g.
#   run(command="benchmarks/device_run.sh test_gpu targets updates", carry=[".whl"],
#       timeout_s=590)
# (correctness of every kernel path, every autotune tile and CUDA-graph decoding; the
# device time of issue 3's open targets at 8x512, the host's cost taken out by CUDA-graph
# replay; the accumulate_updates A/B), then as the time left allows "kernels" (rooflines
# of the three mixture paths), "infer_graphs" (every workload at 1x1 and 8x512), "host",
# "decode_graphs" or "infer_eager". A machine stays warm 30 s after a call: have the next
# command ready.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/adaptc-device}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

only=" $* "
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $out/NAME.log
  local name=$1 limit=$2
  shift 2
  if [ -n "${only// /}" ] && [[ "$only" != *" $name "* ]]; then return; fi
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "   rc=$? ($(tail -n 1 "$out/$name.log"))"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
python3 -c "import torch, triton, transformers, peft, lark, safetensors; print('torch', \
torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, \
'peft', peft.__version__)" | tee -a "$out/device.txt" || exit 1
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 14")  # compiles in parallel
# -v: each test's result as it finishes, so a step cut at its limit still says which ran
step test_gpu 150 python3 -m pytest -v -p no:cacheprovider $workers tests/test_gpu.py
# issue 3's three open targets alone, first: device time at 8x512 (CUDA-graph replay)
step targets 150 python3 benchmarks/infer_speed.py --cuda-graph --rounds 3 --shapes 8x512 \
  --workloads all-linear bottleneck mixture --providers adaptc peft
# accumulate_updates A/B (4-layer Llama at the 1.1B's width; device time)
step updates 120 python3 benchmarks/unmerged_updates.py --tokens 8x512 --hidden 2048 --write
step infer_graphs 240 python3 benchmarks/infer_speed.py --cuda-graph --rounds 3 --write \
  --shapes 1x1 8x512
step kernels 150 python3 benchmarks/kernel_roofline.py --dtype bfloat16 --hidden 2048 --rank 8 \
  --tokens 1 64 1024 4096 16384
step host 100 python3 benchmarks/host_overhead.py --device cuda --rounds 3 --tokens 32 --write
step infer_eager 300 python3 benchmarks/infer_speed.py --rounds 3 --write
step decode 240 python3 benchmarks/decode.py --model 1.1b --tokens 32 --rounds 3 --write
step decode_graphs 240 python3 benchmarks/decode.py --model 1.1b --tokens 32 --rounds 3 \
  --cuda-graph --write
step infer_compile 400 python3 benchmarks/infer_speed.py --compile --rounds 3 --write \
  --shapes 8x512 --workloads merged "q,v r8" --providers adaptc peft
step infer_cudagraphs 400 python3 benchmarks/infer_speed.py --compile reduce-overhead --rounds 3 \
  --write --shapes 1x128 8x512 --workloads all-linear bottleneck mixture --providers adaptc
cp benchmarks/RESULTS.md "$out/RESULTS.md"
