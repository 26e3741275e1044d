#!/usr/bin/env bash
# The H100 suite behind the README table: GPU tests, then the standard-setting benchmarks (recorded in
# benchmarks/results.jsonl). Usage on the GPU machine: bash benchmarks/h100_suite.sh OUT_DIR [part...]
# Parts (default: tests dense): tests, dense (8B/0.6B headline rows), memory (recompute and 4-bit operating
# points), big (14B fp8, 32B qfp4/qnf4), multi (1/2/4-GPU data parallel and 32B sharded; needs 4 GPUs).
# A full run takes longer than one 10-minute device call: pass one or two parts per call.
set -o pipefail
out=${1:-/tmp/out}
shift || true
parts=${*:-tests dense}
export SUROGATE_COMMIT=${SUROGATE_COMMIT:?set SUROGATE_COMMIT: the tree on the GPU machine has no usable .git}
run() { bash benchmarks/gpu_run.sh "$@"; }
bench() { run python3 tools/benchmark_sft.py "$@" 2>&1 | tee -a "$out/bench.log" | grep -E '^\{|Error' | tail -4; }
multi() {
  local n=$1; shift
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} run torchrun --nproc-per-node "$n" tools/benchmark_sft.py "$@" 2>&1 |
    tee -a "$out/bench.log" | grep -E '^\{|Error' | tail -4
}
for part in $parts; do
  case $part in
    tests) run python3 -m pytest -q -m gpu tests 2>&1 | tee "$out/gpu_tests.log" | tail -3 ;;
    dense)
      bench --model qwen3-8b --recipe bf16 fp8 qfp8 --check-eager
      bench --model qwen3-8b --no-passes
      bench --model qwen3-0.6b --recipe bf16 fp8 --baseline hf-peft
      bench --model qwen3-0.6b --no-passes
      bench --model qwen3-8b --recipe bf16 --docs-per-row 4 ;;
    memory)
      bench --model qwen3-8b --recipe bf16 qfp8 qfp4 --recompute
      bench --model qwen3-8b --recipe qnf4 --precision compute=fp8 --recompute-layers 32
      bench --model qwen3-8b --recipe qnf4 --recompute ;;
    big)
      bench --model qwen3-14b --recipe bf16 fp8
      bench --model qwen3-32b --recipe qfp4 --recompute-layers 48 --steps 3
      bench --model qwen3-32b --recipe qnf4 --precision compute=fp8 --recompute-layers 46 --steps 3 ;;
    multi)
      bench --model qwen3-8b --recipe bf16 fp8
      multi 2 --model qwen3-8b --recipe bf16 fp8
      multi 4 --model qwen3-8b --recipe bf16 fp8
      multi 4 --model qwen3-32b --recipe bf16 --shard-base-weights true --recompute --warmup 1 --steps 2 ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac
done
cp benchmarks/results.jsonl "$out/results.jsonl"
run python3 tools/benchmark_sft.py --readme && cp README.md "$out/README.md"
