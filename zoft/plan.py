"""``zoft plan``: estimate a recipe's peak GPU and CPU memory before loading any weights.

The model is built on the meta device (``accelerate.init_empty_weights``) from its config, so the
parameter counts are exact and nothing is downloaded beyond the config. Weights, trained-parameter
masters, gradients and optimizer state are counted exactly from those shapes; activations use the
approximations documented in :func:`activation_bytes` (eager attention, so an upper bound for
SDPA/flash attention). The table compares the recipe's setting with the alternatives (MeZO full,
MeZO + LoRA, AdamW full, LoRA + AdamW; with and without ZO2 offload) and says what fits. QZO
(NF4 codes + fp32 block scales) and Addax (in-place SGD: one gradient alive at a time) have their
own rows when the recipe uses them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

GiB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 4}
ADAMW_STATE_BYTES = 8  # exp_avg + exp_avg_sq in fp32


@dataclass
class ModelShape:
    """What the estimate needs to know about a model, read from a meta-device instance."""

    total_params: int
    block_params: int  # all transformer blocks together
    largest_block_params: int
    n_blocks: int
    largest_tensor: int  # the biggest single parameter (a ZO perturbation temporary)
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    lora_params: int = 0
    # numel of each nn.Linear weight QZO quantizes ("all-linear": not lm_head, not a tied weight)
    nf4_linear_weights: tuple[int, ...] = ()


@dataclass
class Estimate:
    """Peak memory of one setting, in bytes, split by what holds it."""

    label: str
    gpu: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, int] = field(default_factory=dict)

    @property
    def gpu_total(self) -> int:
        return sum(self.gpu.values())

    @property
    def cpu_total(self) -> int:
        return sum(self.cpu.values())


def model_shape(
    config, *, task: str = "causal_lm", lora: dict | None = None, nf4_target_modules="all-linear"
) -> ModelShape:
    """Build ``config``'s model on the meta device and measure it.

    Args:
        config: a ``transformers.PretrainedConfig``.
        task: ``"causal_lm"`` or ``"sequence_classification"``.
        lora: LoRA settings (``r``, ``target_modules``) to count adapter parameters; ``None``: no LoRA.
        nf4_target_modules: the linear layers QZO would quantize (``model.quantization_target_modules``).
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from zoft.zo.offload import find_transformer_blocks

    auto = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    with init_empty_weights():
        model = auto.from_config(config)
    # from_config leaves meta tensors untied (and tying inside the context re-creates them): tie here,
    # so tied weights are counted once, as they are stored.
    model.tie_weights()
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    _, blocks = find_transformer_blocks(model)
    sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None) or text.n_embd
    inter = getattr(text, "intermediate_size", None) or getattr(text, "ffn_dim", None) or 4 * hidden
    heads = getattr(text, "num_attention_heads", None) or text.n_head
    shape = ModelShape(
        total_params=total,
        block_params=sum(sizes),
        largest_block_params=max(sizes),
        n_blocks=len(sizes),
        largest_tensor=max(p.numel() for p in model.parameters()),
        hidden=hidden,
        intermediate=inter,
        heads=heads,
        vocab=text.vocab_size,
        nf4_linear_weights=_nf4_linear_weights(model, nf4_target_modules),
    )
    if lora is not None:
        shape.lora_params = _lora_params(model, lora)
    return shape


def _nf4_linear_weights(model: nn.Module, target_modules) -> tuple[int, ...]:
    """The weights ``zoft.zo.quant4bit.quantize_model_nf4`` turns into NF4."""
    from zoft.zo.quant4bit import quantized_linear_names

    modules = dict(model.named_modules())
    return tuple(modules[name].weight.numel() for name in quantized_linear_names(model, target_modules)[0])


def _lora_params(model: nn.Module, lora: dict) -> int:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=lora.get("r", 8), target_modules=lora.get("target_modules"))
    with torch.device("meta"):
        peft_model = get_peft_model(model, cfg)
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def activation_bytes(shape: ModelShape, batch: int, seq: int, dtype_bytes: int, *, stored: bool) -> int:
    """Approximate activation memory at batch ``batch`` x ``seq`` tokens.

    Inference (``stored=False``, the ZO forwards): one block's working set — q, k, v, attention
    output and residual (4 H), two MLP intermediates (2 I), eager attention scores (heads x T x T) —
    plus the logits and their fp32 copy for the loss (V x (dtype + 4 bytes)).
    Training (``stored=True``, backward needs them): per block 10 H + 3 I values per token and
    two heads x T x T score tensors, for every block, plus the logits and their gradient.
    """
    tokens = batch * seq
    logits = tokens * shape.vocab * (dtype_bytes + 4)
    scores = batch * shape.heads * seq * seq * dtype_bytes
    if not stored:
        return tokens * (4 * shape.hidden + 2 * shape.intermediate) * dtype_bytes + scores + logits
    per_block = tokens * (10 * shape.hidden + 3 * shape.intermediate) * dtype_bytes + 2 * scores
    return shape.n_blocks * per_block + 2 * logits


def estimate(
    shape: ModelShape,
    *,
    method: str,
    lora: bool,
    offload: bool,
    batch: int,
    seq: int,
    dtype: str = "float32",
    paired: bool | None = None,
    storage_dtype: str | None = None,
    nf4_blocksize: int = 64,
    addax: tuple[int, int, int] | None = None,
) -> Estimate:
    """Peak GPU and CPU memory of one setting.

    Args:
        shape: from :func:`model_shape` (with ``lora`` counted if ``lora`` is set).
        method: ``"mezo"`` / ``"qzo"`` / ``"addax"`` (zeroth-order) or ``"adamw"`` / ``"sgd"`` /
            ``"natural_galore"`` (first-order; natural_galore is counted as AdamW, an upper bound).
        lora: train LoRA adapters only.
        offload: ZO2 (blocks in CPU memory; two blocks resident: the computing and the prefetched one).
        batch, seq: per-device batch size and tokens per example.
        dtype: dtype of the weights (what the model loads and computes in).
        paired: ZO with the paired forward (``method.paired_forward``): one forward of a doubled batch;
            ``None``: with offload, as ``paired_forward: auto``.
        storage_dtype: with ``offload``, the dtype the offloaded blocks are stored in (``offload.storage_dtype``);
            ``None``: ``dtype``. Resident blocks compute in ``dtype``.
        nf4_blocksize: qzo: weights per fp32 scale (``model.quantization_blocksize``).
        addax: addax: ``(K0 long sequences, K1 short sequences, L_T tokens)`` per step; the long batch
            runs forwards only (at ``seq`` tokens), the short one a forward and backward at ``L_T``.
    """
    b = DTYPE_BYTES[dtype]
    zo = method in ("mezo", "qzo", "addax")
    trained = shape.lora_params if lora else shape.total_params
    stored = f" ({storage_dtype} storage)" if offload and storage_dtype else ""
    name = "qzo NF4" if method == "qzo" else method
    label = f"{name}{' + LoRA' if lora else ' full' if method != 'qzo' else ''}{' + offload' if offload else ''}{stored}"
    est = Estimate(label)
    weights = shape.total_params * b
    if method == "qzo":
        # 4-bit codes (two per byte) + one fp32 scale per block of each quantized weight; the rest as loaded.
        quantized = sum(shape.nf4_linear_weights)
        trained = sum(-(-n // nf4_blocksize) for n in shape.nf4_linear_weights)
        est.gpu["weights (NF4 codes)"] = sum(-(-n // 2) for n in shape.nf4_linear_weights)
        est.gpu["weights (fp32 scales, trained)"] = trained * 4
        est.gpu["weights (not quantized)"] = (shape.total_params - quantized) * b
        est.gpu["dequantized weight (one layer, fp32)"] = max(shape.nf4_linear_weights, default=0) * 4
    elif offload:
        resident = (shape.total_params - shape.block_params + 2 * shape.largest_block_params) * b
        est.gpu["weights"] = resident
        est.cpu["weights (offloaded blocks)"] = shape.block_params * DTYPE_BYTES[storage_dtype or dtype]
        if storage_dtype:  # a block arrives in its storage dtype and is cast to the compute dtype on the GPU
            est.gpu["upload staging"] = shape.largest_block_params * DTYPE_BYTES[storage_dtype]
    else:
        est.gpu["weights"] = weights
    if b != 4 and method != "qzo":  # qzo's scales are fp32 already
        # fp32 masters of what is trained; with offload they live with the stored blocks.
        (est.cpu if offload and not lora else est.gpu)["fp32 masters"] = trained * 4
    largest = min(shape.largest_tensor, trained)
    if method == "qzo":  # the scales of the biggest quantized layer
        largest = -(-max(shape.nf4_linear_weights, default=0) // nf4_blocksize)
    if zo and (offload if paired is None else paired):
        # theta + eps z and theta - eps z of a tied embedding (kept for both its users) and of the module
        # computing, an upper bound; the activations of the doubled batch [x; x].
        est.gpu["ZO temporaries"] = 4 * largest * 4
        est.gpu["activations (paired: doubled batch)"] = activation_bytes(shape, 2 * batch, seq, b, stored=False)
    elif method == "addax":
        k0, k1, threshold = addax
        # In-place SGD during the backward: one parameter's gradient alive at a time. The long (ZO) and
        # short (first-order) batches run one after the other, so the larger activation set is the peak.
        est.gpu["ZO temporaries"] = 2 * largest * 4
        est.gpu["gradients (one tensor at a time)"] = largest * b
        est.gpu["activations (max of ZO long / FO short batch)"] = max(
            activation_bytes(shape, k0, seq, b, stored=False),
            activation_bytes(shape, k1, min(threshold, seq), b, stored=True),
        )
    elif zo:
        # theta + eps z of the largest trained tensor, plus z for the update.
        est.gpu["ZO temporaries"] = 2 * largest * 4
        est.gpu["activations"] = activation_bytes(shape, batch, seq, b, stored=False)
    else:
        est.gpu["gradients"] = trained * b
        est.gpu["optimizer state"] = trained * (ADAMW_STATE_BYTES if method in ("adamw", "natural_galore") else 0)
        est.gpu["activations"] = activation_bytes(shape, batch, seq, b, stored=True)
    if not offload:
        # from_pretrained materializes the weights in host memory before they move to the GPU (qzo too:
        # the model is loaded in full precision, then quantized).
        est.cpu["weights while loading"] = weights
    return est


def available_memory() -> tuple[str, int, int]:
    """(device description, free compute-device bytes, available CPU bytes)."""
    cpu = _cpu_available()
    if torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info()
        return torch.cuda.get_device_name(), int(free), cpu
    return "cpu (no CUDA device)", cpu, cpu


def _cpu_available() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def fits(est: Estimate, gpu_free: int, cpu_free: int, *, cuda: bool) -> bool:
    if cuda:
        return est.gpu_total <= gpu_free and est.cpu_total <= cpu_free
    # On CPU both columns are the same memory; the loading copy is the one that becomes the model.
    return est.gpu_total + est.cpu_total - est.cpu.get("weights while loading", 0) <= cpu_free


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def render(
    chosen: Estimate,
    alternatives: list[Estimate],
    *,
    device: str,
    gpu_free: int,
    cpu_free: int,
    cuda: bool,
) -> str:
    """The plan as text: the chosen setting's breakdown, a comparison table, a verdict."""
    lines = [f"zoft plan: {chosen.label}", "", "| memory | GPU GiB | CPU GiB |", "|---|---:|---:|"]
    for key in list(dict.fromkeys(list(chosen.gpu) + list(chosen.cpu))):
        lines.append(f"| {key} | {_gib(chosen.gpu.get(key, 0))} | {_gib(chosen.cpu.get(key, 0))} |")
    lines.append(f"| **peak** | **{_gib(chosen.gpu_total)}** | **{_gib(chosen.cpu_total)}** |")
    lines += ["", "| setting | GPU GiB | CPU GiB | fits |", "|---|---:|---:|---|"]
    for est in alternatives:
        ok = "yes" if fits(est, gpu_free, cpu_free, cuda=cuda) else "no"
        lines.append(f"| {est.label} | {_gib(est.gpu_total)} | {_gib(est.cpu_total)} | {ok} |")
    lines.append("")
    if cuda:
        lines.append(f"device: {device}, {_gib(gpu_free)} GiB free; CPU: {_gib(cpu_free)} GiB available")
    else:
        lines.append(f"device: {device}; the run computes in CPU memory: {_gib(cpu_free)} GiB available")
    if fits(chosen, gpu_free, cpu_free, cuda=cuda):
        lines.append(f"verdict: {chosen.label} fits")
    else:
        need = chosen.gpu_total if cuda else chosen.gpu_total + chosen.cpu_total
        lines.append(f"verdict: {chosen.label} does not fit (needs about {_gib(need)} GiB)")
        better = [e for e in alternatives if fits(e, gpu_free, cpu_free, cuda=cuda)]
        offloaded = [e for e in better if "offload" in e.label and e.label.startswith("mezo")]
        if offloaded and "offload" not in chosen.label:
            key = "{device: cpu, storage_dtype: bfloat16}" if "storage" in offloaded[0].label else "cpu"
            lines.append(
                f"recommendation: {offloaded[0].label} fits: add `offload: {key}` to the recipe (method.name: mezo)"
            )
        elif better:
            lines.append(f"recommendation: {better[0].label} fits")
        else:
            lines.append("recommendation: none of these settings fits; lower train.per_device_train_batch_size "
                         "or data.max_length, or use a smaller model")
    return "\n".join(lines)


def shape_of_recipe(recipe, lora: dict | None = None) -> ModelShape:
    """:func:`model_shape` of the recipe's model (config only, no weights)."""
    from transformers import AutoConfig

    from zoft.models import resolve_model_name

    m = recipe.model
    config = AutoConfig.from_pretrained(
        resolve_model_name(m.name), revision=m.revision, trust_remote_code=m.trust_remote_code
    )
    return model_shape(config, task=m.task, lora=lora, nf4_target_modules=m.quantization_target_modules)


def plan_recipe(recipe, *, gpu_free: int | None = None, cpu_free: int | None = None) -> str:
    """The ``zoft plan`` text for a validated recipe (``zoft.config.Recipe``).

    Args:
        recipe: the recipe.
        gpu_free, cpu_free: override the measured free memory (bytes), e.g. to plan for another machine.
    """
    m, method = recipe.model, recipe.method
    lora_cfg = None
    if recipe.peft is not None and recipe.peft.method == "lora":
        lora_cfg = {"r": recipe.peft.r, "target_modules": recipe.peft.target_modules}
    shape = shape_of_recipe(recipe, lora=lora_cfg or {"r": 8})
    device, measured_gpu, measured_cpu = available_memory()
    cuda = torch.cuda.is_available()
    gpu_free = measured_gpu if gpu_free is None else gpu_free
    cpu_free = measured_cpu if cpu_free is None else cpu_free
    batch, seq = recipe.train.per_device_train_batch_size, recipe.data.max_length
    common = dict(batch=batch, seq=seq, dtype=m.dtype)
    storage = recipe.offload.storage_dtype if recipe.offload is not None else None
    addax = None
    if method.name == "addax":  # 'auto' picks L_T from a budget at run time: plan for the longest
        threshold = seq if method.length_threshold == "auto" else method.length_threshold
        addax = (method.zo_batch_size or batch, method.fo_batch_size or batch, threshold)
    chosen = estimate(
        shape,
        method=method.name,
        lora=lora_cfg is not None,
        offload=recipe.offload is not None,
        paired=recipe.uses_paired_forward,
        storage_dtype=storage,
        nf4_blocksize=m.quantization_blocksize,
        addax=addax,
        **common,
    )
    if method.name == "qzo" and m.quantization is None:  # an NF4 folder loads as stored
        chosen.cpu["weights while loading"] = sum(v for k, v in chosen.gpu.items() if k.startswith("weights"))
    fo = method.name if not method.is_zeroth_order else "adamw"
    alternatives = [
        estimate(shape, method="mezo", lora=False, offload=False, **common),
        estimate(shape, method="mezo", lora=False, offload=True, **common),
        estimate(shape, method="mezo", lora=True, offload=False, **common),
        estimate(shape, method="mezo", lora=True, offload=True, **common),
        estimate(shape, method=fo, lora=False, offload=False, **common),
        estimate(shape, method=fo, lora=True, offload=False, **common),
    ]
    if m.dtype == "float32":  # offload.storage_dtype needs a float32 model
        bf16_storage = estimate(shape, method="mezo", lora=False, offload=True, storage_dtype="bfloat16", **common)
        alternatives.insert(2, bf16_storage)
    if method.name in ("qzo", "addax"):
        alternatives.insert(0, chosen)
    return render(chosen, alternatives, device=device, gpu_free=gpu_free, cpu_free=cpu_free, cuda=cuda)
