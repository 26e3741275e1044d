#!/usr/bin/env bash
# The single-H100 suite behind the README table: GPU tests, then the standard-setting benchmarks (recorded in
# benchmarks/results.jsonl). Usage on the GPU machine: bash benchmarks/h100_suite.sh OUT_DIR
set -o pipefail
out=${1:-/tmp/out}
run() { bash benchmarks/gpu_run.sh "$@"; }
run python3 -m pytest -q -m gpu tests 2>&1 | tee "$out/gpu_tests.log" | tail -3
bench() { run python3 tools/benchmark_sft.py "$@" 2>&1 | tee -a "$out/bench.log" | grep -E '^\{|Error' | tail -4; }
bench --model qwen3-8b --recipe bf16 fp8 qfp8 --check-eager
bench --model qwen3-8b --no-passes
bench --model qwen3-8b --recompute
bench --model qwen3-0.6b --baseline hf-peft
bench --model qwen3-0.6b --no-passes
cp benchmarks/results.jsonl "$out/results.jsonl"
run python3 tools/benchmark_sft.py --readme && cp README.md "$out/README.md"
