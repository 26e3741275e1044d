"""CPU smoke test of tools/accuracy_bench.py: the whole pipeline (data -> base eval -> train -> PEFT eval -> report)
runs end to end on a tiny random Llama and writes the table and charts. No score is asserted."""

import importlib.util
import json
import math
import random
import sys
from pathlib import Path

import pytest

from surogate.bench.arith import extract_answer, make_problem, make_splits
from surogate.bench.evaluate import score

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("accuracy_bench", ROOT / "tools" / "accuracy_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["accuracy_bench"] = module
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_table_and_charts(bench, tmp_path, capsys):
    report = tmp_path / "report"
    assert bench.main(["--smoke", "--work-dir", str(tmp_path / "work"), "--report-dir", str(report)]) == 0
    md = (report / "accuracy.md").read_text()
    assert "| base (no training) |" in md and "| bf16 |" in md and "NOT THE BENCHMARK" in md
    for png in ("loss_bf16.png", "loss_all.png"):
        assert (report / "charts" / png).stat().st_size > 5000, png
    results = json.loads((tmp_path / "work" / "results.json").read_text())
    (bf16,) = [r for r in results["recipes"] if r["recipe"] == "bf16"]
    assert bf16["status"] == "ok" and bf16["steps"] == 2 and bf16["tokens_per_sec"] > 0
    assert math.isfinite(bf16["eval_loss"]) and math.isfinite(results["base"]["eval_loss"])
    assert bf16["eval_loss"] != results["base"]["eval_loss"]  # the exported adapter was loaded and applied
    assert [r["recipe"] for r in results["recipes"]] == ["bf16"]  # --smoke runs bf16 only
    assert bench.main(["--report-only", "--work-dir", str(tmp_path / "work"), "--report-dir", str(report)]) == 0
    capsys.readouterr()
    # --resume keeps the finished base and recipes instead of running them again
    assert bench.main(["--smoke", "--resume", "--work-dir", str(tmp_path / "work"), "--report-dir", str(report)]) == 0
    out = capsys.readouterr().out
    assert "base: kept from the previous run" in out and "bf16: kept from the previous run" in out
    again = json.loads((tmp_path / "work" / "results.json").read_text())
    assert again["recipes"] == results["recipes"] and again["base"] == results["base"]


def test_quantized_recipes_are_skipped_on_cpu_with_a_reason(bench):
    import torch

    for recipe in bench.ordered_recipes(None):
        reason = bench.skip_reason(recipe, torch.device("cpu"))
        if recipe == "bf16":
            assert reason is None
        elif reason is not None:
            assert reason.startswith(("skipped", "not runnable"))


def test_data_is_deterministic_disjoint_and_answers_check_out():
    train, test = make_splits(300, 50, seed=7)
    assert (train, test) == make_splits(300, 50, seed=7)
    assert not {s["messages"][0]["content"] for s in test} & {s["messages"][0]["content"] for s in train}
    r = random.Random(0)
    for _ in range(500):
        s = make_problem(r)
        solution = s["messages"][1]["content"]
        assert solution.endswith(f"#### {s['answer']}") and extract_answer(solution) == str(s["answer"])
        assert s["answer"] >= 0 and isinstance(s["answer"], int)
        for line in solution.splitlines()[:-1]:  # every worked step is true arithmetic
            lhs, rhs = line.split(" = ")[0].split()[-3:], line.split(" = ")[1].split()[0].rstrip(".")
            assert eval(" ".join(lhs).replace("/", "//")) == int(rhs), line


@pytest.mark.parametrize(
    "text, expected",
    [("So 3 + 4 = 7.\n#### 7", "7"), ("#### 1,200", "1200"), ("the answer is 42", "42"), ("#### 12.0", "12"),
     ("no digits", None), ("first 3 then #### -5 and 9", "-5")],
)  # fmt: skip
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_score_and_binomial_stderr():
    acc, se, correct, formatted = score(["#### 3", "4", "#### 5", "x"], [3, 4, 6, 1])
    assert (acc, correct, formatted) == (0.5, 2, 0.5)
    assert se == pytest.approx(math.sqrt(0.25 / 4))
