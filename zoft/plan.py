"""``zoft plan``: a recipe's peak GPU and CPU memory, planned before any weight is loaded.

The model is built on the meta device (``accelerate.init_empty_weights``) from its config, so every
count that depends only on shapes is exact: weights, LoRA adapters, fp32 masters (``method.master_weights``),
gradients, each optimizer's real state (AdamW's two moments in the trained dtype, as HF runs it; Natural
GaLore's projected moments, bases and Fisher window; LoRA-Pro's), NF4 codes and scales, ZO2's resident
blocks and host-side store. Activations follow what autograd keeps per decoder layer (the tests compare
the formula with the tensors a real tiny model saves for backward); a zeroth-order forward keeps only one
layer's working set. Loading is planned too: ``from_pretrained`` maps the checkpoint file and, when
``model.dtype`` differs from the file's dtype, holds a converted copy beside it.

The table compares the recipe's setting with the settings one recipe change away and names, for a plan
that does not fit, the change (recipe key and value) that would make it fit. ``--gpu-memory 80GB
--cpu-memory 256GB`` plans for a machine other than this one. The offload pre-flight check of ``zoft train``
(:func:`host_bytes_per_process`) uses the same accounting.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from zoft.errors import ZoftError

GiB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# ---- the one setting-dependent term the half-precision ZO work flips ----------------------------------


def _master_bytes_per_param(master_weights: str, trained_dtype_bytes: int) -> int:
    """Bytes of fp32 master copy a zeroth-order run keeps per trained parameter (``method.master_weights``).

    Only trained tensors stored in bf16/fp16 can have a master (``zoft/zo/perturb.py``): ``fp32`` keeps an
    fp32 copy of each (4 bytes); ``auto`` (the default: fp32 update rounded back with seeded stochastic
    rounding) and ``none`` (rounded to nearest) keep none. fp32 tensors are always updated in place.

    Args:
        master_weights: ``"auto"``, ``"fp32"`` or ``"none"``.
        trained_dtype_bytes: bytes per value of the trained tensors (4 for fp32, LoRA adapters and QZO scales).
    """
    if master_weights == "fp32" and trained_dtype_bytes < 4:
        return 4
    return 0


# ---- sizes on the command line -------------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4,
          "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_size(text: str, what: str = "size") -> int:
    """Bytes of a size such as ``80GB`` (10^9), ``80GiB`` (2^30), ``256G`` (2^30, as ``free -g``) or ``1.5T``.

    Raises:
        ZoftError: one line naming the value and the accepted forms.
    """
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ZoftError(
            f"{what}: {text!r} is not a memory size; write a number and a unit, e.g. 80GB (10^9 bytes), "
            "80GiB or 80G (2^30 bytes), 512MiB, 1.5TB"
        )
    return int(float(m.group(1)) * _UNITS[unit])


# ---- what the plan needs to know about a model -----------------------------------------------------------

# Where each linear layer of a decoder block reads its input from (layers in one group read one tensor).
_GROUPS = {
    "attn_in": ("q_proj", "k_proj", "v_proj", "query_key_value", "qkv_proj", "c_attn", "Wqkv", "query", "key",
                "value"),
    "attn_out": ("o_proj", "out_proj", "dense", "attn.c_proj"),
    "mlp_in": ("gate_proj", "up_proj", "fc1", "c_fc", "w1", "w3", "dense_h_to_4h", "intermediate.dense"),
    "mlp_mid": ("down_proj", "fc2", "mlp.c_proj", "w2", "dense_4h_to_h", "output.dense"),
}


def _group_of(name: str) -> str | None:
    # longest suffix first: "intermediate.dense" is an MLP input, a bare "dense" an attention output
    for suffix, group in sorted(((s, g) for g, ss in _GROUPS.items() for s in ss), key=lambda x: -len(x[0])):
        if name == suffix or name.endswith("." + suffix):
            return group
    return None


@dataclass
class ModelShape:
    """What the plan needs to know about a model, read from a meta-device instance (kept in ``model``)."""

    total_params: int
    block_params: int  # all transformer blocks together
    largest_block_params: int
    n_blocks: int
    largest_tensor: int  # the biggest single parameter
    largest_untied: int  # the biggest parameter owned by one module (a perturbed copy lives for its forward only)
    hidden: int
    intermediate: int
    heads: int
    kv_dim: int  # key/value width (num_key_value_heads x head_dim)
    vocab: int
    tied_params: int = 0  # parameters owned by two modules (a tied embedding / head): counted once
    gated_mlp: bool = True  # gate_proj/up_proj/down_proj (Llama, Qwen, Mistral) vs fc1/fc2 (OPT, GPT-2)
    mlp_act: str = "silu"
    rms_norm: bool = True
    attention: str = "sdpa"  # the attention implementation the model loads with
    checkpoint_dtype: str = "float32"  # the dtype the config says the weights are stored in
    lora_params: int = 0
    lora_r: int = 0
    lora_groups: dict[str, int] = field(default_factory=dict)  # input group -> adapted linears per block
    lora_adapted: tuple[str, ...] = ()  # names (inside a block) of the adapted linear layers
    lora_largest: int = 0
    lora_base_params: int = 0  # numel of the base weights LoRA adapts (LoRA-Pro full keeps their moments)
    lora_base_largest: int = 0
    # numel of each nn.Linear weight QZO quantizes ("all-linear": not lm_head, not a tied weight)
    nf4_linear_weights: tuple[int, ...] = ()
    model: nn.Module | None = field(default=None, repr=False, compare=False)


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
    params = list(model.parameters())  # tied weights once
    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    _, blocks = find_transformer_blocks(model)
    sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None) or text.n_embd
    inter = getattr(text, "intermediate_size", None) or getattr(text, "ffn_dim", None) or 4 * hidden
    heads = getattr(text, "num_attention_heads", None) or text.n_head
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    block_linears = [n for n, m in blocks[0].named_modules() if isinstance(m, nn.Linear)]
    gated = any(_group_of(n) == "mlp_in" for n in block_linears) and sum(
        _group_of(n) == "mlp_in" for n in block_linears
    ) > 1
    act = str(getattr(text, "hidden_act", None) or getattr(text, "activation_function", "gelu"))
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    dtype = _DTYPE_NAMES.get(dtype, dtype) if not isinstance(dtype, str) else dtype
    shape = ModelShape(
        total_params=sum(p.numel() for p in params),
        block_params=sum(sizes),
        largest_block_params=max(sizes),
        n_blocks=len(sizes),
        largest_tensor=max(p.numel() for p in params),
        largest_untied=max((p.numel() for p in params if owners[id(p)] == 1), default=0),
        hidden=hidden,
        intermediate=inter,
        heads=heads,
        kv_dim=kv_heads * head_dim,
        vocab=text.vocab_size,
        tied_params=sum(p.numel() for p in params if owners[id(p)] > 1),
        gated_mlp=gated,
        mlp_act=act,
        rms_norm=any("RMSNorm" in type(m).__name__ for m in blocks[0].modules()),
        attention=getattr(model.config, "_attn_implementation", None) or "eager",
        checkpoint_dtype=dtype if dtype in DTYPE_BYTES else "float32",
        nf4_linear_weights=_nf4_linear_weights(model, nf4_target_modules),
        model=model,
    )
    if lora is not None:
        _count_lora(shape, model, lora)
    return shape


def _nf4_linear_weights(model: nn.Module, target_modules) -> tuple[int, ...]:
    """The weights ``zoft.zo.quant4bit.quantize_model_nf4`` turns into NF4."""
    from zoft.zo.quant4bit import quantized_linear_names

    modules = dict(model.named_modules())
    return tuple(modules[name].weight.numel() for name in quantized_linear_names(model, target_modules)[0])


def _count_lora(shape: ModelShape, model: nn.Module, lora: dict) -> None:
    """Adapter parameters, and which input groups of a block the adapters read, from peft on the meta device."""
    import copy

    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    from zoft.zo.offload import find_transformer_blocks

    cfg = LoraConfig(r=lora.get("r", 8), target_modules=lora.get("target_modules"))
    with torch.device("meta"):
        peft_model = get_peft_model(copy.deepcopy(model), cfg)
    trained = [p for p in peft_model.parameters() if p.requires_grad]
    shape.lora_params = sum(p.numel() for p in trained)
    shape.lora_largest = max((p.numel() for p in trained), default=0)
    shape.lora_r = cfg.r
    _, blocks = find_transformer_blocks(peft_model)
    groups: dict[str, int] = {}
    adapted = []
    for name, m in blocks[0].named_modules():
        if isinstance(m, LoraLayer):
            adapted.append(name)
            group = _group_of(name)
            if group is not None:
                groups[group] = groups.get(group, 0) + 1
    shape.lora_groups = groups
    shape.lora_adapted = tuple(adapted)
    bases = [m.get_base_layer().weight.numel() for m in peft_model.modules() if isinstance(m, LoraLayer)]
    shape.lora_base_params = sum(bases)
    shape.lora_base_largest = max(bases, default=0)


# ---- one setting ----------------------------------------------------------------------------------------------


@dataclass
class Setting:
    """One way to run a recipe, as the plan sees it (the recipe's keys, resolved)."""

    method: str = "mezo"  # mezo | qzo | addax | adamw | sgd | natural_galore
    lora: bool = False
    offload: bool = False
    batch: int = 16
    seq: int = 256
    dtype: str = "float32"  # model.dtype (what the weights compute in)
    eval_batch: int | None = None  # an evaluation forward at this batch (None: none planned)
    logits_positions: int | None = None  # positions whose logits are computed (1: one-token verbalizers)
    master_weights: str = "auto"  # method.master_weights
    paired: bool | None = None  # method.paired_forward resolved; None: on with offload (auto)
    z_generator: str = "torch"  # torch (z materialized in fp32) | philox (z in registers on CUDA)
    storage_dtype: str | None = None  # offload.storage_dtype
    pin_memory: bool = False
    gradient_checkpointing: bool = False
    nf4_blocksize: int = 64
    addax: tuple[int, int, int] | None = None  # (K0 long sequences, K1 short sequences, L_T tokens)
    galore: dict | None = None  # method natural_galore: rank, history, target_modules, layerwise
    lora_ga: bool = False
    lora_pro: str | None = None  # efficient | full
    wta_ratio: float | None = None
    wta_groups: tuple[str, ...] = ()  # input groups whose every trained reader is a WTA-CRS layer
    privacy: str | None = None  # flashdp | dpzero
    pertp: bool = False  # DistZO2 perturbation parallelism: one perturbed forward per rank
    processes: int = 1  # processes of the launch on one machine (each holds its own model)
    cuda: bool = True  # the compute device is a CUDA GPU (else this machine's CPU memory)

    @property
    def zeroth_order(self) -> bool:
        return self.method in ("mezo", "qzo", "addax")

    @property
    def uses_paired(self) -> bool:
        return self.zeroth_order and (self.offload if self.paired is None else self.paired)

    def label(self) -> str:
        name = "qzo NF4" if self.method == "qzo" else self.method
        what = " + LoRA" if self.lora else "" if self.method == "qzo" else " full"
        extra = " + offload" if self.offload else ""
        if self.offload and self.storage_dtype:
            extra += f" ({self.storage_dtype} storage)"
        if self.gradient_checkpointing:
            extra += " + checkpointing"
        if self.galore and self.galore.get("layerwise"):
            extra += " + layerwise"
        for on, part in ((self.lora_ga, " + LoRA-GA init"), (self.lora_pro, f" + LoRA-Pro {self.lora_pro}"),
                         (self.wta_ratio is not None, " + WTA-CRS"), (self.privacy, f" + {self.privacy}"),
                         (self.pertp, " + DistZO2 PertP")):
            if on:
                extra += part
        if self.dtype != "float32" and self.method != "qzo":
            extra += f", {self.dtype}"
        if self.zeroth_order and self.master_bytes:
            extra += " + fp32 masters"
        return f"{name}{what}{extra}"

    @property
    def trained_dtype_bytes(self) -> int:
        return 4 if (self.lora or self.method == "qzo") else DTYPE_BYTES[self.dtype]  # peft: fp32 adapters

    @property
    def master_bytes(self) -> int:
        """fp32 master bytes per trained parameter (none with 16-bit block storage: the fp32 copy is resident)."""
        if not self.zeroth_order or (self.offload and self.storage_dtype):
            return 0
        return _master_bytes_per_param(self.master_weights, self.trained_dtype_bytes)


@dataclass
class Estimate:
    """Peak memory of one setting, in bytes, by what holds it.

    ``gpu`` holds what the compute device keeps throughout; ``train`` what a forward and backward add,
    ``step`` what the optimizer step adds after the backward freed the activations, ``evaluation`` what an
    evaluation forward adds (these never coexist: the device peak takes the largest); ``cpu`` the host
    memory held while training; ``loading`` the host memory while the weights load.
    On a machine without CUDA the compute device is host memory too (:meth:`peak_on_cpu_device`).
    """

    label: str
    gpu: dict[str, int] = field(default_factory=dict)
    train: dict[str, int] = field(default_factory=dict)
    step: dict[str, int] = field(default_factory=dict)  # the optimizer step: gradients, its temporaries
    evaluation: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, int] = field(default_factory=dict)
    loading: dict[str, int] = field(default_factory=dict)
    change: str = ""  # the recipe change that gives this setting ("" for the recipe's own)
    processes: int = 1

    @property
    def gpu_total(self) -> int:
        """Peak of the compute device: what stays, plus the larger of a training step and an evaluation."""
        phases = (self.train, self.step, self.evaluation)
        return sum(self.gpu.values()) + max(sum(p.values()) for p in phases)

    @property
    def cpu_total(self) -> int:
        """Host memory of one process while it trains."""
        return sum(self.cpu.values())

    @property
    def load_peak(self) -> int:
        return sum(self.loading.values())

    @property
    def host_peak(self) -> int:
        """Host memory of one process at its peak (loading or training) when computing on a GPU."""
        return max(self.cpu_total, self.load_peak)

    def peak_on_cpu_device(self) -> int:
        """Peak of one process when the compute device is this machine's CPU (one memory for both columns)."""
        return max(self.gpu_total + self.cpu_total, self.load_peak)

    def fits(self, gpu_free: int, cpu_free: int, *, cuda: bool) -> bool:
        if cuda:
            return self.gpu_total <= gpu_free and self.host_peak * self.processes <= cpu_free
        return self.peak_on_cpu_device() * self.processes <= cpu_free


# ---- activations --------------------------------------------------------------------------------------------------


def _logits_bytes(shape: ModelShape, batch: int, positions: int, b: int) -> int:
    # the logits, their fp32 copy and the fp32 log-softmax the loss keeps (HF's loss and the verbalizer loss upcast)
    return batch * positions * shape.vocab * (b + 4 + 4)


def inference_activation_bytes(
    shape: ModelShape, batch: int, seq: int, b: int, *, logits_positions: int | None = None, attention: str | None = None
) -> int:
    """Working set of a forward without autograd (a zeroth-order or evaluation forward).

    Nothing is kept from one decoder layer to the next but the residual stream, so this is one layer's
    working set: the residual and its normed copy plus the larger of the attention part (q, k, v, the
    rotary outputs, the key/value repeated to every head, the output; eager attention also its scores in
    fp32 and the model dtype) and the MLP part (gated: gate, up, act(gate) and their product; else two
    intermediates); plus the attention mask, the final norm and the logits of ``logits_positions`` positions.
    """
    tokens = batch * seq
    h, i, q = shape.hidden, shape.intermediate, shape.heads * (shape.hidden // shape.heads)
    attn = tokens * (2 * h + 4 * q + 2 * shape.kv_dim) * b
    if (attention or shape.attention) == "eager":
        attn += batch * shape.heads * seq * seq * (4 + (b if b < 4 else 0))
    mlp = tokens * (2 * h + (3 if shape.gated_mlp else 2) * i) * b
    norm_upcast = tokens * h * 4 * 2 if b < 4 else 0  # the fp32 copy a norm computes in, and its square
    once = batch * seq * seq * b + tokens * h * (4 + b)
    return max(attn, mlp) + norm_upcast + once + _logits_bytes(shape, batch, logits_positions or seq, b)


def _stored_per_layer(shape: ModelShape, s: Setting, tokens: int, b: int) -> int:
    """Bytes autograd keeps for one decoder layer's backward (see tests/test_plan.py for the check)."""
    h, i = shape.hidden, shape.intermediate
    q = shape.heads * (h // shape.heads)
    batch, seq = tokens // max(s.seq, 1), s.seq
    full = not s.lora and s.method not in ("qzo",)
    adapted = shape.lora_groups if s.lora else {}
    lora_cast = s.lora and b < 4  # peft casts a 16-bit input to the fp32 adapter: one copy per adapter

    def group(name: str, width: int) -> int:
        if not (full or name in adapted):
            return 0
        ratio = s.wta_ratio if (s.wta_ratio is not None and name in s.wta_groups) else 1.0
        if lora_cast and name in adapted:
            return math.ceil(ratio * tokens) * width * 4 * adapted[name]
        return math.ceil(ratio * tokens) * width * b

    # a norm keeps its input (fp32 for RMSNorm, which computes in fp32) and the per-token statistics; its
    # weight gradient needs the normed value too
    norm = tokens * h * 4 + tokens * 4 if shape.rms_norm else tokens * h * b + 2 * tokens * 4
    if full and shape.rms_norm:
        norm += tokens * h * b
    attn = 3 * tokens * q * b  # q, k, v (k, v repeated to every head)
    if shape.attention == "eager":
        attn += batch * shape.heads * seq * seq * (4 + (b if b < 4 else 0))  # softmax (fp32, and its cast)
        attn += group("attn_out", q)  # o_proj's input is the attention output, kept only for its weight
    else:
        # the output (o_proj reads it), the logsumexp, and the additive padding mask sdpa keeps per layer
        attn += tokens * q * b + batch * shape.heads * seq * 4 + batch * seq * seq * b
    if shape.gated_mlp:
        mlp = 3 * tokens * i * b + group("mlp_mid", i)  # gate, up, act(gate); down's input
    elif "relu" in shape.mlp_act:
        mlp = tokens * i * b  # relu's output is fc2's input too
    else:
        mlp = tokens * i * b + group("mlp_mid", i)  # gelu's input; fc2's input
    lora = sum(adapted.values()) * tokens * shape.lora_r * 4
    return 2 * norm + group("attn_in", h) + attn + group("mlp_in", h) + mlp + lora


def stored_activation_bytes(shape: ModelShape, s: Setting, batch: int, seq: int) -> int:
    """Activations of a first-order training step at ``batch`` x ``seq``: what every layer keeps for the
    backward (with gradient checkpointing: every layer's input plus one layer recomputed), one more layer's
    worth as the backward's working set, the attention mask, the final norm and the logits."""
    b = DTYPE_BYTES[s.dtype]
    tokens = batch * seq
    layer = _stored_per_layer(shape, replace(s, seq=seq), tokens, b)
    if s.gradient_checkpointing:
        layers = shape.n_blocks * tokens * shape.hidden * b + layer
    else:
        layers = shape.n_blocks * layer
    once = batch * seq * seq * b + tokens * shape.hidden * (4 + b)
    return layers + layer + once + _logits_bytes(shape, batch, s.logits_positions or seq, b)


# ---- one estimate --------------------------------------------------------------------------------------------------


def _galore_state(shape: ModelShape, galore: dict, b: int) -> tuple[int, int]:
    """(Natural GaLore's optimizer state, its step's largest temporary) in bytes, from the real selection."""
    from zoft.optim.natural_galore import select_target_parameters

    targets = set(select_target_parameters(shape.model, galore.get("target_modules", "all-linear")))
    rank, s = galore.get("rank", 128), galore.get("history", 20)
    state = temp = 0
    for name, p in shape.model.named_parameters():
        if name in targets and p.dim() == 2:
            m, n = p.shape
            r = min(rank, m, n)
            projected = m * r if m >= n else r * n  # the smaller side is kept (galore-torch's std rule)
            basis = r * n if m >= n else m * r
            state += (basis + 2 * projected + s * projected) * b + (s * s * 4 if s > 0 else 0)
            # the refresh SVD in fp32 (the gradient's copy, U and V^T) and the update mapped back
            temp = max(temp, m * n * 4 + (m + n) * min(m, n) * 4 + m * n * b)
        else:
            state += 2 * p.numel() * b
            temp = max(temp, p.numel() * b)
    return state, temp


def estimate(shape: ModelShape, setting: Setting | None = None, **kwargs) -> Estimate:
    """Peak GPU and CPU memory of one setting (a :class:`Setting`, or its fields as keywords)."""
    s = setting if setting is not None else Setting(**kwargs)
    b = DTYPE_BYTES[s.dtype]
    est = Estimate(s.label(), processes=s.processes)
    zo = s.zeroth_order
    trained_b = 4 if (s.lora or s.method == "qzo") else b  # peft keeps adapters in fp32; QZO's scales are fp32
    trained = shape.lora_params if s.lora else shape.total_params
    if s.method == "qzo":
        trained = sum(-(-n // s.nf4_blocksize) for n in shape.nf4_linear_weights)
    largest = shape.lora_largest if s.lora else shape.largest_tensor
    untied = shape.lora_largest if s.lora else shape.largest_untied
    if s.method == "qzo":  # the scales of the biggest quantized layer
        largest = untied = -(-max(shape.nf4_linear_weights, default=0) // s.nf4_blocksize)

    # -- weights
    if s.method == "qzo":
        quantized = sum(shape.nf4_linear_weights)
        est.gpu["weights (NF4 codes)"] = sum(-(-n // 2) for n in shape.nf4_linear_weights)
        est.gpu["weights (fp32 scales, trained)"] = trained * 4
        est.gpu["weights (not quantized)"] = (shape.total_params - quantized) * b
        est.train["dequantized weight (one layer, fp32)"] = max(shape.nf4_linear_weights, default=0) * 4
    elif s.offload:
        stored_b = DTYPE_BYTES[s.storage_dtype or s.dtype]
        est.gpu["weights (resident: outside blocks + 2 blocks)"] = (
            shape.total_params - shape.block_params + 2 * shape.largest_block_params
        ) * b
        est.cpu["weights (offloaded blocks)"] = shape.block_params * stored_b
        if stored_b != b:  # a block arrives in its storage dtype and is cast on the compute device
            est.gpu["upload staging (one block)"] = shape.largest_block_params * stored_b
    else:
        est.gpu["weights"] = shape.total_params * b
    if s.lora:
        est.gpu["LoRA adapters (fp32)"] = shape.lora_params * 4

    # -- fp32 masters of what a ZO method trains (method.master_weights); none with 16-bit block storage,
    # where the resident fp32 copy is what is updated
    if zo:
        per = s.master_bytes
        if per:
            # MeZOOptimizer.state_dict() clones the masters, and accelerate prepares the optimizer through it
            # (and every checkpoint saves through it): one more copy, before any activation exists
            copy = "fp32 masters' copy (optimizer state_dict: start of training, checkpoints)"
            if s.offload:  # masters are made where the weights are stored: blocks' on the host
                in_blocks = trained if s.lora else shape.block_params
                est.cpu["fp32 masters (blocks)"] = in_blocks * per
                est.cpu[copy] = in_blocks * per
                # on CUDA accelerate moves that state_dict to the device before loading it back
                on_device = trained * per if s.cuda else (trained - in_blocks) * per
                if trained - in_blocks:
                    est.gpu["fp32 masters"] = (trained - in_blocks) * per
                if on_device:
                    est.step[copy] = on_device
            else:
                est.gpu["fp32 masters"] = trained * per
                est.step[copy] = trained * per

    # -- a training step
    eval_positions = s.logits_positions
    if zo:
        k = 2 if s.uses_paired else 1
        pb = 4 if s.method == "qzo" else b  # perturbed copies are made in the trained tensors' dtype

        def temp(n: int) -> int:  # theta + eps z of one tensor (and theta - eps z with the paired forward)
            return k * n * pb if s.z_generator == "philox" else k * n * 4 + (k * n * pb if pb < 4 else 0)

        tied = 0 if (s.lora or s.method == "qzo") else shape.tied_params
        # a tied tensor's copy lives through the whole forward (both its users see one z); others for one module's
        est.train["ZO temporaries (perturbed copies)"] = max(temp(tied), k * tied * pb + temp(untied))
        if s.method == "addax":
            k0, k1, threshold = s.addax
            # In-place SGD during the backward: one parameter's gradient alive at a time. The long (ZO) and
            # short (first-order) batches run one after the other, so the larger activation set is the peak.
            est.train["gradients (one tensor at a time)"] = largest * b
            est.train["activations (max of ZO long / FO short batch)"] = max(
                inference_activation_bytes(shape, k0, s.seq, b, logits_positions=s.logits_positions),
                stored_activation_bytes(shape, s, k1, min(threshold, s.seq)),
            )
        else:
            rows = s.batch * k
            key = "activations (paired: doubled batch)" if k == 2 else "activations (one layer's working set)"
            est.train[key] = inference_activation_bytes(shape, rows, s.seq, b, logits_positions=s.logits_positions)
    else:
        layerwise = bool(s.galore and s.galore.get("layerwise"))
        acts = stored_activation_bytes(shape, s, s.batch, s.seq)
        est.train["activations (kept for backward)"] = acts
        # The backward frees each layer's activations as it makes that layer's gradients: what is outside the
        # blocks (head, final norm, a tied embedding) gets its gradient first, while every activation is
        # still held; after that the larger of the layers' activations and their gradients counts.
        in_blocks = trained if s.lora else shape.block_params
        if layerwise:
            grads = largest * trained_b
            est.train["gradients (one tensor at a time)"] = grads
        else:
            grads = trained * trained_b
            layer_acts = shape.n_blocks * _stored_per_layer(shape, s, s.batch * s.seq, b)
            est.train["gradients (outside the blocks, and beyond the freed activations)"] = (
                (trained - in_blocks) * trained_b + max(0, in_blocks * trained_b - layer_acts)
            )
        if s.method == "natural_galore":
            state, step_temp = _galore_state(shape, s.galore or {}, trained_b)
            est.gpu["optimizer state (Natural GaLore)"] = state
        elif s.method == "adamw" and s.lora_pro == "full":
            state = 2 * shape.lora_base_params * 4 + 4 * shape.lora_params  # fp32 moments of B A (m x n)
            step_temp = 2 * shape.lora_base_largest * 4  # about two m x n temporaries during the step
            est.gpu["optimizer state (LoRA-Pro full: moments of each adapted weight)"] = state
        elif s.method == "adamw":
            # exp_avg and exp_avg_sq in the trained dtype (HF's AdamW keeps no fp32 copy of 16-bit weights),
            # and one fp32 step counter per tensor
            n_tensors = _trained_tensors(shape, s)
            est.gpu["optimizer state (AdamW)"] = 2 * trained * trained_b + 4 * n_tensors
            # foreach AdamW on CUDA makes sqrt(exp_avg_sq) for all tensors at once; on CPU one tensor at a time
            step_temp = trained * trained_b if s.cuda else largest * trained_b
        else:
            step_temp = 0
        # the optimizer step runs after the backward has freed the activations
        est.step = {"gradients (one tensor at a time)" if layerwise else "gradients": grads}
        if step_temp:
            est.step["optimizer step temporaries"] = step_temp
        if s.lora_ga:
            # LoRA-GA's initialization: the summed fp32 gradient of every adapted base weight, before training
            est.train["LoRA-GA init: fp32 gradient sums (once)"] = shape.lora_base_params * 4
    if s.eval_batch:
        est.evaluation[f"evaluation forward (batch {s.eval_batch})"] = inference_activation_bytes(
            shape, s.eval_batch, s.seq, b, logits_positions=eval_positions
        )

    # -- host memory while loading: from_pretrained maps the checkpoint; a dtype change holds a converted copy
    ckpt_b = DTYPE_BYTES[shape.checkpoint_dtype]
    if not s.cuda and ckpt_b == b:
        # Weights zoft converts after loading (16-bit block storage, NF4) leave their pages of the mapped
        # checkpoint resident while the tensors that still use the mapping (embeddings, norms) keep it open:
        # page cache the kernel may reclaim, but counted in the process's RSS. On CUDA the model leaves the
        # host and the mapping is closed.
        converted = 0
        if s.offload and s.storage_dtype and DTYPE_BYTES[s.storage_dtype] != b:
            converted = shape.block_params
        elif s.method == "qzo":
            converted = sum(shape.nf4_linear_weights)
        if converted:
            est.gpu["checkpoint pages of converted weights (mapped, reclaimable)"] = converted * ckpt_b
    est.loading["checkpoint (mapped while loading)"] = shape.total_params * ckpt_b
    if ckpt_b != b:
        est.loading[f"weights converted to {s.dtype}"] = shape.total_params * b
    if not s.cuda and s.processes > 1:
        # a CPU launch: HF Trainer's model.to(<the rank's device>) copies every weight out of the mapped file
        est.loading["weights copied to the rank's device"] = shape.total_params * b
    if s.method == "qzo":
        est.loading["NF4 codes and scales (while quantizing)"] = sum(
            v for k_, v in est.gpu.items() if k_.startswith("weights (NF4") or k_.startswith("weights (fp32")
        )
    if s.offload and s.pin_memory:
        est.loading["pinned copy of one block"] = shape.largest_block_params * DTYPE_BYTES[s.storage_dtype or s.dtype]
    return est


def _trained_tensors(shape: ModelShape, s: Setting) -> int:
    if shape.model is None:
        return 0
    if s.lora:
        return 2 * sum(shape.lora_groups.values()) * shape.n_blocks
    return sum(1 for p in shape.model.parameters())


# ---- the recipe's setting and its alternatives ----------------------------------------------------------------------


def shape_of_recipe(recipe, lora: dict | None = None) -> ModelShape:
    """:func:`model_shape` of the recipe's model (config only, no weights)."""
    from transformers import AutoConfig

    from zoft.models import resolve_model_name

    m = recipe.model
    config = AutoConfig.from_pretrained(
        resolve_model_name(m.name), revision=m.revision, trust_remote_code=m.trust_remote_code
    )
    return model_shape(config, task=m.task, lora=lora, nf4_target_modules=m.quantization_target_modules)


def _logits_positions(recipe) -> int | None:
    """1 when the loss reads one position (classification with one-token verbalizers), else every position."""
    if recipe.data.format != "classification" or recipe.model.task != "causal_lm":
        return None if recipe.model.task == "causal_lm" else 1
    try:
        from zoft.models import load_tokenizer

        m = recipe.model
        tok = load_tokenizer(m.tokenizer or m.name, revision=m.revision, trust_remote_code=m.trust_remote_code)
    except (ZoftError, OSError, ValueError):
        return None  # no tokenizer here: plan the upper bound
    words = (recipe.data.verbalizers or {}).values()
    one_token = all(len(tok(w, add_special_tokens=False)["input_ids"]) == 1 for w in words)
    return 1 if one_token else None


def _recipe_dtype(recipe, shape: ModelShape) -> str:
    return shape.checkpoint_dtype if recipe.model.dtype == "auto" else recipe.model.dtype


def setting_of_recipe(recipe, shape: ModelShape, *, processes: int = 1, cuda: bool = True) -> Setting:
    """The :class:`Setting` a recipe runs with (per process)."""
    from zoft.zo.perturb import resolve_z_generator

    m, method = recipe.model, recipe.method
    extra = recipe.train.model_extra or {}
    batch, seq = recipe.train.per_device_train_batch_size, recipe.data.max_length
    addax = None
    if method.name == "addax":  # 'auto' picks L_T from a budget at run time: plan for the longest
        threshold = seq if method.length_threshold == "auto" else method.length_threshold
        addax = (method.zo_batch_size or batch, method.fo_batch_size or batch, threshold)
    galore = method.natural_galore_kwargs() if method.name == "natural_galore" else None
    wta_ratio, wta_groups = None, ()
    if recipe.memory is not None and recipe.memory.wta_crs is not None:
        w = recipe.memory.wta_crs
        wta_ratio = w.ratio
        wta_groups = _wta_groups(shape, w.target_modules, lora=recipe.peft is not None)
    offload = recipe.offload
    z = resolve_z_generator(method.z_generator, cuda and (offload is None or offload.compute_device != "cpu"))
    return Setting(
        method=method.name,
        lora=recipe.peft is not None and recipe.peft.method == "lora",
        offload=offload is not None,
        batch=batch,
        seq=seq,
        dtype=_recipe_dtype(recipe, shape),
        eval_batch=recipe.train.per_device_eval_batch_size if (recipe.evaluation.before or recipe.evaluation.after) else None,
        logits_positions=_logits_positions(recipe),
        master_weights=method.master_weights,
        paired=recipe.uses_paired_forward,
        z_generator=z,
        storage_dtype=offload.storage_dtype if offload is not None else None,
        pin_memory=offload is not None and (offload.pin_memory if offload.pin_memory is not None else cuda),
        gradient_checkpointing=bool(extra.get("gradient_checkpointing")),
        nf4_blocksize=m.quantization_blocksize,
        addax=addax,
        galore=galore,
        lora_ga=recipe.peft is not None and recipe.peft.init == "lora_ga",
        lora_pro=recipe.peft.lora_pro.mode if (recipe.peft is not None and recipe.peft.optimizer == "lora_pro") else None,
        wta_ratio=wta_ratio,
        wta_groups=wta_groups,
        privacy=recipe.privacy.method if recipe.privacy is not None else None,
        pertp=recipe.distributed is not None and recipe.distributed.perturbation_parallel == 2,
        processes=processes,
        cuda=cuda,
    )


def _wta_groups(shape: ModelShape, targets, *, lora: bool) -> tuple[str, ...]:
    """Input groups whose every reader that keeps the input is a WTA-CRS layer (only then is memory freed).

    Readers are the block's linear layers whose weights are trained, or with LoRA the adapted ones (their
    ``lora_A`` keeps the input).
    """
    from zoft.zo.offload import find_transformer_blocks

    _, blocks = find_transformer_blocks(shape.model)
    linears = [n for n, mod in blocks[0].named_modules() if isinstance(mod, nn.Linear)]
    if isinstance(targets, str):
        chosen = {n for n in linears if re.fullmatch(targets, n)}
    else:
        chosen = {n for n in linears if any(n == t or n.endswith("." + t) for t in targets)}
    groups = []
    for group in _GROUPS:
        readers = [n for n in linears if _group_of(n) == group and (not lora or n in shape.lora_adapted)]
        if readers and all(n in chosen for n in readers):
            groups.append(group)
    return tuple(groups)


@dataclass
class Plan:
    """A recipe's setting, the settings one change away, and the shape they were planned for."""

    chosen: Estimate
    alternatives: list[Estimate]
    shape: ModelShape
    setting: Setting


def _variants(s: Setting, shape: ModelShape) -> list[tuple[Setting, str]]:
    """Settings one recipe change away from ``s`` (each with the change, as recipe keys), the changes that keep
    the method's arithmetic first (offload, checkpointing), then those that change what is stored or trained."""
    out: list[tuple[Setting, str]] = []
    zo_ok = s.privacy is None and not s.lora_ga and s.lora_pro is None and s.wta_ratio is None
    if s.zeroth_order:
        if not s.offload and s.method == "mezo":
            out.append((replace(s, offload=True, paired=None), "offload: cpu"))
        if s.offload and s.dtype == "float32" and not s.storage_dtype:
            out.append((replace(s, storage_dtype="bfloat16"), "offload: {storage_dtype: bfloat16}"))
        if s.master_bytes:
            out.append((replace(s, master_weights="none"), "method.master_weights: none"))
    else:
        if not s.gradient_checkpointing:
            out.append((replace(s, gradient_checkpointing=True), "train.gradient_checkpointing: true"))
        if s.method == "natural_galore" and not (s.galore or {}).get("layerwise"):
            out.append((replace(s, galore={**(s.galore or {}), "layerwise": True}), "method.layerwise: true"))
    if s.dtype == "float32" and s.method != "qzo" and not (s.offload and s.storage_dtype):
        out.append((replace(s, dtype="bfloat16"), "model.dtype: bfloat16"))
    if not s.lora and s.method in ("mezo", "adamw", "sgd"):
        out.append((replace(s, lora=True), "peft: {method: lora}"))
    if not s.zeroth_order:
        if s.method == "adamw" and not s.lora:
            out.append((replace(s, method="natural_galore", galore={"rank": 128, "history": 20}),
                        "method.name: natural_galore"))
        if zo_ok:
            mezo = replace(s, method="mezo", galore=None, gradient_checkpointing=False, addax=None)
            out.append((mezo, "method.name: mezo"))
            if not s.lora:
                out.append((replace(mezo, offload=True, paired=None), "method.name: mezo, offload: cpu"))
    if s.method == "mezo" and not s.offload and shape.nf4_linear_weights and zo_ok and not s.lora:
        out.append((replace(s, method="qzo"), "method.name: qzo, model.quantization: nf4"))
    return out


def plan_of_recipe(recipe, *, processes: int | None = None, cuda: bool | None = None) -> Plan:
    """Plan a validated recipe (``zoft.config.Recipe``) for one process of a launch of ``processes`` per machine.

    Args:
        recipe: the recipe.
        processes: processes per machine (default: the launcher's ``LOCAL_WORLD_SIZE``, else 1).
        cuda: plan for a CUDA GPU (default: whether this machine has one).
    """
    from zoft import launch

    processes = processes or launch.local_world_size()
    cuda = torch.cuda.is_available() if cuda is None else cuda
    lora_cfg = {"r": 8}
    if recipe.peft is not None and recipe.peft.method == "lora":
        lora_cfg = {"r": recipe.peft.r, "target_modules": recipe.peft.target_modules}
    shape = shape_of_recipe(recipe, lora=lora_cfg)
    setting = setting_of_recipe(recipe, shape, processes=processes, cuda=cuda)
    chosen = estimate(shape, setting)
    if setting.method == "qzo" and recipe.model.quantization is None:  # an NF4 folder loads as stored
        chosen.loading = {"checkpoint (NF4, mapped while loading)": sum(
            v for k, v in chosen.gpu.items() if k.startswith("weights"))}
    alternatives = []
    for variant, change in _variants(setting, shape):
        est = estimate(shape, variant)
        est.change = change
        alternatives.append(est)
    return Plan(chosen, alternatives, shape, setting)


def host_bytes_per_process(recipe) -> int:
    """Host memory one process of the recipe needs at its peak (loading or training), as ``zoft plan`` plans it.

    Used by ``zoft train``'s offload pre-flight check, so the check and the plan agree.
    """
    plan = plan_of_recipe(recipe, processes=1)
    est = plan.chosen
    return est.host_peak if plan.setting.cuda else est.peak_on_cpu_device()


# ---- what the machine has -------------------------------------------------------------------------------------------


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
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


# ---- the text ----------------------------------------------------------------------------------------------------------


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def render(plan: Plan, *, device: str, gpu_free: int, cpu_free: int, cuda: bool) -> str:
    """The plan as text: the chosen setting's breakdown, a comparison table, a verdict and the change to make."""
    chosen = plan.chosen
    n = chosen.processes
    per = f" (per process; {n} processes on this machine)" if n > 1 else ""
    lines = [f"zoft plan: {chosen.label}{per}", "", "| memory | GPU GiB | CPU GiB |", "|---|---:|---:|"]
    for key, value in chosen.gpu.items():
        lines.append(f"| {key} | {_gib(value)} | {_gib(chosen.cpu[key]) if key in chosen.cpu else '-'} |")
    for part, where in ((chosen.train, "training step"), (chosen.step, "optimizer step"),
                        (chosen.evaluation, "evaluation")):
        for key, value in part.items():
            if where == "optimizer step" and key in chosen.train:
                continue  # layer-wise: the same one-tensor gradient, listed once
            lines.append(f"| {key} [{where}] | {_gib(value)} | - |")
    for key, value in chosen.cpu.items():
        if key not in chosen.gpu:
            lines.append(f"| {key} | - | {_gib(value)} |")
    for key, value in chosen.loading.items():
        lines.append(f"| {key} [loading] | - | {_gib(value)} |")
    if cuda:
        lines.append(f"| **peak** | **{_gib(chosen.gpu_total)}** | **{_gib(chosen.host_peak)}** |")
    else:
        lines.append(f"| **peak (one memory: the CPU's)** | - | **{_gib(chosen.peak_on_cpu_device())}** |")
    lines += ["", "| setting | change to the recipe | GPU GiB | CPU GiB | fits |", "|---|---|---:|---:|---|"]
    for est in [chosen] + plan.alternatives:
        ok = "yes" if est.fits(gpu_free, cpu_free, cuda=cuda) else "no"
        gpu = _gib(est.gpu_total) if cuda else "-"
        cpu = _gib(est.host_peak if cuda else est.peak_on_cpu_device())
        lines.append(f"| {est.label} | {est.change or '(the recipe)'} | {gpu} | {cpu} | {ok} |")
    lines.append("")
    if cuda:
        lines.append(f"device: {device}, {_gib(gpu_free)} GiB GPU memory; CPU: {_gib(cpu_free)} GiB")
    else:
        lines.append(f"device: {device}; the run computes in CPU memory: {_gib(cpu_free)} GiB")
    lines.append("(plus the Python/torch runtime, about 0.6 GiB of host memory per process, and on CUDA its context)")
    if chosen.fits(gpu_free, cpu_free, cuda=cuda):
        lines.append(f"verdict: {chosen.label} fits")
        return "\n".join(lines)
    if cuda and chosen.gpu_total > gpu_free:
        need = f"{_gib(chosen.gpu_total)} GiB of GPU memory, {_gib(gpu_free)} GiB available"
    elif cuda:
        need = f"{_gib(chosen.host_peak * n)} GiB of CPU memory, {_gib(cpu_free)} GiB available"
    else:
        need = f"{_gib(chosen.peak_on_cpu_device() * n)} GiB, {_gib(cpu_free)} GiB available"
    lines.append(f"verdict: {chosen.label} does not fit (needs about {need})")
    better = [e for e in plan.alternatives if e.fits(gpu_free, cpu_free, cuda=cuda)]
    if better:
        lines.append("these fit: " + "; ".join(f"{e.label}: set `{e.change}`" for e in better))
        lines.append(f"recommendation: {better[0].label} fits: set `{better[0].change}` in the recipe")
    else:
        largest = _largest_fitting_batch(plan, gpu_free, cpu_free, cuda)
        if largest:
            lines.append(
                f"recommendation: none of these settings fits; train.per_device_train_batch_size: {largest} does "
                "(or lower data.max_length)"
            )
        else:
            lines.append("recommendation: none of these settings fits, at any batch size; use a smaller model or a "
                         "machine with more memory")
    return "\n".join(lines)


def _largest_fitting_batch(plan: Plan, gpu_free: int, cpu_free: int, cuda: bool) -> int | None:
    s = plan.setting
    for batch in range(s.batch - 1, 0, -1):
        if estimate(plan.shape, replace(s, batch=batch)).fits(gpu_free, cpu_free, cuda=cuda):
            return batch
    return None


def plan_recipe(
    recipe, *, gpu_memory: int | None = None, cpu_memory: int | None = None, processes: int | None = None
) -> str:
    """The ``zoft plan`` text for a validated recipe (``zoft.config.Recipe``).

    Args:
        recipe: the recipe.
        gpu_memory: plan for a GPU with this many bytes (default: this machine's free GPU memory; without a
            GPU, the run computes in CPU memory).
        cpu_memory: plan for this many bytes of host memory (default: this machine's available memory).
        processes: processes per machine (the launch size; default: the launcher's, else 1).
    """
    device, measured_gpu, measured_cpu = available_memory()
    cuda = torch.cuda.is_available() or gpu_memory is not None
    if gpu_memory is not None:
        device = "a GPU (--gpu-memory)"
    plan = plan_of_recipe(recipe, processes=processes, cuda=cuda)
    gpu_free = measured_gpu if gpu_memory is None else gpu_memory
    cpu_free = measured_cpu if cpu_memory is None else cpu_memory
    return render(plan, device=device, gpu_free=gpu_free, cpu_free=cpu_free, cuda=cuda)
