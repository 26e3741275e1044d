"""Config merging, validation messages and the CLI's refusal paths (exit 2, one line, nothing written)."""

import dataclasses

import pytest

import surogate.config as config_mod
from surogate.config import ConfigError, TrainConfig, help_text, load_config
from surogate.train import main


def test_defaults_are_the_demo_job():
    cfg = load_config([])
    assert cfg.model == "tiny" and cfg.datasets == [config_mod.DEMO_DATASET] and cfg.recipe == "bf16"
    assert cfg.precision.weights == "bf16" and cfg.precision.compute == "bf16"


def test_merge_order_defaults_recipe_file_cli(tmp_path, monkeypatch):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "bf16.yaml").write_text("precision: {weights: bf16, compute: bf16}\n")
    (recipes / "mine.yaml").write_text("learning_rate: 0.5\nlora_rank: 4\nseed: 7\n")
    monkeypatch.setattr(config_mod, "RECIPES_DIR", recipes)
    user = tmp_path / "run.yaml"
    user.write_text("recipe: mine\nlora_rank: 8\nseed: 1\ndatasets: a.jsonl\n")
    cfg = load_config([f"config={user}", "seed=2"])
    assert cfg.learning_rate == 0.5  # recipe over default
    assert cfg.lora_rank == 8  # user file over recipe
    assert cfg.seed == 2  # command line over user file
    assert cfg.datasets == ["a.jsonl"]  # a single string becomes a list
    assert cfg.warmup_steps == TrainConfig().warmup_steps  # untouched keys keep their default
    assert load_config([f"config={user}", "recipe=bf16"]).learning_rate == TrainConfig().learning_rate


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["learnign_rate=1e-4"], "did you mean 'learning_rate'"),
        (["lora_rnak=8"], "did you mean 'lora_rank'"),
        (["precision.weight=bf16"], "did you mean 'precision.weights'"),
        (["learning_rate=fast"], "learning_rate='fast' is not valid: set it to a number"),
        (["sequence_len=1.5"], "set it to an integer"),
        (["learning_rate=-1"], "learning_rate=-1.0 must be > 0"),
        (["lr_scheduler_type=step"], "set it to one of linear, cosine, constant"),
        (["lora_target_modules=[q_proj,qq_proj]"], "'qq_proj' is not a linear layer"),
        (["recompute=true", "recompute_saves=[attention,mlp]"], "recompute_saves: 'mlp' is not something a block"),
        (["lora_dropout=1.0"], "lora_dropout=1.0 must be in [0, 1)"),
        (["max_steps=0"], "max_steps=0: set -1"),
        (["recipe=fp9"], "unknown recipe 'fp9': available recipes are bf16"),
        (["nonsense"], "expected key=value"),
    ],
)
def test_bad_options_raise_one_line_config_errors(argv, needle):
    with pytest.raises(ConfigError) as e:
        load_config(argv)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_recompute_saves_forms():
    assert load_config([]).recompute_saves == ["lora_xa", "residual", "attention"]
    assert load_config(["recompute=true", "recompute_saves=[]"]).recompute_saves == []
    assert load_config(["recompute=true", "recompute_saves=residual,attention"]).recompute_saves == [
        "residual",
        "attention",
    ]


def test_unknown_key_in_a_config_file(tmp_path):
    user = tmp_path / "run.yaml"
    user.write_text("per_device_batch_size: 2\n")
    with pytest.raises(ConfigError, match="did you mean 'per_device_train_batch_size'"):
        load_config([f"config={user}"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config([f"config={tmp_path / 'nope.yaml'}"])


def test_help_lists_every_option_with_default(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        if f.name != "precision":
            assert f"  {f.name} = " in out, f.name
    assert "precision.weights = bf16" in out and "learning_rate = 0.001" in out
    assert out == help_text()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["learnign_rate=1e-4"], "did you mean 'learning_rate'"),
        (["lora_rank=0"], "lora_rank=0 must be >= 1"),
        (["model=/definitely/not/a/model"], "model:"),
        (["datasets=/definitely/not/data.jsonl"], "datasets:"),
        (["resume_from_checkpoint=true"], "no checkpoint-N directory"),
        (["attn_backend=flex", "device=cpu"], "attn_backend"),
    ],
)
def test_cli_errors_exit_2_and_write_nothing(tmp_path, capsys, args, needle):
    out_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main([f"output_dir={out_dir}", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith("error: ") and needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out_dir.exists()


def test_previous_run_is_not_overwritten_by_accident(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    with pytest.raises(SystemExit) as e:
        main([f"output_dir={tmp_path}"])
    assert e.value.code == 2 and "overwrite_output_dir=true" in capsys.readouterr().err
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


def test_choices_agree_with_the_data_pipeline():
    from surogate.data.config import FORMATS, OVERLONG

    assert config_mod.DATASET_FORMATS == FORMATS and config_mod.OVERLONG == OVERLONG


def test_bundled_recipe_is_valid():
    assert "bf16" in config_mod.available_recipes()
    for name in config_mod.available_recipes():
        load_config([f"recipe={name}"])
