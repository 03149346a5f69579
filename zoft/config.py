"""The recipe schema: one pydantic model per section, unknown keys rejected at every level.

A recipe is a YAML file (loaded with ``yaml.safe_load``) plus optional dotted overrides from the
command line (``train.learning_rate=1e-6``). Every problem becomes one line that names the key
path and what was expected; :func:`load_recipe` raises :class:`~zoft.errors.RecipeError` with those
lines and never lets a traceback reach the user.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from zoft.errors import RecipeError

ZO_METHODS = ("mezo", "qzo", "addax")  # addax: ZO on long sequences + in-place SGD on short ones
FO_METHODS = ("adamw", "sgd", "natural_galore")  # natural_galore: zoft/optim/natural_galore.py
METHODS = ZO_METHODS + FO_METHODS


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelSection(Section):
    name: str = Field(
        description="What to fine-tune: a packaged asset name (smollm2-135m, minilm-l6), "
        "a Hugging Face hub id, or a local model folder."
    )
    task: Literal["causal_lm", "sequence_classification"] = Field(
        "causal_lm", description="causal_lm (AutoModelForCausalLM) or sequence_classification."
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32", description="Storage dtype of the weights. bfloat16 halves weight memory."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    tokenizer: str | None = Field(None, description="Tokenizer name or folder; default: the model's.")
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with a hub model. Off unless you trust the model."
    )
    # --- QZO: 4-bit model (zoft/zo/qzo.py) ---
    quantization: Literal["nf4"] | None = Field(
        None,
        description="nf4: replace the linear layers by 4-bit NF4 layers (bitsandbytes format) whose per-block "
        "scales are the only trained values (method qzo). A bitsandbytes NF4 folder is used as stored.",
    )
    quantization_blocksize: int = Field(64, description="nf4: weights per scale (bitsandbytes' default 64).")
    quantization_target_modules: list[str] | str = Field(
        "all-linear", description="nf4: 'all-linear' or linear-layer name suffixes to quantize (lm_head stays)."
    )
    # --- end QZO ---


class DataSection(Section):
    train: str = Field(
        description="Training data: a packaged asset (rotten-tomatoes, shakespeare, chatterbot), "
        "a local .jsonl/.json/.csv/.parquet/.txt file (optionally .gz/.bz2), or a hub data set name."
    )
    eval: str | None = Field(
        None, description="Held-out data in the same forms; default: split test_size off the training data."
    )
    format: Literal["text", "prompt_completion", "chat", "classification"] = Field(
        description="text: causal LM on a text column; prompt_completion: loss on the completion only; "
        "chat: a messages column rendered with the tokenizer's chat template, loss on assistant turns; "
        "classification: a prompt template + one verbalizer word per label (the MeZO setting)."
    )
    split: str = Field("train", description="Split to read from a hub data set.")
    test_size: float = Field(0.1, gt=0, lt=1, description="Fraction held out when data.eval is not set.")
    split_seed: int = Field(0, description="Seed of the held-out split (keeps evaluations comparable).")
    max_length: int = Field(256, ge=8, description="Tokens per example; longer prompts are cut on the left.")
    max_train_samples: int | None = Field(None, ge=1, description="Use at most this many training rows.")
    max_eval_samples: int | None = Field(None, ge=1, description="Use at most this many held-out rows.")
    text_column: str = Field("text", description="Column with the text (text format; classification default template).")
    prompt_column: str = Field("prompt", description="prompt_completion: the prompt column.")
    completion_column: str = Field("completion", description="prompt_completion: the column the loss is on.")
    messages_column: str = Field("messages", description="chat: column holding a list of {role, content}.")
    label_column: str = Field("label", description="classification: the label column (values = verbalizer keys).")
    template: str | None = Field(
        None,
        description="classification: the prompt, with {column} fields, e.g. '{text} It was'. "
        "The verbalizer word is scored right after it.",
    )
    verbalizers: dict[str, str] | None = Field(
        None,
        description="classification: label value -> word scored after the template, "
        "e.g. {fresh: ' great', rotten: ' terrible'} (mind the leading space).",
    )
    verbalizer_score: Literal["mean", "sum"] = Field(
        "mean",
        description="classification with a causal LM: how a verbalizer of several tokens is scored from its "
        "tokens' log-probabilities. mean (MeZO's choice) does not favour the shorter word; sum is the word's "
        "log-probability. The same for one-token words.",
    )
    packing: bool = Field(False, description="text: concatenate rows and cut into max_length blocks.")

    @field_validator("verbalizers", mode="before")
    @classmethod
    def _stringify_labels(cls, v: Any) -> Any:
        # YAML reads `0: terrible` with an int key; labels are compared as strings.
        if isinstance(v, dict):
            return {str(k): val for k, val in v.items()}
        return v

    @model_validator(mode="after")
    def _classification_needs_words(self) -> DataSection:
        if self.format == "classification":
            if not self.verbalizers or len(self.verbalizers) < 2:
                raise ValueError("format 'classification' needs data.verbalizers with at least two labels")
        return self


# Natural GaLore's defaults (the GaLore paper's fine-tuning settings, plus the Fisher window); the same
# numbers as zoft/optim/natural_galore.py's DEFAULT_* (a test keeps them equal; config stays torch-free).
NATURAL_GALORE_DEFAULTS: dict[str, Any] = {
    "rank": 128,
    "update_proj_gap": 200,
    "scale": 0.25,
    "history": 20,
    "damping_mode": "absolute",
    "damping": 1e-3,
    "target_modules": "all-linear",
    "layerwise": False,
    "refresh": "reproject",
}
# method.damping when method.damping_mode is relative and damping is not set (natural_galore.py's
# DEFAULT_RELATIVE_DAMPING).
NATURAL_GALORE_RELATIVE_DAMPING = 1.0


class MethodSection(Section):
    name: Literal["mezo", "qzo", "addax", "adamw", "sgd", "natural_galore"] = Field(
        "mezo",
        description="mezo: zeroth-order SGD (two forwards, no backward, inference memory); "
        "qzo: MeZO on the scales of a 4-bit model (model.quantization: nf4), clipped; "
        "addax: ZO on long sequences + in-place first-order SGD on short ones; "
        "adamw / sgd: the standard first-order fine-tune through HF Trainer; "
        "natural_galore: full-parameter first-order training with Natural GaLore (low-rank projected Adam "
        "state + inverse empirical Fisher; see docs/natural_galore.md).",
    )
    eps: float = Field(1e-3, gt=0, description="ZO: perturbation scale of the two forwards.")
    n_directions: int = Field(1, ge=1, le=64, description="ZO: random directions per step (n-SPSA).")
    distribution: Literal["gaussian", "rademacher"] = Field(
        "gaussian", description="ZO: law of z. rademacher (+-1) is cheaper to sample on CPU."
    )
    master_weights: Literal["auto", "fp32", "none"] = Field(
        "auto",
        description="ZO: how trained weights stored in bf16/fp16 are updated. auto: in fp32 one chunk at a time, "
        "written back with stochastic rounding seeded by (seed, step, parameter name), so updates of ~1e-6 survive "
        "in expectation and nothing is kept beyond the weights (inference memory; runs resume and replay exactly); "
        "fp32: keep an fp32 copy of each such weight and update it (exact sums, +4 bytes per trained weight: "
        "3x inference memory for full-parameter bf16 MeZO); none: round to nearest (no memory, but updates below "
        "half a bf16 spacing are lost). fp32 weights are updated in fp32 under every setting.",
    )
    z_generator: Literal["auto", "torch", "philox"] = Field(
        "auto",
        description="ZO: how z is drawn from its seed. philox: the Philox stream of zoft's Triton kernels (on CUDA "
        "z is made in registers, never stored; with offload the deferred update and the next perturbation are "
        "one pass over the weights), the same numbers on every device, so a CUDA run replays on CPU; torch: "
        "torch.Generator, whose numbers differ between CPU and CUDA; auto: philox when training computes on "
        "CUDA (with offload: offload.compute_device), torch on CPU, where the plain-torch Philox is ~9x slower "
        "than torch.randn (Gaussian z of a 576x1536 fp32 matrix: 28 vs 3.1 ms, one core).",
    )
    paired_forward: Literal["auto"] | bool = Field(
        "auto",
        description="ZO: run the +eps and -eps forwards as one forward of the batch doubled ([x; x]), each module "
        "with trained weights computing its two halves back to back. With offload each block is then uploaded "
        "once per step instead of twice, and z is sampled once for both forwards (two samplings per step with the "
        "update, not three); it costs the activation memory of a doubled batch. auto: on with offload (causal_lm "
        "task, not with distributed.perturbation_parallel 2), off otherwise.",
    )

    # --- QZO / Addax options (zoft/zo/qzo.py, zoft/zo/addax.py) ---
    clip_projected_grad: float | None = Field(
        None,
        gt=0,
        description="ZO: clip each projected gradient (L+ - L-)/2eps to [-C, C] before the update "
        "(QZO's directional-derivative clipping); default 100 for qzo, off otherwise.",
    )
    length_threshold: int | Literal["auto"] | None = Field(
        None,
        description="addax (required): sequences longer than this many tokens feed the zeroth-order "
        "estimate, the others the first-order gradient; 'auto' picks it from method.memory_budget_gb.",
    )
    memory_budget_gb: float | None = Field(
        None, gt=0, description="addax with length_threshold 'auto': memory the run may use, in GB."
    )
    zo_batch_size: int | None = Field(
        None, ge=1, description="addax: long sequences per step (K0); default train.per_device_train_batch_size."
    )
    fo_batch_size: int | None = Field(
        None, ge=1, description="addax: short sequences per step (K1); default train.per_device_train_batch_size."
    )
    alpha: float | None = Field(
        None,
        ge=0,
        le=1,
        description="addax: update = lr * (alpha * ZO estimate + (1 - alpha) * first-order gradient); "
        "0 is in-place SGD, 1 is MeZO on the long sequences (default 0.05).",
    )
    # --- end QZO / Addax ---

    # --- Natural GaLore (zoft/optim/natural_galore.py, docs/natural_galore.md) ---
    # None means "not set"; with method natural_galore the defaults below are filled in (so a resolved recipe
    # shows them), with any other method a set key is an error.
    rank: int | None = Field(
        None,
        ge=1,
        description="natural_galore: rank r of each projected weight's gradient (default 128); Adam's two moments "
        "of an m x n weight then hold r * max(m, n) numbers each instead of m * n.",
    )
    update_proj_gap: int | None = Field(
        None, ge=1, description="natural_galore: T, optimizer steps between the SVD refreshes of each projection "
        "(default 200; one SVD per projected weight every T steps)."
    )
    scale: float | None = Field(
        None, gt=0, description="natural_galore: GaLore's alpha, multiplies the low-rank update mapped back to "
        "full size (default 0.25)."
    )
    history: int | None = Field(
        None,
        ge=0,
        description="natural_galore: s, the last s projected gradients whose empirical Fisher preconditions the "
        "step through an s x s solve (default 20; 0 = plain GaLore). Costs s projected-gradient copies per weight.",
    )
    damping_mode: Literal["absolute", "relative"] | None = Field(
        None,
        description="natural_galore: absolute (default; the paper's and its code's): the Fisher is "
        "lambda I + G G^T with lambda = method.damping (default 1e-3); relative: lambda = method.damping (default "
        "1.0) x the window's mean squared gradient norm, the same for every layer and loss scale but far weaker "
        "whitening at 1.0 (docs/natural_galore.md).",
    )
    damping: float | None = Field(
        None,
        gt=0,
        description="natural_galore: the Fisher damping lambda (damping_mode absolute, default 1e-3) or its factor "
        "on the window's mean squared gradient norm (relative, default 1.0); larger is closer to plain GaLore, "
        "smaller whitens harder.",
    )
    target_modules: list[str] | str | None = Field(
        None,
        description="natural_galore: linear layers whose gradients are projected: 'all-linear' (default; not "
        "lm_head or embeddings), a regex over full module names, or a list of names; every other trained "
        "parameter gets plain AdamW.",
    )
    layerwise: bool | None = Field(
        None,
        description="natural_galore: update each parameter in its gradient hook during the backward pass and "
        "free its gradient, so full gradients are never all held (default false); needs "
        "train.gradient_accumulation_steps 1, one process and no train.max_grad_norm.",
    )
    refresh: Literal["reproject", "keep"] | None = Field(
        None,
        description="natural_galore: Adam's moments when a projection is refreshed (default reproject): reproject "
        "re-expresses them in the new basis; keep leaves their coordinates as they are (galore-torch). The "
        "Fisher window is always re-projected.",
    )
    # --- end Natural GaLore ---

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, v: Any) -> Any:
        v = {"name": v} if isinstance(v, str) else v
        if isinstance(v, dict) and v.get("name") == "natural_galore":
            if v.get("damping_mode") == "relative" and v.get("damping") is None:
                v = {**v, "damping": NATURAL_GALORE_RELATIVE_DAMPING}
            v = {**v, **{k: d for k, d in NATURAL_GALORE_DEFAULTS.items() if v.get(k) is None}}
        return v

    def natural_galore_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``zoft.optim.create_natural_galore_optimizer`` (defaults for unset keys)."""
        v = {k: d if getattr(self, k) is None else getattr(self, k) for k, d in NATURAL_GALORE_DEFAULTS.items()}
        v["reproject_moments"] = v.pop("refresh") == "reproject"
        return v

    @property
    def is_zeroth_order(self) -> bool:
        return self.name in ZO_METHODS

    @property
    def projected_grad_clip(self) -> float | None:
        """The clipping bound in effect: method.clip_projected_grad, or 100 for qzo."""
        if self.clip_projected_grad is None and self.name == "qzo":
            return 100.0
        return self.clip_projected_grad


# ---- LoRA-GA / LoRA-Pro (issue 5; zoft/lora/ga.py, zoft/lora/pro.py) ---------------------------


class LoraGASection(Section):
    """LoRA-GA initialization settings (used when ``peft.init`` is ``lora_ga``)."""

    num_batches: int = Field(
        8, ge=1, description="Training batches (of train.per_device_train_batch_size) whose mean gradient "
        "is decomposed to initialize A and B; the training set must have at least this many."
    )
    scale: Literal["paper", "stable", "unit", "weight_svd", "gd_scale"] = Field(
        "paper",
        description="paper: the paper's Algorithm 1 (A, B = scaled singular vectors of the gradient); "
        "stable/unit/weight_svd/gd_scale: peft's lora_ga scalings as they are (see zoft/lora/ga.py).",
    )
    stable_gamma: float = Field(
        16.0, gt=0, description="The paper's gamma: A and B are scaled by out_features**0.25 / sqrt(gamma) "
        "(paper and stable scales); larger means smaller adapters at step 0."
    )


# zoft/lora/pro.py's EFFICIENT_REMOVED, the same line for the Python API (a test keeps them equal; config
# stays torch-free).
LORA_PRO_EFFICIENT_REMOVED = (
    "'efficient' was removed: AdamW on LoRA-Pro's corrected A/B gradients trained worse than plain LoRA "
    "(docs/lora.md); use 'full', the paper's Adam on the equivalent gradient (the default)"
)


class LoraProSection(Section):
    """LoRA-Pro optimizer settings (used when ``peft.optimizer`` is ``lora_pro``)."""

    mode: Literal["full"] = Field(
        "full",
        description="full: the paper's algorithm (and its authors' code): Adam on the equivalent gradient, with two "
        "fp32 moments the size of each adapted weight, its direction mapped back onto A and B. The former "
        "'efficient' mode (AdamW on corrected A/B gradients) trained worse than plain LoRA and was removed.",
    )

    @field_validator("mode", mode="before")
    @classmethod
    def _removed_mode(cls, v: Any) -> Any:
        if v == "efficient":
            raise ValueError(LORA_PRO_EFFICIENT_REMOVED)
        return v


# ---------------------------------------------------------------------------------------------


class PeftSection(Section):
    method: Literal["lora", "prefix_tuning"] = Field("lora", description="The peft adapter to train.")
    r: int = Field(8, ge=1, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout (off during ZO forwards anyway).")
    target_modules: list[str] | str | None = Field(
        None, description="Module names or 'all-linear'; default: peft's choice for the architecture."
    )
    num_virtual_tokens: int = Field(20, ge=1, description="prefix_tuning: prefix length.")
    # issue 5
    init: Literal["default", "lora_ga"] = Field(
        "default",
        description="default: peft's LoRA init (B = 0); lora_ga: LoRA-GA, A and B from the SVD of the gradient "
        "over peft.lora_ga.num_batches training batches (first-order methods only; see docs/lora.md).",
    )
    lora_ga: LoraGASection = Field(default_factory=LoraGASection, description="LoRA-GA settings (peft.init lora_ga).")
    optimizer: Literal["default", "lora_pro"] = Field(
        "default",
        description="default: the method's optimizer; lora_pro: LoRA-Pro, Adam on the full-weight gradient that the "
        "adapters can best express, mapped back onto A and B (the paper's algorithm; method adamw only).",
    )
    lora_pro: LoraProSection = Field(
        default_factory=LoraProSection, description="LoRA-Pro settings (peft.optimizer lora_pro)."
    )


def _training_argument_names() -> set[str]:
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments) if f.init}


# TrainingArguments keys that zoft sets from other sections (one source of truth per setting).
_TRAIN_KEYS_OWNED_ELSEWHERE = {
    "output_dir": "output.dir",
    "overwrite_output_dir": "output.overwrite",
    "resume_from_checkpoint": "output.resume",
    "do_train": "the recipe itself",
    "do_eval": "evaluation.before / evaluation.after",
}


class TrainSection(Section):
    """Training keys, named as in ``transformers.TrainingArguments``.

    The common keys are typed here; any other TrainingArguments field is accepted and validated by
    TrainingArguments itself when the run is built.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    learning_rate: float = Field(1e-6, ge=0, description="Peak learning rate (MeZO full: ~1e-6; MeZO+LoRA: ~1e-3; AdamW: ~1e-5).")
    max_steps: int = Field(-1, description="Optimizer steps; -1 means num_train_epochs decides.")
    num_train_epochs: float = Field(1.0, gt=0, description="Epochs when max_steps is -1.")
    per_device_train_batch_size: int = Field(16, ge=1, description="Examples per forward on each device.")
    per_device_eval_batch_size: int = Field(32, ge=1, description="Examples per evaluation forward.")
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Micro-batches per update; ZO micro-batches share one seed and average g."
    )
    lr_scheduler_type: str = Field("constant", description="HF scheduler name: constant, linear, cosine, ...")
    warmup_steps: float = Field(0, ge=0, description="Warm-up steps (or a fraction of max_steps if < 1).")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (not on biases and norms).")
    seed: int = Field(42, description="Run seed: model init, data order, and every ZO direction.")
    logging_steps: float = Field(10, gt=0, description="Log loss (and ZO projected gradient) every N steps.")
    eval_strategy: Literal["no", "steps", "epoch"] = Field("no", description="Evaluate during training too.")

    @field_validator("eval_strategy", "save_strategy", mode="before")
    @classmethod
    def _yaml_no(cls, v: Any) -> Any:
        return "no" if v is False else v  # `save_strategy: no` in YAML 1.1 is the boolean false
    eval_steps: float | None = Field(None, description="With eval_strategy steps: every N steps.")
    save_strategy: Literal["no", "steps", "epoch", "best"] = Field("steps", description="When to checkpoint.")
    save_steps: float = Field(500, gt=0, description="Checkpoint every N steps (resume needs one).")
    save_total_limit: int | None = Field(2, ge=1, description="Keep at most this many checkpoints.")
    report_to: str | list[str] = Field("none", description="HF loggers: none, tensorboard, wandb, ...")
    dataloader_num_workers: int = Field(0, ge=0, description="Data loading worker processes.")

    @model_validator(mode="before")
    @classmethod
    def _only_training_arguments(cls, values: Any) -> Any:
        problems = train_key_problems(values)
        if problems:
            raise ValueError("; ".join(problems))
        return values

    def training_arguments_kwargs(self) -> dict[str, Any]:
        return self.model_dump()


def train_key_problems(values: Any) -> list[str]:
    """One message per key of the train section that is not a TrainingArguments field."""
    if not isinstance(values, dict):
        return []
    known = _training_argument_names()
    problems = []
    for key in values:
        if key in _TRAIN_KEYS_OWNED_ELSEWHERE:
            problems.append(f"train.{key}: set by {_TRAIN_KEYS_OWNED_ELSEWHERE[key]}, not in train")
        elif key not in known:
            hint = difflib.get_close_matches(key, sorted(known), n=1)
            suggestion = f"; did you mean 'train.{hint[0]}'?" if hint else ""
            problems.append(f"train.{key}: unknown key (not a transformers.TrainingArguments field){suggestion}")
    return problems


class OutputSection(Section):
    dir: str = Field("runs/zoft", description="Run folder: final model, checkpoints, metrics.json, trajectory.")
    overwrite: bool = Field(False, description="Replace an existing, non-empty output.dir (deletes it).")
    resume: bool | str = Field(
        False, description="true: continue from the latest complete checkpoint in output.dir; or a checkpoint path."
    )
    save_model: bool = Field(True, description="Save the final model (an ordinary HF / peft checkpoint).")
    save_trajectory: bool = Field(
        True, description="ZO: log (step, seed, projected gradient, lr) to trajectory.jsonl for `zoft replay`."
    )


class EvaluationSection(Section):
    before: bool = Field(True, description="Evaluate on the held-out split before training.")
    after: bool = Field(True, description="Evaluate on the held-out split after training.")


class WTACRSSection(Section):
    ratio: float = Field(
        gt=0,
        le=1,
        description="Fraction of tokens whose inputs a replaced linear keeps for its weight gradient "
        "(1.0 = exact). The forward and the input gradient stay exact.",
    )
    target_modules: list[str] | str = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
        description="Linear layers to replace (name suffixes or a full-name regex). q/k/v save memory only "
        "together, gate/up only together; see docs/wta_crs.md.",
    )
    grad_norm_cache: bool = Field(
        False,
        description="Gradient-aware sampling, as the authors' code: keep each example's per-token output-gradient "
        "norms from its last backward (refreshed at every visit) and sample with p ∝ ||x_i|| ||g_i|| when it "
        "comes back; the first visit uses ||x_i||. Helps from the second epoch on (padding stops taking the "
        "budget). Costs CPU memory: 2 bytes per non-padding token per sampled input (q/k/v share one) per "
        "distinct example, e.g. 184 MB for 8,000 x 128-token examples on SmolLM2's default targets.",
    )


class MemorySection(Section):
    wta_crs: WTACRSSection | None = Field(
        None,
        description="WTA-CRS activation sampling (Liu et al., 2023): linear layers keep a sampled subset "
        "of input rows for the backward pass; first-order methods only.",
    )

# ---- privacy (issue 8) -------------------------------------------------------------------------


class PrivacySection(Section):
    """Differentially private training: FlashDP (first-order DP-SGD) or DPZero (zeroth-order).

    See docs/privacy.md. The guarantee covers the trained weights (and a ZO run's trajectory
    coefficients); it assumes Poisson sampling (``sampling: poisson``).
    """

    method: Literal["flashdp", "dpzero"] = Field(
        description="flashdp: DP-SGD with per-layer per-sample clipping fused into the backward pass (needs "
        "method adamw or sgd); dpzero: clip each example's zeroth-order projected-gradient scalar and add "
        "noise to it (needs a zeroth-order method such as mezo)."
    )
    target_epsilon: float | None = Field(
        None,
        gt=0,
        description="Privacy budget to meet at the end of training: the noise multiplier is computed from it "
        "for the planned number of optimizer steps. Give this or noise_multiplier, not both.",
    )
    noise_multiplier: float | None = Field(
        None,
        ge=0,
        description="sigma: noise std divided by the L2 sensitivity of one step's clipped sum (what the "
        "accountant sees). The epsilon spent is reported. Give this or target_epsilon, not both.",
    )
    delta: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="delta of (epsilon, delta)-DP. Default: 1 / N^1.1 for N training examples (below 1/N, "
        "the usual requirement).",
    )
    clip_bound: float | None = Field(
        None,
        gt=0,
        description="flashdp: total L2 bound C on one example's gradient, split evenly over the L trainable "
        "parameters (C_l = C / sqrt(L)); dpzero: the bound on one example's projected-gradient scalar.",
    )
    clip_bounds: dict[str, float] | None = Field(
        None,
        description="flashdp only: per-parameter bounds, parameter name (as in model.named_parameters(), "
        "after peft wrapping) -> bound; must name every trainable parameter. Instead of clip_bound.",
    )
    sampling: Literal["poisson", "shuffle"] = Field(
        "poisson",
        description="poisson: each example joins each logical batch independently with probability "
        "q = batch * accumulation / N, as the accountant assumes (batch sizes vary; add/remove-one neighbours, "
        "noise sigma*C); shuffle: ordinary fixed-size shuffled batches (replace-one neighbours, so the noise "
        "is 2*sigma*C) accounted with the same q, an approximation that is NOT a proven bound.",
    )
    accountant: Literal["rdp", "prv"] = Field(
        "rdp", description="Opacus accountant for epsilon: rdp (Renyi DP, default) or prv (tighter, slower)."
    )
    path: Literal["auto", "explicit", "ghost"] = Field(
        "auto",
        description="flashdp: how per-sample norms of linear layers are computed. auto picks per layer "
        "(ghost-norm when T^2 < d_in*d_out); explicit forms per-sample gradients in blocks; ghost uses "
        "Gram matrices of activations and output gradients.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> PrivacySection:
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            which = "both" if self.target_epsilon is not None else "neither"
            raise ValueError(f"give exactly one of privacy.target_epsilon or privacy.noise_multiplier (got {which})")
        if self.method == "flashdp":
            if (self.clip_bound is None) == (self.clip_bounds is None):
                which = "both" if self.clip_bound is not None else "neither"
                raise ValueError(
                    f"privacy method 'flashdp' needs exactly one of privacy.clip_bound or privacy.clip_bounds "
                    f"(got {which})"
                )
            bad = sorted(k for k, v in (self.clip_bounds or {}).items() if not v > 0)
            if bad:
                raise ValueError(f"privacy.clip_bounds must be > 0 (not for: {', '.join(bad)})")
        else:
            if self.clip_bounds is not None:
                raise ValueError(
                    "privacy.clip_bounds is for flashdp; dpzero clips one scalar per example: use privacy.clip_bound"
                )
            if self.clip_bound is None:
                raise ValueError("privacy method 'dpzero' needs privacy.clip_bound (the bound on each scalar)")
            if self.path != "auto":
                raise ValueError("privacy.path applies to flashdp only; drop it for dpzero")
        return self


# --- ZO2 offload / DistZO2 sections (zoft/zo/offload.py, zoft/zo/distributed.py) -------------


class OffloadSection(Section):
    """ZO2: keep the transformer blocks in CPU memory and stream them through the GPU (ZO only)."""

    device: Literal["cpu"] = Field("cpu", description="Where blocks live between their forwards.")
    compute_device: str | None = Field(
        None, description="Where blocks compute; default cuda when available, else cpu (same code path, no saving)."
    )
    prefetch: bool = Field(True, description="Upload block i+1 on a side CUDA stream while block i computes.")
    pin_memory: bool | None = Field(None, description="Pin stored blocks for asynchronous uploads; default: on CUDA.")
    storage_dtype: Literal["bfloat16", "float16"] | None = Field(
        None,
        description="Store the blocks' weights in this 16-bit dtype in CPU memory (half the memory and upload "
        "bytes of float32) and compute in model.dtype (float32) on the device, as ZO2's AMP mode; null: store "
        "them in model.dtype. Updated weights are rounded back as offload.rounding says.",
    )
    rounding: Literal["stochastic", "nearest"] | None = Field(
        None,
        description="With storage_dtype: how updated weights are rounded to it (default stochastic). stochastic "
        "(seeded by run seed, step and parameter name, so runs resume and replay exactly) keeps ZO updates of "
        "~1e-6 in expectation; nearest loses every update below half a bfloat16 spacing.",
    )

    sliced_upload: bool | Literal["auto"] = Field(
        "auto",
        description="With distributed (DistZO2) on several processes: each rank uploads 1/N of every block and "
        "the ranks of a node all-gather the rest over the GPU interconnect (DistZO2's sliced uploads; N: ranks "
        "per node); auto: on when more than one process runs; false: every rank uploads whole blocks.",
    )

    @property
    def resolved_rounding(self) -> str:
        """offload.rounding, or its default (stochastic)."""
        return self.rounding or "stochastic"

    @model_validator(mode="before")
    @classmethod
    def _from_device(cls, v: Any) -> Any:
        return {"device": v} if isinstance(v, str) else v


class DistributedSection(Section):
    """DistZO2: ZO training over several processes (torchrun / accelerate launch); only scalars cross ranks."""

    perturbation_parallel: int = Field(
        1, description="Ranks per perturbation group: 2 runs the +eps and -eps forwards on two ranks (PertP); 1: off."
    )
    data_parallel: int | None = Field(
        None, description="Ranks that split each batch; default: world size / perturbation_parallel."
    )
    checksum_steps: int = Field(
        50, ge=0, description="Every N steps all ranks compare a float64 checksum of the trained weights (0: never)."
    )

    @field_validator("perturbation_parallel")
    @classmethod
    def _one_or_two(cls, v: int) -> int:
        if v not in (1, 2):
            raise ValueError("must be 1 (off) or 2 (the +eps and -eps forwards on two ranks)")
        return v


# ---------------------------------------------------------------------------------------------


class ReservedSection(Section):
    """A section reserved for a method family whose options are not available yet: any key is an error."""


class Recipe(Section):
    model: ModelSection
    data: DataSection
    method: MethodSection = Field(default_factory=MethodSection)
    peft: PeftSection | None = None
    train: TrainSection = Field(default_factory=TrainSection)
    output: OutputSection = Field(default_factory=OutputSection)
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    memory: MemorySection | None = None
    offload: OffloadSection | None = None
    privacy: PrivacySection | None = None
    distributed: DistributedSection | None = None

    @property
    def uses_paired_forward(self) -> bool:
        """method.paired_forward resolved: ``auto`` is on with offload where the paired forward applies."""
        value = self.method.paired_forward
        if value == "auto":
            pertp = self.distributed is not None and self.distributed.perturbation_parallel == 2
            return (
                self.offload is not None and self.method.name == "mezo" and self.privacy is None and not pertp
                and self.model.task == "causal_lm"
            )
        return bool(value) and self.method.is_zeroth_order

    @model_validator(mode="after")
    def _combinations(self) -> Recipe:
        if self.model.task == "sequence_classification" and self.data.format != "classification":
            raise ValueError(
                "model.task 'sequence_classification' needs data.format 'classification' (labels come from data.verbalizers)"
            )
        if self.memory is not None and self.memory.wta_crs is not None and self.method.is_zeroth_order:
            raise ValueError(
                f"memory.wta_crs saves activations kept for the backward pass, and method '{self.method.name}' "
                "has no backward; drop memory.wta_crs or use method adamw/sgd"
            )
        if self.peft is not None and self.peft.method == "prefix_tuning" and self.method.is_zeroth_order:
            # peft's prefix tuning builds its past_key_values outside any module forward that owns the
            # prefix parameters, which the ZO perturbation hooks rely on.
            raise ValueError("peft.method 'prefix_tuning' is not supported with a zeroth-order method; use lora")
        if self.privacy is not None and (self.offload is not None or self.distributed is not None):
            raise ValueError(
                "privacy with offload or distributed is not supported: the private step runs in one "
                "process with the model in memory; drop offload/distributed"
            )
        lora_problem = _lora_combination_problem(self)  # issue 5
        if lora_problem:
            raise ValueError(lora_problem)
        privacy_problem = _privacy_combination_problem(self)  # issue 8
        if privacy_problem:
            raise ValueError(privacy_problem)
        # ZO2 / DistZO2 rely on the ZO step (no backward, scalar-only exchange).
        for key in ("offload", "distributed"):
            if getattr(self, key) is not None and not self.method.is_zeroth_order:
                raise ValueError(
                    f"{key}: needs a zeroth-order method (method.name: mezo), not '{self.method.name}'; "
                    f"drop the {key} section for first-order training"
                )
        offload_problem = _offload_combination_problem(self)
        if offload_problem:
            raise ValueError(offload_problem)
        deepspeed_problem = _deepspeed_combination_problem(self)
        if deepspeed_problem:
            raise ValueError(deepspeed_problem)
        fsdp_problem = _fsdp_combination_problem(self)
        if fsdp_problem:
            raise ValueError(fsdp_problem)
        _qzo_addax_combinations(self)  # QZO / Addax
        paired_problem = _paired_forward_problem(self)
        if paired_problem:
            raise ValueError(paired_problem)
        galore_problem = _natural_galore_combination_problem(self)
        if galore_problem:
            raise ValueError(galore_problem)
        return self


def _paired_forward_problem(recipe: Recipe) -> str | None:
    """One line naming the keys when ``method.paired_forward: true`` does not fit the recipe (zoft/zo/paired.py)."""
    method = recipe.method
    if method.paired_forward is not True:
        return None
    if not method.is_zeroth_order:
        return f"method.paired_forward: only used by zeroth-order methods, not '{method.name}'"
    if method.name == "addax":
        return "method.paired_forward: true is not supported with method 'addax' in this version; drop it"
    if recipe.distributed is not None and recipe.distributed.perturbation_parallel == 2:
        return (
            "method.paired_forward: true with distributed.perturbation_parallel 2: PertP already runs the +eps and "
            "-eps forwards on two ranks; set one of them off (paired_forward: false or perturbation_parallel: 1)"
        )
    if recipe.privacy is not None:
        return (
            "method.paired_forward: true with privacy is not supported (DPZero scores each example's two forwards "
            "itself); drop it"
        )
    if recipe.model.task != "causal_lm":
        return (
            f"method.paired_forward: true needs model.task 'causal_lm' (the loss of each half of a "
            f"'{recipe.model.task}' batch is not split); drop it"
        )
    return None


def _offload_combination_problem(recipe: Recipe) -> str | None:
    """One line naming the keys when the offload section's precision settings do not fit the recipe."""
    o = recipe.offload
    if o is None:
        return None
    if o.sliced_upload is True and recipe.distributed is None:
        return (
            "offload.sliced_upload: true shares block uploads among DistZO2 ranks, but the recipe has no "
            "distributed section; add one (distributed: {}) and launch several processes, or use auto"
        )
    if o.storage_dtype is None:
        if o.rounding is not None:
            return (
                "offload.rounding: only used with offload.storage_dtype (blocks are stored in model.dtype); the updates "
                "of bf16/fp16 model weights are rounded as method.master_weights says (auto: stochastic, none: nearest)"
            )
        return None
    if recipe.model.dtype != "float32":
        # Storage must be strictly narrower than the compute dtype: bf16 <-> fp16 is no narrowing (each has
        # values the other lacks), the same dtype is today's storage, and 'auto' is unknown until loading.
        return (
            f"offload.storage_dtype {o.storage_dtype} needs model.dtype float32 (the dtype blocks compute in), "
            f"not '{recipe.model.dtype}'; set model.dtype: float32, or drop offload.storage_dtype to store the "
            f"blocks in {recipe.model.dtype}"
        )
    if recipe.method.master_weights == "fp32":
        return (
            "method.master_weights fp32 with offload.storage_dtype: an fp32 copy of every trained weight undoes "
            "the storage saving (updates are computed in fp32 on the device and rounded as offload.rounding says); "
            "use master_weights auto"
        )
    return None


def _lora_combination_problem(recipe: Recipe) -> str | None:
    """One line naming the keys when peft.init / peft.optimizer (LoRA-GA, LoRA-Pro) do not fit the recipe."""
    p = recipe.peft
    if p is None:
        return None
    method = recipe.method.name
    if p.init == "lora_ga" and p.method != "lora":
        return f"peft.init 'lora_ga' initializes LoRA adapters, not peft.method '{p.method}'; use peft.method lora"
    if p.optimizer == "lora_pro" and p.method != "lora":
        return f"peft.optimizer 'lora_pro' corrects LoRA gradients, not peft.method '{p.method}'; use peft.method lora"
    if p.optimizer == "lora_pro" and recipe.method.is_zeroth_order:
        return f"peft.optimizer 'lora_pro': LoRA-Pro corrects gradients, and method '{method}' has none; use method adamw"
    if p.optimizer == "lora_pro" and method != "adamw":
        return f"peft.optimizer 'lora_pro' is an AdamW optimizer; use method adamw, not '{method}'"
    if p.init == "lora_ga" and recipe.method.is_zeroth_order:
        return (
            f"peft.init 'lora_ga' offsets the base weights from first-order gradients, which method '{method}' "
            "(and zoft replay) does not use; use method adamw or sgd"
        )
    if p.optimizer == "lora_pro" and recipe.privacy is not None:
        return "peft.optimizer 'lora_pro' with privacy is not supported (the private step has its own optimizer)"
    return None


def _privacy_combination_problem(recipe: Recipe) -> str | None:
    """One line naming the keys when the privacy section does not fit the rest of the recipe."""
    p = recipe.privacy
    if p is None:
        return None
    if p.method == "flashdp" and recipe.method.is_zeroth_order:
        return (
            f"privacy.method 'flashdp' clips gradients, but method '{recipe.method.name}' is zeroth-order; "
            "use privacy.method 'dpzero' or method adamw/sgd"
        )
    if p.method == "dpzero" and not recipe.method.is_zeroth_order:
        return (
            f"privacy.method 'dpzero' is for zeroth-order methods, but method '{recipe.method.name}' is "
            "first-order; use privacy.method 'flashdp' or method mezo"
        )
    extra = recipe.train.model_extra or {}
    if p.method == "flashdp" and float(extra.get("max_grad_norm") or 0) > 0:
        return (
            "train.max_grad_norm: global gradient clipping after per-sample clipping breaks the privacy "
            "guarantee; drop it (zoft sets 0 with privacy)"
        )
    if p.method == "flashdp" and extra.get("fp16"):
        return (
            "train.fp16 with privacy.method 'flashdp': the fp16 loss scaler would scale gradients before "
            "per-sample clipping; use bf16 or float32"
        )
    if recipe.peft is not None and recipe.peft.method == "prefix_tuning" and p.method == "flashdp":
        return "peft.method 'prefix_tuning' has no per-sample clipping in flashdp; use lora"
    return None


def _deepspeed_combination_problem(recipe: Recipe) -> str | None:
    """train.deepspeed (HF's DeepSpeed key): the file must exist, and ZeRO must fit the method (zoft/deepspeed.py)."""
    value = (recipe.train.model_extra or {}).get("deepspeed")
    if value in (None, "", False):
        return None
    from zoft.deepspeed import combination_problem, read_config

    try:
        ds = read_config(value)
    except ValueError as e:
        return str(e)
    return combination_problem(
        ds,
        method=recipe.method.name,
        zeroth_order=recipe.method.is_zeroth_order,
        sections=[k for k in ("offload", "distributed") if getattr(recipe, k) is not None],
        privacy=recipe.privacy.method if recipe.privacy is not None else None,
        peft_init=recipe.peft.init if recipe.peft is not None else None,
        peft_optimizer=recipe.peft.optimizer if recipe.peft is not None else None,
    )


def _fsdp_combination_problem(recipe: Recipe) -> str | None:
    """train.fsdp (HF's FSDP key): the methods that need whole tensors are refused (zoft/fsdp.py)."""
    from zoft.fsdp import TRAIN_KEY, fsdp_requested, recipe_problem

    if not fsdp_requested((recipe.train.model_extra or {}).get("fsdp")):
        return None
    return recipe_problem(recipe, TRAIN_KEY)


# --- QZO / Addax combination checks ---
_ADDAX_KEYS = ("length_threshold", "memory_budget_gb", "zo_batch_size", "fo_batch_size", "alpha")


def _first_order_only_train_keys(recipe: Recipe) -> list[str]:
    # Options that act on a full gradient or an optimizer that zoft's ZO update (and Addax's in-place
    # SGD) does not have.
    keys = [f"train.{k}" for k in ("optim", "max_grad_norm") if k in recipe.train.model_fields_set]
    return keys


def _qzo_addax_combinations(recipe: Recipe) -> None:
    method = recipe.method
    if method.name in ("qzo", "addax"):
        # ZO2/DistZO2 stream or split plain MeZO steps (Addax has a backward; QZO's 4-bit layers are not
        # offload-aware), and DPZero's guarantee covers the scalar ZO step only.
        for key in ("offload", "distributed", "privacy"):
            if getattr(recipe, key) is not None:
                raise ValueError(f"{key}: not supported with method '{method.name}' in this version; use method mezo")
    if method.name != "addax":
        set_keys = [f"method.{k}" for k in _ADDAX_KEYS if getattr(method, k) is not None]
        if set_keys:
            raise ValueError(f"{', '.join(set_keys)}: only used by method 'addax' (method is '{method.name}')")
    if method.clip_projected_grad is not None and not method.is_zeroth_order:
        raise ValueError(f"method.clip_projected_grad: only used by zeroth-order methods, not '{method.name}'")
    if "master_weights" in method.model_fields_set and method.master_weights != "auto" and not method.is_zeroth_order:
        raise ValueError(
            f"method.master_weights: only used by zeroth-order methods (their seeded update); method '{method.name}' "
            "updates through its optimizer in the model's dtype; drop it"
        )
    if method.name == "qzo" and recipe.peft is not None:
        raise ValueError("method 'qzo' trains the 4-bit quantization scales, not adapters; drop the peft section")
    if recipe.model.quantization is not None:
        if recipe.peft is not None:
            raise ValueError(
                "model.quantization with peft (QLoRA) is not supported in this version; drop peft to train the "
                "4-bit scales with method qzo"
            )
        if not method.is_zeroth_order or method.name == "addax":
            raise ValueError(
                f"model.quantization: first-order training ('{method.name}') of the 4-bit scales is not supported; "
                "use method qzo (or mezo)"
            )
    if recipe.model.quantization_blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise ValueError("model.quantization_blocksize: use a power of two from 32 to 4096 (bitsandbytes' sizes)")
    if method.name in ("qzo", "addax"):
        fo_keys = _first_order_only_train_keys(recipe)
        if method.name == "qzo" and recipe.train.model_extra and recipe.train.model_extra.get("gradient_checkpointing"):
            fo_keys.append("train.gradient_checkpointing")
        if fo_keys:
            why = "has no gradient" if method.name == "qzo" else "updates each parameter in place during the backward"
            raise ValueError(f"{', '.join(fo_keys)}: first-order-only option; method '{method.name}' {why}, drop it")
    if method.name == "addax":
        if (recipe.train.model_extra or {}).get("fp16"):
            from zoft.zo.addax import FP16_REFUSAL

            raise ValueError(FP16_REFUSAL)
        if method.length_threshold is None:
            raise ValueError(
                "method.length_threshold: required for addax (tokens; longer sequences go to the zeroth-order "
                "part), or 'auto' with method.memory_budget_gb"
            )
        if method.length_threshold == "auto" and method.memory_budget_gb is None:
            raise ValueError("method.length_threshold 'auto' needs method.memory_budget_gb (GB the run may use)")
        if recipe.train.gradient_accumulation_steps != 1:
            raise ValueError(
                "train.gradient_accumulation_steps: addax applies its update during the backward (in-place SGD), "
                "so it cannot accumulate; raise method.zo_batch_size / method.fo_batch_size instead"
            )


# --- end QZO / Addax ---


def _natural_galore_combination_problem(recipe: Recipe) -> str | None:
    """One line naming the keys when method natural_galore (or its keys) do not fit the recipe."""
    method = recipe.method
    if method.name != "natural_galore":
        set_keys = [f"method.{k}" for k in NATURAL_GALORE_DEFAULTS if getattr(method, k) is not None]
        if set_keys:
            return f"{', '.join(set_keys)}: only used by method 'natural_galore' (method is '{method.name}')"
        return None
    if recipe.peft is not None:
        return (
            "method 'natural_galore' is full-parameter training (it projects the gradients of the model's own "
            "weights); drop the peft section, or use method adamw to train adapters"
        )
    if recipe.privacy is not None:
        return "privacy with method 'natural_galore' is not supported in this version; use method adamw or sgd"
    extra = recipe.train.model_extra or {}
    for key, use in (("optim", "method natural_galore is the optimizer"),
                     ("optim_target_modules", "use method.target_modules")):
        if key in extra:
            return f"train.{key}: not used with method 'natural_galore' ({use}); drop it"
    if method.layerwise:
        if recipe.train.gradient_accumulation_steps != 1:
            return (
                "train.gradient_accumulation_steps: method.layerwise updates each weight during the backward pass "
                "and frees its gradient, so nothing can be accumulated; set it to 1 (raise "
                "train.per_device_train_batch_size instead) or set method.layerwise: false"
            )
        if float(extra.get("max_grad_norm") or 0) > 0:
            return (
                "train.max_grad_norm: method.layerwise applies each gradient as soon as it is computed, so there is "
                "no global gradient norm to clip; drop it or set method.layerwise: false"
            )
        if extra.get("fp16"):
            return (
                "train.fp16 with method.layerwise: the fp16 loss scaler unscales gradients only before "
                "optimizer.step, after the layer-wise updates; use bf16 or float32, or method.layerwise: false"
            )
    return None


# ---------------------------------------------------------------------------------------------
# Loading and error formatting
# ---------------------------------------------------------------------------------------------


def _section_keys(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _model_at(path: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Recipe
    for part in path:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        ann = model.model_fields[part].annotation
        candidates = getattr(ann, "__args__", (ann,))
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return model


def _format_error(err: dict) -> str:
    # pydantic puts union-branch and validator tags into loc; keep only the recipe keys.
    loc = tuple(p for p in err["loc"] if isinstance(p, int) or ("[" not in p and p not in _TYPE_TAGS))
    path = ".".join(str(p) for p in loc)
    if not path:  # a whole-recipe check: its message names the keys itself
        msg = err["msg"]
        return msg[len("Value error, ") :] if msg.startswith("Value error, ") else msg
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        if parent is ReservedSection:
            return f"{path}: unknown key; the '{loc[0]}' section has no options in this version of zoft"
        options = _section_keys(parent) if parent else []
        hint = difflib.get_close_matches(str(loc[-1]), options, n=1)
        msg = f"{path}: unknown key"
        if hint:
            msg += f"; did you mean '{'.'.join(str(p) for p in loc[:-1] + (hint[0],))}'?"
        if options:
            msg += f" (expected one of: {', '.join(options)})"
        return msg
    if kind == "missing":
        return f"{path}: required key is missing"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{path}: expected a section (a mapping of keys), got {err.get('input')!r}"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    got = err.get("input")
    if kind not in ("value_error", "model_type", "dict_type") and not isinstance(got, dict):
        msg += f" (got {got!r})"
    return f"{path}: {msg}"


_TYPE_TAGS = {"str", "bool", "int", "float", "list", "dict", "none", "is-instance", "literal"}


def validation_lines(exc: ValidationError, source: str) -> list[str]:
    lines, seen = [], set()
    for err in exc.errors(include_url=False):
        line = _format_error(err)
        key = line.split(":", 1)[0]
        if key in seen:  # a union reports each branch; the first says enough
            continue
        seen.add(key)
        lines.append(f"{source}: {line}")
    return lines


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value`` into (["a", "b", "c"], value); the value is read as YAML (typed)."""
    if "=" not in text or text.startswith("="):
        raise RecipeError([f"override '{text}': expected KEY.PATH=VALUE, e.g. train.learning_rate=1e-6"])
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
        value = raw.strip()  # YAML 1.1 reads no/yes/on/off as booleans: save_strategy=no means "no"
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {} if node.get(part) is None or isinstance(node.get(part), str) else node[part]
                if isinstance(node[part], str):  # e.g. `method: mezo` then method.eps=...
                    node[part] = {"name": node[part]}
            if not isinstance(node[part], dict):
                raise RecipeError([f"override '{text}': '{part}' is not a section"])
            node = node[part]
        node[path[-1]] = value
    return raw


def read_recipe_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise RecipeError([f"{path}: recipe file not found"])
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError([f"{path}{where}: not valid YAML: {problem}"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError([f"{path}: a recipe is a mapping of sections (model, data, method, ...)"])
    return raw


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe. Raises RecipeError with one line per problem."""
    raw = read_recipe_file(path)
    raw = apply_overrides(raw, list(overrides or []))
    return validate_recipe(raw, source=str(path))


def validate_recipe(raw: dict, source: str = "recipe") -> Recipe:
    # Train keys are checked first so that each unknown one gets its own line.
    key_lines = [f"{source}: {line}" for line in train_key_problems(raw.get("train"))]
    if key_lines:
        raw = dict(raw, train={k: v for k, v in raw["train"].items() if f"train.{k}:" not in " ".join(key_lines)})
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(key_lines + validation_lines(e, source)) from None
    if key_lines:
        raise RecipeError(key_lines)
    return recipe


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
