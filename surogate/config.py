"""The training configuration: one validated dataclass, merged from four layers.

    TrainConfig defaults  <  recipes/NAME.yaml  <  config=FILE.yaml  <  key=value on the command line

Every option is a field of `TrainConfig`; its help text and accepted values live in the field's metadata, so
`--help`, validation and the code that reads the option cannot disagree. Errors are `ConfigError` with a one-line
message that names the option and says what to set; `surogate.train` prints it and exits with code 2 before anything
is loaded or written.

The defaults are the bundled demo job (`python -m surogate.train` with no arguments): the `tiny` preset on the demo
conversations, sized to finish on a laptop CPU in a few minutes. A real run sets at least `model=` and `datasets=`.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from surogate.lora import DEFAULT_TARGETS, ROUTER_TARGET
from surogate.recompute import RECOMPUTE_SAVES

__all__ = [
    "ConfigError",
    "TrainConfig",
    "PrecisionConfig",
    "load_config",
    "recipe_precision",
    "canonical_recipe",
    "RECIPE_ALIASES",
    "help_text",
    "RECIPES_DIR",
    "DEMO_DATASET",
]

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
DEMO_DATASET = str(Path(__file__).resolve().parent / "data" / "assets" / "demo.jsonl")
# Kept in step with surogate/data/config.py (FORMATS, OVERLONG); a test checks they agree.
DATASET_FORMATS = ("auto", "text", "instruction", "conversation")
OVERLONG = ("truncate", "drop")
GRAD_FORMATS = ("e5m2", "e4m3")
# Recipe formats the code implements today; a recipe naming anything else is refused, not silently run as bf16.
WEIGHT_FORMATS = ("bf16", "fp8", "nf4", "fp4")
COMPUTE_FORMATS = ("bf16", "fp8", "fp4")
FP4_FORMATS = ("nvfp4", "mxfp4")
# Other names a recipe is known by (recipe=qbnb reads recipes/qnf4.yaml: QLoRA NF4 as bitsandbytes stores it).
RECIPE_ALIASES = {"qbnb": "qnf4"}


class ConfigError(Exception):
    """A configuration mistake, described in one line that says what to set."""


def opt(default: Any, help: str, choices: tuple | None = None) -> Any:
    """A dataclass field carrying its one-line help and (optionally) its accepted values."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, list | tuple | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class PrecisionConfig:
    """What a recipe names: how frozen base weights are stored and which format the GEMMs run in."""

    weights: str = opt("bf16", "storage format of the frozen base weights", WEIGHT_FORMATS)
    compute: str = opt("bf16", "input format of the GEMMs", COMPUTE_FORMATS)
    fp8_grad_format: str = opt("e5m2", "FP8 format of the output gradient in the dX GEMM (e5m2 = hybrid)", GRAD_FORMATS)
    fp8_min_features: int = opt(
        0,
        "fp8 recipe: projections whose input or output width is below this run bf16 GEMMs (on small GEMMs quantizing "
        "the activations costs what FP8 saves; recipes/fp8.yaml sets 2048)",
    )
    fp8_dx_fast_accum: bool = opt(
        False,
        "FP8 dX GEMMs (output gradient x weight) with cuBLAS's fast accumulation, as the forward GEMMs always run: "
        "faster, with a coarser running sum",
    )
    fp8_cache_transposed: str = opt(
        "auto",
        "fp8 recipe: also cache each frozen weight's transposed FP8 codes for the dX GEMM (+1 byte per weight, "
        "saves a transpose per backward); auto = as many weights' as keep the bf16 base plus those codes within "
        "40% of the GPU's memory (all of Qwen3-8B's on 80 GB, about half of Qwen3-14B's)",
        ("auto", "true", "false"),
    )
    fp4_format: str = opt(
        "nvfp4",
        "fp4 weights/compute: nvfp4 (e2m1, e4m3 scale per 16 + fp32 tensor scale) or mxfp4 (e2m1, power-of-two "
        "e8m0 scale per 32)",
        FP4_FORMATS,
    )
    fp4_stochastic_rounding: bool = opt(True, "fp4 compute: round the output gradient stochastically in the dX GEMM")
    fp4_hadamard: bool = opt(True, "fp4 compute: random Hadamard transform (16-wide) on both dX GEMM inputs")
    skip_quant_first_layers: int = opt(0, "keep the first N decoder blocks in bf16 (quantized recipes)")
    skip_quant_last_layers: int = opt(0, "keep the last N decoder blocks in bf16 (quantized recipes)")
    fp8_lm_head: bool = opt(
        False, "run the frozen LM head's GEMMs (logits and their dX) in FP8 too (needs FP8 tensor cores; any recipe)"
    )
    quantize_embedding: bool = opt(False, "fp8 weights: store an untied input embedding in FP8 too (not nf4/fp4)")

    @property
    def quantized(self) -> bool:
        return self.weights != "bf16" or self.compute != "bf16"

    @property
    def uses_fp8(self) -> bool:
        """Whether the recipe stores or computes anything in FP8 (needs FP8 tensor cores on a GPU)."""
        return self.weights == "fp8" or self.compute == "fp8" or self.fp8_lm_head

    @property
    def uses_fp4(self) -> bool:
        """Whether the recipe stores or computes anything in FP4 (GEMMs emulated in bf16 before Blackwell)."""
        return self.weights == "fp4" or self.compute == "fp4"


@dataclass
class TrainConfig:
    # --- model and data
    model: str = opt("tiny", "Hugging Face checkpoint directory, or a preset name (tiny, qwen3-0.6b, ...; random init)")
    datasets: list[str] = opt([DEMO_DATASET], "data files/folders (.jsonl/.json/.parquet/.csv) or local HF cache names")
    dataset_format: str = opt("auto", "how to read rows; auto detects per source from its columns", DATASET_FORMATS)
    max_samples: int | None = opt(None, "keep only the first N samples of each source (quick runs); null = all")
    sequence_len: int = opt(512, "tokens per packed row")
    sample_packing: bool = opt(True, "pack several samples per row (document-masked attention); false = pad each")
    train_on_inputs: bool = opt(False, "also train on prompt/user tokens, not only on assistant/output tokens")
    overlong: str = opt("truncate", "samples longer than sequence_len", OVERLONG)
    skip_bad_rows: bool = opt(False, "skip (and count) rows that do not fit the format instead of failing")
    allow_pickle: bool = opt(False, "allow loading .bin (pickle) checkpoints; they can run arbitrary code")
    # --- optimization
    per_device_train_batch_size: int = opt(2, "rows per micro-batch on each device")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step (loss is token-weighted over all)")
    learning_rate: float = opt(1e-3, "peak AdamW learning rate of the LoRA parameters")
    warmup_steps: int = opt(5, "optimizer steps of linear warmup from 0 to learning_rate")
    lr_scheduler_type: str = opt("cosine", "decay after warmup", ("linear", "cosine", "constant"))
    weight_decay: float = opt(0.0, "AdamW decoupled weight decay")
    max_grad_norm: float = opt(1.0, "clip the global gradient norm to this; 0 = no clipping")
    num_epochs: int = opt(3, "passes over the data (ignored when max_steps > 0)")
    max_steps: int = opt(-1, "optimizer steps to run; -1 = num_epochs over the data")
    seed: int = opt(42, "seed for LoRA init, dropout and data order")
    max_bad_steps: int = opt(10, "stop after this many optimizer steps in a row with a non-finite loss or gradient")
    oom_retry: bool = opt(False, "on CUDA out of memory, retry the step with half the micro batch, 2x accumulation")
    # --- LoRA
    lora_rank: int = opt(16, "rank r of the low-rank update")
    lora_alpha: float = opt(32.0, "the update is scaled by lora_alpha / lora_rank")
    lora_dropout: float = opt(0.0, "dropout on the LoRA branch input, in [0, 1)")
    lora_target_modules: list[str] = opt(
        list(DEFAULT_TARGETS), f"linear layers that get an adapter ({ROUTER_TARGET}: the Qwen3-MoE router, opt-in)"
    )
    lora_dtype: str = opt("fp32", "master dtype of the LoRA A/B weights and their optimizer state", ("fp32", "bf16"))
    # --- precision and execution
    recipe: str = opt("bf16", "precision recipe: recipes/NAME.yaml")
    precision: PrecisionConfig = field(default_factory=PrecisionConfig, metadata={"help": "set by the recipe"})
    dtype: str = opt(
        "auto",
        "dtype of base weights and activations; auto = bf16 on CUDA, fp32 on CPU (CPU bf16 GEMMs "
        "are ~10x slower than fp32)",
        ("auto", "bf16", "fp32"),
    )
    device: str = opt("auto", "auto = cuda when available, else cpu", ("auto", "cuda", "cpu"))
    compile: str = opt(
        "auto",
        "torch.compile each decoder block (regional); auto = on CUDA only (on CPU it costs ~25 s and gains nothing)",
        ("auto", "true", "false"),
    )
    use_passes: bool = opt(True, "compile with surogate's FX passes (fused LoRA ops) instead of plain Inductor")
    recompute: bool = opt(
        False, "activation checkpointing per decoder block: less memory, the backward recomputes part of the forward"
    )
    recompute_layers: int | None = opt(
        None,
        "with recompute=true: checkpoint only the first N decoder blocks (null = all); the others keep their "
        "activations, so fewer is faster and takes more memory",
    )
    recompute_saves: list[str] = opt(
        list(RECOMPUTE_SAVES),
        "with recompute=true: what each checkpointed block keeps instead of recomputing (selective checkpointing): "
        "lora_xa (rank-sized, ~0 bytes), residual (2 x hidden_size bytes per token and block), attention (its output: "
        "2 x num_heads x head_dim bytes); [] = plain checkpointing, the least memory (surogate/recompute.py)",
    )
    cuda_graphs: str = opt(
        "auto",
        "replay each micro-step (forward + backward) from one CUDA graph: no per-kernel launch cost, the big win on "
        "small models; auto = on with CUDA unless the base is sharded across ranks (FSDP)",
        ("auto", "true", "false"),
    )
    shard_base_weights: str = opt(
        "auto",
        "multi-GPU (torchrun): shard the frozen base across ranks (fits larger models) or replicate it (no "
        "all-gathers, fastest); auto = replicate when it fits in half the free GPU memory",
        ("auto", "true", "false"),
    )
    attn_backend: str = opt(
        "auto",
        "attention kernel for packed rows; auto = flex on CUDA, sdpa on CPU (rows of one sample: causal SDPA)",
        ("auto", "flex", "varlen", "sdpa"),
    )
    attn_causal_kernel: str = opt(
        "auto",
        "attention kernel for rows of one sample (plain causal) on CUDA: cudnn, or flash4 (FlashAttention-4: needs "
        "the flash-attn-4 package (pip install surogate[flash4]) and a Hopper GPU; ~1% faster steps); auto = flash4 "
        "where it can run on one GPU, else cudnn",
        ("auto", "cudnn", "flash4"),
    )
    # --- outputs
    output_dir: str = opt("outputs/run", "where the adapter, checkpoints, metrics.jsonl and loss.png go")
    overwrite_output_dir: bool = opt(False, "replace a previous run's outputs in output_dir")
    resume_from_checkpoint: str = opt("false", "false | true (latest checkpoint in output_dir) | a checkpoint dir")
    save_steps: int = opt(0, "save a resumable checkpoint every N optimizer steps; 0 = never")
    save_total_limit: int = opt(2, "keep only the newest N checkpoints; 0 = keep all")
    logging_steps: int = opt(1, "log metrics every N optimizer steps")
    report_to: str = opt("none", "also log to an experiment tracker", ("none", "wandb"))
    wandb_project: str = opt("surogate", "wandb project name (report_to=wandb; WANDB_MODE=offline works)")

    def __post_init__(self) -> None:
        validate(self)


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def validate(cfg: TrainConfig) -> None:
    """Range and consistency checks; choices come from field metadata."""
    if isinstance(cfg.precision, dict):  # constructed directly in Python with a plain dict
        cfg.precision = PrecisionConfig(**cfg.precision)
    cfg.compile = str(cfg.compile).lower()  # a YAML/CLI boolean arrives in this str field as True/False
    cfg.cuda_graphs = str(cfg.cuda_graphs).lower()
    cfg.shard_base_weights = str(cfg.shard_base_weights).lower()
    for obj, prefix in ((cfg, ""), (cfg.precision, "precision.")):
        for f in dataclasses.fields(obj):
            choices = f.metadata.get("choices")
            value = getattr(obj, f.name)
            if choices and value not in choices:
                raise ConfigError(f"{prefix}{f.name}={value!r} is not supported: set it to one of {', '.join(choices)}")
    if isinstance(cfg.datasets, str):
        cfg.datasets = [cfg.datasets]
    cfg.datasets = [str(p) for p in cfg.datasets]
    validate_precision(cfg.precision)
    if isinstance(cfg.lora_target_modules, str):
        cfg.lora_target_modules = [m.strip() for m in cfg.lora_target_modules.split(",") if m.strip()]
    cfg.lora_target_modules = list(cfg.lora_target_modules)
    cfg.recompute_saves = list(cfg.recompute_saves)
    cfg.resume_from_checkpoint = str(cfg.resume_from_checkpoint)
    if cfg.resume_from_checkpoint.lower() in ("true", "false"):
        cfg.resume_from_checkpoint = cfg.resume_from_checkpoint.lower()
    _require(bool(cfg.model), "model is empty: set model=<checkpoint dir> or a preset name such as model=tiny")
    _require(len(cfg.datasets) > 0, "datasets is empty: set datasets=<file.jsonl> (or a list [a.jsonl,b.jsonl])")
    _require(cfg.max_samples is None or cfg.max_samples >= 1, "max_samples must be >= 1 (or null for all samples)")
    _require(
        cfg.recompute_layers is None or cfg.recompute_layers >= 0,
        f"recompute_layers={cfg.recompute_layers} must be >= 0 (or null: every block)",
    )
    _require(
        cfg.recompute_layers is None or cfg.recompute,
        "recompute_layers is set but recompute=false: set recompute=true (or recompute_layers=null)",
    )
    for save in cfg.recompute_saves:
        _require(
            save in RECOMPUTE_SAVES,
            f"recompute_saves: {save!r} is not something a block can keep: use some of {list(RECOMPUTE_SAVES)} "
            "(or [] for plain checkpointing)",
        )
    _require(cfg.sequence_len >= 8, f"sequence_len={cfg.sequence_len} is too small: set it to at least 8 (e.g. 2048)")
    for name in (
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "num_epochs",
        "logging_steps",
        "max_bad_steps",
        "lora_rank",
    ):
        _require(getattr(cfg, name) >= 1, f"{name}={getattr(cfg, name)} must be >= 1")
    for name in ("warmup_steps", "save_steps", "save_total_limit", "weight_decay", "max_grad_norm"):
        _require(getattr(cfg, name) >= 0, f"{name}={getattr(cfg, name)} must be >= 0")
    _require(cfg.learning_rate > 0, f"learning_rate={cfg.learning_rate} must be > 0 (LoRA typically 1e-4 .. 1e-3)")
    _require(cfg.max_steps == -1 or cfg.max_steps >= 1, f"max_steps={cfg.max_steps}: set -1 (use num_epochs) or >= 1")
    _require(cfg.lora_alpha > 0, f"lora_alpha={cfg.lora_alpha} must be > 0 (commonly 2 * lora_rank)")
    _require(0.0 <= cfg.lora_dropout < 1.0, f"lora_dropout={cfg.lora_dropout} must be in [0, 1)")
    targets = ", ".join(DEFAULT_TARGETS)
    _require(len(cfg.lora_target_modules) > 0, f"lora_target_modules is empty: set some of {targets}")
    for m in cfg.lora_target_modules:
        _require(
            m in (*DEFAULT_TARGETS, ROUTER_TARGET),
            f"lora_target_modules: {m!r} is not a linear layer of Qwen3: use {targets} (or {ROUTER_TARGET}, the "
            "Qwen3-MoE router)",
        )
    _require(bool(cfg.output_dir), "output_dir is empty: set output_dir=<directory>")
    _require(cfg.recipe.replace("_", "").replace("-", "").isalnum(), f"recipe={cfg.recipe!r} must be a recipe name")


def validate_precision(p: PrecisionConfig) -> None:
    for name in ("skip_quant_first_layers", "skip_quant_last_layers"):
        _require(getattr(p, name) >= 0, f"precision.{name}={getattr(p, name)} must be >= 0")
    _require(
        not (p.weights == "fp8" and p.compute not in ("fp8", "bf16")),
        f"precision.compute={p.compute!r} with fp8 weights: set compute to fp8 or bf16",
    )
    _require(
        not (p.weights == "nf4" and p.compute not in ("bf16", "fp8")),
        f"precision.compute={p.compute!r} with nf4 weights: set compute to bf16 or fp8 (NF4 is dequantized for them)",
    )
    _require(
        not (p.weights == "fp4" and p.compute not in ("fp4", "bf16", "fp8")),
        f"precision.compute={p.compute!r} with fp4 weights: set compute to fp8 or bf16 (dequantized) or fp4 (emulated)",
    )
    _require(
        not (p.compute == "fp4" and p.weights not in ("fp4", "bf16")),
        f"precision.compute=fp4 with {p.weights} weights: set weights to bf16 or fp4",
    )
    _require(
        not (p.weights in ("nf4", "fp4") and p.quantize_embedding),
        f"precision.quantize_embedding=true with {p.weights} weights is not supported (only FP8 embeddings): "
        "set it false",
    )


def canonical_recipe(name: str) -> str:
    """The recipe file name behind `name` (an alias such as qbnb, or the name itself)."""
    return RECIPE_ALIASES.get(name, name)


def recipe_precision(name: str) -> PrecisionConfig:
    """The precision section of recipes/NAME.yaml, validated (for callers given only a recipe name)."""
    path = RECIPES_DIR / f"{canonical_recipe(name)}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown recipe {name!r}: available recipes are {', '.join(available_recipes())}")
    section = _load_yaml(path, "recipe").get("precision", {})
    try:
        p = PrecisionConfig(**OmegaConf.to_container(section))
    except TypeError as e:
        raise ConfigError(f"recipe {path}: {e}") from None
    for f in dataclasses.fields(p):
        choices = f.metadata.get("choices")
        if choices and getattr(p, f.name) not in choices:
            raise ConfigError(f"recipe {path}: precision.{f.name}={getattr(p, f.name)!r} is not one of {choices}")
    validate_precision(p)
    return p


# ---------------------------------------------------------------------------------------------------------- merging


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _check_keys(layer: DictConfig, source: str) -> None:
    """Unknown keys fail with the closest valid spelling (a typo must not silently train with the default)."""
    nested = {"precision": PrecisionConfig}
    for key in layer.keys():
        key = str(key)
        valid = _field_names(TrainConfig) + ["config"]
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else " (see --help for the list of options)"
            raise ConfigError(f"unknown option {key!r} in {source}{hint}")
        if key in nested and isinstance(layer[key], DictConfig):
            for sub in layer[key].keys():
                names = _field_names(nested[key])
                if sub not in names:
                    close = difflib.get_close_matches(str(sub), names, n=1, cutoff=0.5)
                    hint = f" (did you mean '{key}.{close[0]}'?)" if close else f" (valid: {', '.join(names)})"
                    raise ConfigError(f"unknown option '{key}.{sub}' in {source}{hint}")


def _check_no_interpolation(value: Any, source: str, name: str = "") -> None:
    """Config files are data: `${...}` interpolations are refused, so no resolver (oc.env, oc.decode, or one some
    library registered) ever runs while a config is read. Walks the raw, unresolved values."""
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=False)
    if isinstance(value, dict):
        for k, v in value.items():
            _check_no_interpolation(v, source, f"{name}.{k}" if name else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_no_interpolation(v, source, f"{name}[{i}]")
    elif isinstance(value, str) and "${" in value:
        raise ConfigError(
            f"{name}={value!r} in {source} is an interpolation: config values are plain data (no resolvers, no "
            "environment lookups); write the value itself"
        )


def _normalize(layer: DictConfig) -> DictConfig:
    """A single string where a list is expected becomes a one-element list (datasets=a.jsonl)."""
    for key in ("datasets", "lora_target_modules", "recompute_saves"):
        if key in layer and isinstance(layer[key], str):
            value = layer[key]
            layer[key] = [v.strip() for v in value.split(",") if v.strip()] if key != "datasets" else [value]
    return layer


def _load_yaml(path: Path, what: str) -> DictConfig:
    try:
        loaded = OmegaConf.load(path)
    except FileNotFoundError:
        raise ConfigError(f"{what} file not found: {path}") from None
    except Exception as e:  # yaml syntax errors come as several exception types; all are the user's file
        raise ConfigError(f"cannot parse {what} {path}: {str(e).splitlines()[0]}") from None
    if loaded is None:
        return OmegaConf.create({})
    if isinstance(loaded, ListConfig):
        raise ConfigError(f"{what} {path} must be a mapping of option: value, not a list")
    return loaded


def _parse_cli(argv: list[str]) -> DictConfig:
    items = []
    for arg in argv:
        arg = arg[2:] if arg.startswith("--") else arg
        if "=" not in arg or arg.startswith("="):
            raise ConfigError(f"expected key=value, got {arg!r} (e.g. learning_rate=2e-4; see --help)")
        items.append(arg)
    try:
        return OmegaConf.from_dotlist(items)
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise ConfigError(f"cannot parse command line: {str(e).splitlines()[0]}") from None


def _type_name(key: str) -> str:
    for f in dataclasses.fields(TrainConfig) + dataclasses.fields(PrecisionConfig):
        if f.name == key.split(".")[-1]:
            t = str(f.type)
            return {
                "int": "an integer",
                "float": "a number",
                "bool": "true or false",
                "str": "a string",
                "list[str]": "a list such as [a,b]",
                "int | None": "an integer or null",
            }.get(t, t)
    return "a valid value"


def load_config(argv: list[str] | None = None) -> TrainConfig:
    """Merge defaults < recipe < config=FILE < key=value into a validated `TrainConfig` (raises `ConfigError`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cli = _parse_cli(argv)
    _check_keys(cli, "the command line")
    _check_no_interpolation(cli, "the command line")
    user = OmegaConf.create({})
    if "config" in cli:
        path = Path(str(cli.pop("config")))
        user = _load_yaml(path, "config")
        if "config" in user:
            raise ConfigError("config= cannot be set inside a config file; pass it on the command line")
        _check_keys(user, f"config file {path}")
        _check_no_interpolation(user, f"config file {path}")
    recipe_name = str(cli.get("recipe", user.get("recipe", TrainConfig.__dataclass_fields__["recipe"].default)))
    recipe_name = canonical_recipe(recipe_name)
    recipe_path = RECIPES_DIR / f"{recipe_name}.yaml"
    if not recipe_path.is_file():
        raise ConfigError(f"unknown recipe {recipe_name!r}: available recipes are {', '.join(available_recipes())}")
    recipe = _load_yaml(recipe_path, "recipe")
    _check_keys(recipe, f"recipe {recipe_path}")
    _check_no_interpolation(recipe, f"recipe {recipe_path}")
    if "recipe" in recipe and recipe.recipe != recipe_name:
        raise ConfigError(f"recipe file {recipe_path} sets recipe={recipe.recipe}; a recipe cannot name another")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), *(_normalize(x) for x in (recipe, user, cli)))
        merged.recipe = recipe_name
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = str(getattr(e, "full_key", "") or "")
        value = getattr(e, "value", None)
        if key:
            raise ConfigError(f"{key}={value!r} is not valid: set it to {_type_name(key)}") from None
        raise ConfigError(str(e).splitlines()[0]) from None
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e).splitlines()[0]) from None


def help_text() -> str:
    lines = [
        "usage: python -m surogate.train [config=FILE.yaml] [recipe=NAME] [key=value ...]",
        "",
        "Fine-tune LoRA adapters on a Qwen3 model. Options merge as: defaults < recipes/NAME.yaml < config file "
        "< key=value.",
        f"Recipes: {', '.join(available_recipes()) or '(none found in ' + str(RECIPES_DIR) + ')'}"
        + "".join(f" ({alias} = {name})" for alias, name in RECIPE_ALIASES.items()),
        "",
        "options:",
        "  config = (none)  a YAML file of option: value pairs",
    ]

    def add(cls: type, prefix: str = "") -> None:
        for f in dataclasses.fields(cls):
            if f.name == "precision":
                add(PrecisionConfig, "precision.")
                continue
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            if f.name == "datasets":
                default = "[bundled demo.jsonl]"
            elif isinstance(default, list):
                default = "[" + ",".join(default) + "]"
            elif default is None:
                default = "null"
            elif isinstance(default, bool):
                default = str(default).lower()
            choices = f.metadata.get("choices")
            extra = f" ({' | '.join(choices)})" if choices else ""
            lines.append(f"  {prefix}{f.name} = {default}  {f.metadata.get('help', '')}{extra}")

    add(TrainConfig)
    return "\n".join(lines) + "\n"
