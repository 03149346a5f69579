"""NF4 4-bit linear layers whose per-block scales are the only trainable parameters (QZO's model side).

QZO ("Fine-tuning Quantized Neural Networks with Zeroth-order Optimization", 2025,
https://arxiv.org/abs/2505.13430) fine-tunes a 4-bit model by perturbing and updating only the continuous
quantization scales; the 4-bit integer codes never change. This module holds the model side: a plain-torch
``NF4Linear`` in bitsandbytes' NF4 storage format (packed codes + per-block fp32 ``absmax``), conversion
from ``nn.Linear`` and from bitsandbytes ``Linear4bit``, and save/load as an ordinary bitsandbytes 4-bit
Hugging Face checkpoint. It saves weight memory: 4 bits per weight plus one fp32 scale per 64 weights
(4.5 bits) instead of 16 or 32, and ZO needs no gradient, optimizer state or activation memory on top.

Storage format (identical to bitsandbytes ``Params4bit`` with ``quant_type="nf4"``, ``quant_storage=uint8``):
the weight (out, in) is flattened row-major, cut into blocks of ``blocksize`` values, each block scaled by
its absolute maximum ``absmax`` into [-1, 1] and rounded to the nearest of the 16 NF4 levels; two 4-bit
codes are packed per byte, the first value of each pair in the high nibble; the packed tensor has shape
(ceil(numel / 2), 1). bitsandbytes' double quantization (``compress_statistics=True``,
``bnb_4bit_use_double_quant``) stores ``absmax`` itself as 8-bit codes; since QZO trains the scales, they
are dequantized to fp32 once at conversion (+0.5 bit per weight) and saved as plain fp32 ``absmax``.

Loading a checkpoint back (no zoft needed for inference)::

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder)  # bitsandbytes Linear4bit layers, tuned scales
    # or, to keep training the scales with zoft:
    model = zoft.zo.quant4bit.load_quantized(folder)
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from zoft.errors import ZoftError

# The 16 NF4 levels (normal-float quantiles, QLoRA, arXiv 2305.14314, appendix E), as fp32 like bitsandbytes.
NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
DEFAULT_BLOCKSIZE = 64
DEFAULT_MIN_SCALE = 1e-6  # constrain_() floor: a scale <= 0 would flip or zero a whole block
_VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"


def nf4_table(device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 NF4 levels as an fp32 tensor (index = 4-bit code)."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def _check_blocksize(blocksize: int) -> None:
    if blocksize not in _VALID_BLOCKSIZES:
        raise ZoftError(f"NF4 blocksize {blocksize} is not supported; use one of {list(_VALID_BLOCKSIZES)}")


def nf4_quantize_torch(
    weight: torch.Tensor, blocksize: int = DEFAULT_BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a tensor to NF4 in plain torch, bit-identical to bitsandbytes' ``quantize_4bit``.

    Args:
        weight: any floating tensor; flattened row-major.
        blocksize: values per scale block (default 64).

    Returns:
        ``(codes, absmax)``: packed uint8 codes of shape (ceil(numel / 2), 1) and fp32 per-block absmax.
    """
    _check_blocksize(blocksize)
    flat = weight.detach().reshape(-1).float()
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    # Zero padding changes neither a block's absmax nor the codes of the real values.
    blocks = F.pad(flat, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    # Multiply by the reciprocal (not divide) and bucket at the level midpoints, ties going to the
    # lower level: this is what bitsandbytes does, so the codes agree bit for bit.
    inv = 1.0 / absmax.clamp(min=1e-38)
    scaled = (blocks * inv[:, None]).clamp(-1.0, 1.0).reshape(-1)[: n + (n % 2)]
    levels = nf4_table(flat.device)
    midpoints = (levels[:-1] + levels[1:]) / 2
    idx = torch.bucketize(scaled, midpoints).to(torch.uint8)
    codes = ((idx[0::2] << 4) | idx[1::2]).unsqueeze(1)
    return codes, absmax


def nf4_quantize(
    weight: torch.Tensor, blocksize: int = DEFAULT_BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize with bitsandbytes' own ``quantize_4bit`` when it is installed, else in plain torch.

    The two give the same codes and absmax (tested); the plain-torch path serves machines without
    bitsandbytes (e.g. a CUDA image that lacks it).

    Args:
        weight: floating tensor to quantize.
        blocksize: values per scale block.

    Returns:
        ``(codes, absmax)`` as in :func:`nf4_quantize_torch`.
    """
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        return nf4_quantize_torch(weight, blocksize)
    _check_blocksize(blocksize)
    codes, state = bnbf.quantize_4bit(
        weight.detach().float().contiguous(), blocksize=blocksize, quant_type="nf4", compress_statistics=False
    )
    return codes.reshape(-1, 1), state.absmax.float()


def nf4_dequantize(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    shape: Sequence[int],
    blocksize: int = DEFAULT_BLOCKSIZE,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Rebuild the weight: NF4 level of each code times its block's absmax, in fp32, then cast.

    Gradients flow to ``absmax`` (the codes are integers), so this is also the reference the tests use.

    Args:
        codes: packed uint8 codes (any shape; read flat).
        absmax: per-block scales, one per ``blocksize`` values.
        shape: shape of the weight to return.
        blocksize: values per block.
        dtype: dtype of the returned weight.

    Returns:
        A tensor of ``shape`` and ``dtype``.
    """
    n = 1
    for s in shape:
        n *= int(s)
    packed = codes.reshape(-1)
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    # One gather through a 256-entry (byte -> two levels) table instead of unpacking nibbles.
    levels = nf4_table(absmax.device)
    pair_table = torch.stack([levels.repeat_interleave(16), levels.repeat(16)], dim=1)
    values = pair_table.index_select(0, packed.to(torch.int32)).reshape(-1)
    n_blocks = absmax.numel()
    values = F.pad(values, (0, n_blocks * blocksize - values.numel()))[: n_blocks * blocksize]
    weight = (values.view(n_blocks, blocksize) * absmax.float().view(-1, 1)).reshape(-1)[:n]
    return weight.reshape(tuple(shape)).to(dtype)


def _pack_quant_state(blocksize: int, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    # bitsandbytes keeps the non-tensor part of a QuantState as JSON bytes in a uint8 tensor.
    meta = {
        "quant_type": "nf4",
        "blocksize": int(blocksize),
        "dtype": str(dtype).removeprefix("torch."),
        "shape": [int(s) for s in shape],
    }
    return torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)


def _dequantize_nested_absmax(
    absmax_codes: torch.Tensor,
    nested_absmax: torch.Tensor,
    nested_quant_map: torch.Tensor,
    nested_blocksize: int,
    offset: float,
) -> torch.Tensor:
    """Undo bitsandbytes' double quantization of absmax: 8-bit code value * block scale + offset, in fp32."""
    values = nested_quant_map.float()[absmax_codes.reshape(-1).long()]
    n = values.numel()
    n_blocks = nested_absmax.numel()
    padded = F.pad(values, (0, n_blocks * nested_blocksize - n))
    scaled = (padded.view(n_blocks, nested_blocksize) * nested_absmax.float().view(-1, 1)).reshape(-1)[:n]
    return scaled + torch.tensor(float(offset), dtype=torch.float32, device=scaled.device)


class NF4Linear(nn.Module):
    """A linear layer stored in bitsandbytes NF4 format whose per-block ``absmax`` is the trainable parameter.

    ``codes`` (packed uint8) and ``bias`` are buffers: nothing but ``absmax`` can be trained or perturbed.
    ``absmax`` stays fp32 even under ``model.to(torch.bfloat16)`` (it is the master copy that ZO updates
    touch; an update of ~1e-6 would vanish in bf16). The forward dequantizes the weight in fp32 and runs the
    matmul in the input's dtype; it reads ``self.absmax`` at call time, so a pre-hook may swap in a
    perturbed tensor. Its ``state_dict`` uses bitsandbytes' ``Linear4bit`` keys (``weight``,
    ``weight.absmax``, ``weight.quant_map``, ``weight.quant_state.bitsandbytes__nf4``, ``bias``), so
    ``save_pretrained`` writes a checkpoint that transformers + bitsandbytes load.

    Args:
        in_features: input size.
        out_features: output size.
        codes: packed uint8 codes, (ceil(out * in / 2), 1).
        absmax: fp32 per-block scales, ceil(out * in / blocksize) of them.
        bias: optional bias (kept in its own dtype, cast to the input's dtype in the forward).
        blocksize: values per scale block.
        weight_dtype: dtype of the weight before quantization (recorded in the checkpoint's quant state).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        codes: torch.Tensor,
        absmax: torch.Tensor,
        bias: torch.Tensor | None = None,
        blocksize: int = DEFAULT_BLOCKSIZE,
        weight_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        _check_blocksize(blocksize)
        n = in_features * out_features
        if codes.dtype != torch.uint8:
            codes = codes.view(torch.uint8)
        if codes.numel() != -(-n // 2):
            raise ZoftError(
                f"NF4 codes hold {codes.numel()} bytes but a {out_features}x{in_features} weight "
                f"needs {-(-n // 2)}"
            )
        if absmax.numel() != -(-n // blocksize):
            raise ZoftError(
                f"NF4 absmax has {absmax.numel()} scales but a {out_features}x{in_features} weight with "
                f"blocksize {blocksize} needs {-(-n // blocksize)}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.blocksize = blocksize
        self.weight_dtype = weight_dtype
        self.register_buffer("codes", codes.reshape(-1, 1))
        self.absmax = nn.Parameter(absmax.detach().reshape(-1).float(), requires_grad=True)
        self.register_buffer("bias", None if bias is None else bias.detach())

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = DEFAULT_BLOCKSIZE) -> NF4Linear:
        """Quantize an ``nn.Linear`` (bitsandbytes' quantizer if installed, else the identical torch one)."""
        codes, absmax = nf4_quantize(linear.weight, blocksize)
        return cls(
            linear.in_features,
            linear.out_features,
            codes,
            absmax,
            linear.bias,
            blocksize,
            linear.weight.dtype,
        )

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight the forward uses, rebuilt from codes and the current ``absmax``."""
        return nf4_dequantize(
            self.codes, self.absmax, (self.out_features, self.in_features), self.blocksize, dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantized_weight(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    @torch.no_grad()
    def constrain_(self, min_scale: float = DEFAULT_MIN_SCALE) -> None:
        """Clamp every scale to at least ``min_scale`` (call after each update).

        A negative scale would flip the sign of a whole block and zero would erase it; the codes cannot
        change, so positivity is the one constraint that keeps the layer a valid NF4 layer.
        """
        self.absmax.clamp_(min=min_scale)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) would cast the fp32 scales; keep the fp32 master and only follow the device.
        master = self.absmax.data
        out = super()._apply(fn, recurse)
        if self.absmax.dtype != torch.float32:
            self.absmax.data = master.to(device=self.absmax.device, dtype=torch.float32)
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        absmax = self.absmax if keep_vars else self.absmax.detach()
        destination[prefix + "weight"] = self.codes
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias
        destination[prefix + "weight.absmax"] = absmax
        destination[prefix + "weight.quant_map"] = nf4_table(self.codes.device)
        destination[prefix + "weight." + _QUANT_STATE_KEY] = _pack_quant_state(
            self.blocksize, self.weight_dtype, (self.out_features, self.in_features)
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        """Read bitsandbytes' Linear4bit keys (with or without double quantization) into codes and absmax."""
        known = (
            "weight",
            "bias",
            "weight.absmax",
            "weight.quant_map",
            "weight." + _QUANT_STATE_KEY,
            "weight.nested_absmax",
            "weight.nested_quant_map",
        )
        own = {
            k[len(prefix) :]: v
            for k, v in state_dict.items()
            if k.startswith(prefix) and k[len(prefix) :] in known
        }
        expected = ["weight", "weight.absmax", "weight." + _QUANT_STATE_KEY] + (
            ["bias"] if self.bias is not None else []
        )
        missing = [k for k in expected if k not in own]
        if missing:
            missing_keys.extend(prefix + k for k in missing)
            return
        meta = json.loads(bytes(own["weight." + _QUANT_STATE_KEY].tolist()).decode("utf-8"))
        shape = tuple(meta.get("shape") or ())
        if (
            meta.get("quant_type") != "nf4"
            or shape != (self.out_features, self.in_features)
            or (int(meta["blocksize"]) != self.blocksize)
        ):
            error_msgs.append(
                f"{prefix}weight: checkpoint holds {meta.get('quant_type')} {shape} "
                f"blocksize {meta.get('blocksize')},"
                f" layer is nf4 {(self.out_features, self.in_features)} blocksize {self.blocksize}"
            )
            return
        absmax = own["weight.absmax"]
        if "weight.nested_absmax" in own:
            absmax = _dequantize_nested_absmax(
                absmax,
                own["weight.nested_absmax"],
                own["weight.nested_quant_map"],
                int(meta["nested_blocksize"]),
                float(meta["nested_offset"]),
            )
        codes = own["weight"]
        with torch.no_grad():
            self.codes = (
                (codes if codes.dtype == torch.uint8 else codes.view(torch.uint8))
                .reshape(-1, 1)
                .to(self.codes.device)
            )
            self.absmax.copy_(absmax.reshape(-1).float())
            if self.bias is not None:
                self.bias = own["bias"].to(device=self.bias.device, dtype=self.bias.dtype)
        self.weight_dtype = getattr(torch, meta.get("dtype", "float32"))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, "
            f"nf4 blocksize={self.blocksize}"
        )


def from_bnb_linear4bit(layer: nn.Module) -> NF4Linear:
    """Convert a bitsandbytes NF4 ``Linear4bit`` into an :class:`NF4Linear` with the same codes and scales.

    Double-quantized absmax (``bnb_4bit_use_double_quant=True``) is dequantized to fp32 once here; the codes
    tensor is reused, not copied. Convert right after loading: once bitsandbytes has run an eval forward
    (``no_grad``) on an AVX512-BF16 CPU, it has rounded the layer's scales to bf16 in place, and those
    rounded scales are what is converted.

    Args:
        layer: a ``bitsandbytes.nn.Linear4bit`` whose weight is quantized (``quant_type="nf4"``).

    Returns:
        An equivalent ``NF4Linear`` on the same device.

    Raises:
        ZoftError: if the layer is not quantized or is FP4.
    """
    weight = layer.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        raise ZoftError(
            "this Linear4bit layer is not quantized yet (bitsandbytes quantizes on .to(device)); "
            "load the model with a BitsAndBytesConfig or move it to a device first"
        )
    if state.quant_type != "nf4":
        raise ZoftError(
            f"QZO supports NF4 layers only, this layer is {state.quant_type}; load it with "
            "bnb_4bit_quant_type='nf4'"
        )
    data, weight_dtype = weight.data, state.dtype
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes' first eval forward on an AVX512-BF16 CPU repacks the codes for its kernel and
        # rounds absmax to bf16, stored transposed (in/blocksize, out). The codes come back exactly; the
        # scales are the bf16-rounded ones bitsandbytes itself now computes with.
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        absmax = state.absmax.T.reshape(-1).float()
        data, _ = _convert_weight_packed_for_cpu_inverse(data, copy.copy(state))
        weight_dtype = getattr(state, "original_dtype", weight_dtype)
    elif state.nested:
        absmax = _dequantize_nested_absmax(
            state.absmax, state.state2.absmax, state.state2.code, state.state2.blocksize, float(state.offset)
        )
    else:
        absmax = state.absmax
    out_features, in_features = (int(s) for s in state.shape)
    bias = None if layer.bias is None else layer.bias.data
    return NF4Linear(in_features, out_features, data, absmax.float(), bias, state.blocksize, weight_dtype)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _detach_hf_quantizer(model: nn.Module, skipped: list[str]) -> None:
    """Make the converted model a plain trainable module that saves as a bitsandbytes NF4 checkpoint.

    After conversion no bitsandbytes module is left, so the model's ``hf_quantizer`` (if any) is stale; it is
    cleared on this instance only, with the ``quantization_method`` / ``is_quantized`` marks (HF Trainer
    refuses models that carry them without adapters, ``.to(dtype)`` refuses bitsandbytes models). The bnb
    ``quantization_config`` on the config makes ``save_pretrained`` folders loadable by plain transformers.
    """
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    # Instance attributes transformers' quantizer sets at load; they would make `.to(dtype)` refuse.
    model.__dict__.pop("quantization_method", None)
    if "is_quantized" in model.__dict__:
        model.is_quantized = False
    config = getattr(model, "config", None)
    if config is None:
        return
    scales = {id(m.absmax) for m in nf4_layers(model)}
    compute = next((p.dtype for p in model.parameters() if id(p) not in scales), torch.float32)
    config.quantization_config = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4",
        # The tuned scales are fp32 and stored as such: double quantization would round them.
        "bnb_4bit_use_double_quant": False,
        "bnb_4bit_compute_dtype": str(compute).removeprefix("torch."),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": sorted(set(skipped)) or None,
    }


def quantized_linear_names(
    model: nn.Module,
    target_modules: str | Sequence[str] = "all-linear",
    skip: Sequence[str] = ("lm_head",),
) -> tuple[list[str], list[str]]:
    """Which ``nn.Linear`` layers :func:`quantize_model_nf4` replaces: ``(quantized, left as they are)``.

    Linear layers whose weight is shared with another module (e.g. an ``lm_head`` tied to the embeddings)
    are left as they are: quantizing them would untie the pair. Also used by ``zoft plan`` on a
    meta-device model.
    """
    if isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [target_modules]
    shared: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        shared[id(p)] = shared.get(id(p), 0) + 1
    quantized, left = [], []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        wanted = target_modules == "all-linear" or _matches(name, target_modules)
        if not wanted or _matches(name, skip) or shared.get(id(module.weight), 0) > 1:
            left.append(name)
        else:
            quantized.append(name)
    return quantized, left


def quantize_model_nf4(
    model: nn.Module,
    target_modules: str | Sequence[str] = "all-linear",
    blocksize: int = DEFAULT_BLOCKSIZE,
    skip: Sequence[str] = ("lm_head",),
) -> list[str]:
    """Replace ``nn.Linear`` layers of a model by :class:`NF4Linear`, in place.

    Args:
        model: the model (fp32 or bf16); a Hugging Face model also gets a bitsandbytes
            ``config.quantization_config`` so ``save_pretrained`` writes a loadable 4-bit checkpoint.
        target_modules: ``"all-linear"`` or module-name suffixes (``["q_proj", "v_proj"]``).
        blocksize: values per scale block (bitsandbytes' default 64).
        skip: module-name suffixes never to quantize (see :func:`quantized_linear_names`).

    Returns:
        The names of the replaced modules.

    Raises:
        ZoftError: if nothing matched ``target_modules``.
    """
    _check_blocksize(blocksize)
    replaced, unconverted = quantized_linear_names(model, target_modules, skip)
    if not replaced:
        raise ZoftError(
            f"no nn.Linear layer matched target_modules={target_modules!r} (skip={list(skip)}); "
            "use 'all-linear' or suffixes of the model's linear layer names"
        )
    modules = dict(model.named_modules())
    for name in replaced:
        _replace(model, name, NF4Linear.from_linear(modules[name], blocksize))
    _detach_hf_quantizer(model, unconverted)
    return replaced


def convert_bnb_model(model: nn.Module) -> list[str]:
    """Replace every bitsandbytes NF4 ``Linear4bit`` of a model by :class:`NF4Linear`, in place.

    Use it on a model loaded with ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")``; the
    model's ``hf_quantizer`` is cleared on the instance so HF Trainer accepts it.

    Returns:
        The names of the replaced modules.

    Raises:
        ZoftError: if the model holds no ``Linear4bit`` layer.
    """
    import bitsandbytes as bnb

    replaced, unconverted = [], []
    for name, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            _replace(model, name, from_bnb_linear4bit(module))
            replaced.append(name)
        elif type(module) is nn.Linear:
            unconverted.append(name)
    if not replaced:
        raise ZoftError(
            "the model has no bitsandbytes Linear4bit layer; load it with "
            "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4') or use quantize_model_nf4"
        )
    _detach_hf_quantizer(model, unconverted)
    return replaced


def nf4_layers(model: nn.Module) -> list[NF4Linear]:
    """All :class:`NF4Linear` layers of a model, in module order."""
    return [m for m in model.modules() if isinstance(m, NF4Linear)]


def mark_only_scales_trainable(model: nn.Module) -> list[str]:
    """Freeze every parameter except the NF4 scales (``*.absmax``); returns the trainable names.

    Raises:
        ZoftError: if the model has no NF4 layer (QZO on a model that is not quantized).
    """
    scales = {id(m.absmax) for m in nf4_layers(model)}
    if not scales:
        raise ZoftError(
            "QZO trains quantization scales but the model has no NF4 layer; "
            "set model.quantization: nf4 or load a bitsandbytes NF4 checkpoint"
        )
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(id(p) in scales)
        if id(p) in scales:
            names.append(name)
    return names


def constrain_scales_(model: nn.Module, min_scale: float = DEFAULT_MIN_SCALE) -> None:
    """Call ``constrain_`` on every :class:`NF4Linear` of a model."""
    for layer in nf4_layers(model):
        layer.constrain_(min_scale)


def quantized_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes held by the model's weights, each shared tensor counted once.

    Returns:
        ``{"codes": ..., "scales": ..., "other": ..., "total": ...}``: packed NF4 codes, NF4 absmax, and
        every other parameter and persistent buffer (embeddings, norms, biases, unquantized layers).
    """
    seen: set[int] = set()
    counts = {"codes": 0, "scales": 0, "other": 0}

    def add(kind: str, t: torch.Tensor | None) -> None:
        if t is None or t.device.type == "meta":
            return
        key = t.untyped_storage().data_ptr() if t.numel() else id(t)
        if key in seen:
            return
        seen.add(key)
        counts[kind] += t.numel() * t.element_size()

    for layer in nf4_layers(model):
        add("codes", layer.codes)
        add("scales", layer.absmax)
    for p in model.parameters():
        add("other", p)
    for module in model.modules():
        for bname, b in module.named_buffers(recurse=False):
            if bname not in module._non_persistent_buffers_set:
                add("other", b)
    counts["total"] = sum(counts.values())
    return counts


def save_quantized(model: nn.Module, folder: str | Path, tokenizer=None) -> None:
    """Write the model as a bitsandbytes NF4 Hugging Face checkpoint with the tuned fp32 scales.

    The folder loads with plain ``transformers`` + ``bitsandbytes`` (``AutoModelForCausalLM.from_pretrained(
    folder)``, also on CPU), or with :func:`load_quantized` to keep training the scales.

    Args:
        model: a Hugging Face model whose layers were converted by :func:`quantize_model_nf4` or
            :func:`convert_bnb_model`.
        folder: output folder (created).
        tokenizer: optional tokenizer saved alongside.

    Raises:
        ZoftError: if the model has no NF4 layer or is not a Hugging Face ``PreTrainedModel``.
    """
    if not nf4_layers(model):
        raise ZoftError("save_quantized needs a model with NF4 layers; call quantize_model_nf4 first")
    if not hasattr(model, "save_pretrained") or getattr(model, "config", None) is None:
        raise ZoftError(
            "save_quantized needs a Hugging Face PreTrainedModel (with save_pretrained and a config)"
        )
    if not isinstance(getattr(model.config, "quantization_config", None), dict):
        skipped = [n for n, m in model.named_modules() if type(m) is nn.Linear]
        _detach_hf_quantizer(model, skipped)
    model.save_pretrained(str(folder), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def load_quantized(
    folder: str | Path, dtype: torch.dtype | None = None, auto_class=None, **kwargs
) -> nn.Module:
    """Load a bitsandbytes NF4 checkpoint (e.g. from :func:`save_quantized`) with NF4Linear layers.

    Needs ``bitsandbytes`` (it runs on CPU): transformers loads the 4-bit layers, which are then converted
    without copying the codes.

    Args:
        folder: a Hugging Face folder whose config.json has a bitsandbytes NF4 ``quantization_config``.
        dtype: dtype of the parts kept in full precision (embeddings, norms, unquantized layers) and of the
            compute; the scales stay fp32. Default: as stored.
        auto_class: the transformers auto class (default ``AutoModelForCausalLM``).
        **kwargs: passed to ``from_pretrained``.

    Returns:
        The model, in eval mode as ``from_pretrained`` leaves it, with only structure converted (call
        :func:`mark_only_scales_trainable` before QZO).

    Raises:
        ZoftError: if the folder is not an NF4 checkpoint.
    """
    from transformers import AutoConfig

    if auto_class is None:
        from transformers import AutoModelForCausalLM as auto_class
    config = AutoConfig.from_pretrained(str(folder))
    qc = getattr(config, "quantization_config", None)
    qc = qc if isinstance(qc, dict) or qc is None else qc.to_dict()
    if (
        not qc
        or qc.get("quant_method") != "bitsandbytes"
        or qc.get("bnb_4bit_quant_type") != "nf4"
        or not (qc.get("load_in_4bit") or qc.get("_load_in_4bit"))
    ):
        raise ZoftError(
            f"{folder} is not a bitsandbytes NF4 checkpoint (config.json quantization_config is "
            f"{qc!r}); quantize a full-precision model with quantize_model_nf4 instead"
        )
    model = auto_class.from_pretrained(str(folder), **kwargs)
    convert_bnb_model(model)
    if dtype is not None:
        # After conversion: transformers' bitsandbytes loader keeps the stored dtype for the other weights.
        model.to(dtype)
        model.config.quantization_config["bnb_4bit_compute_dtype"] = str(dtype).removeprefix("torch.")
    return model
