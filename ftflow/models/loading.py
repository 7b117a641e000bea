"""One loading path for every model: a hub id or a local checkpoint directory.

The offline zoo writes ordinary Hugging Face checkpoints, so a zoo model and
``ibm-granite/granite-3.3-8b-base`` go through exactly the same calls here.
Access tokens for private models are read by ``huggingface_hub`` from the
environment (``HF_TOKEN``); ftflow never logs or stores them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

from ftflow.config import PEFT_METHODS
from ftflow.device import free_memory

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ModelLoadError(RuntimeError):
    """A model that could not be loaded; the message says which and why."""


def resolve_device(device: str) -> str:
    """``auto`` becomes ``cuda`` when a GPU is visible, else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device: cuda was asked for but no CUDA GPU is visible; use device: auto or cpu")
    return device


def device_map_target(device: str):
    """Where ``device_map={"": ...}`` puts a model: CUDA as the current GPU's index (the Trainer then sees the model
    on its own device, ``cuda:N``, not a model-parallel one), any other device by name."""
    if device == "cuda":
        return torch.cuda.current_device()
    return device


# 4-bit settings of precision nf4 unless a QLoRA run configures its own (see ftflow.config.QLoraConfig).
DEFAULT_4BIT = {"quant_type": "nf4", "double_quant": True, "compute_dtype": "bf16"}


def quantization_config(precision: str, options: Optional[dict] = None):
    """The bitsandbytes config for ``nf4`` (``options``: quant_type, double_quant, compute_dtype); None otherwise."""
    if precision != "nf4":
        return None
    try:
        from transformers import BitsAndBytesConfig
        import bitsandbytes  # noqa: F401  (fail here, with a clear message, not deep in transformers)
    except ImportError as exc:
        raise ModelLoadError(f"precision nf4 needs bitsandbytes: pip install bitsandbytes ({exc})") from None
    settings = {**DEFAULT_4BIT, **(options or {})}
    unknown = sorted(set(settings) - set(DEFAULT_4BIT))
    if unknown:
        raise ModelLoadError(f"unknown 4-bit option(s) {unknown}; known: {sorted(DEFAULT_4BIT)}")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=settings["quant_type"],
        bnb_4bit_use_double_quant=settings["double_quant"],
        bnb_4bit_compute_dtype=DTYPES[settings["compute_dtype"]],
    )


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer stored with a model (hub id or directory)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelLoadError(_explain(path, "tokenizer", exc)) from exc


def load_model(
    path: str,
    precision: str = "fp32",
    device: str = "cpu",
    *,
    adapter: Optional[str] = None,
    trust_remote_code: bool = False,
    trainable: bool = False,
    quantization: Optional[dict] = None,
):
    """Load a causal LM at a precision on a device, optionally with a PEFT adapter.

    Memory left by earlier models is handed back first (:func:`ftflow.device.free_memory`); on a GPU the
    weights are read straight onto it (``device_map``), never into host memory first.

    Args:
        path: hub id or local directory.
        precision: fp32, bf16, fp16 or nf4 (4-bit through bitsandbytes).
        device: cpu or cuda (already resolved).
        adapter: a PEFT adapter directory to put on top of the model.
        trust_remote_code: run the repository's own modelling code.
        trainable: keep the adapter's weights trainable (for resuming training).
        quantization: 4-bit options for nf4 (quant_type, double_quant, compute_dtype); see DEFAULT_4BIT.

    Returns:
        The model, in eval mode unless ``trainable``.
    """
    from transformers import AutoModelForCausalLM

    free_memory(device)  # whatever an earlier model left (a cycle, the allocator's cache) goes before this one comes
    kwargs = {"trust_remote_code": trust_remote_code}
    quant = quantization_config(precision, quantization)
    if quant is not None:
        kwargs["quantization_config"] = quant
        # What stays unquantized (embeddings, norms, lm_head) in the compute dtype, not the checkpoint's.
        kwargs["dtype"] = quant.bnb_4bit_compute_dtype
    else:
        kwargs["dtype"] = DTYPES[precision]
    if quant is not None or device != "cpu":
        # Each weight read straight onto the device: no copy of the model in host memory (16 GB for an 8B model
        # in bf16). On the CPU the weights are where they load anyway, and a device map would only mark the model
        # as offloaded (transformers then saves it differently).
        kwargs["device_map"] = {"": device_map_target(device)}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as exc:
        raise ModelLoadError(_explain(path, f"model ({precision})", exc)) from exc
    if quant is not None:
        use_reference_4bit_layout(model)
        if device == "cpu":
            own_unquantized_memory(model)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
    if not trainable:
        model.eval()
    return model


def own_unquantized_memory(model) -> None:
    """Copy the tensors a 4-bit model on the CPU left unquantized out of the memory-mapped checkpoint.

    With a device map on the CPU, transformers leaves them as views of the safetensors file, read in only when
    first used. ``prepare_model_for_kbit_training`` then upcasts them to fp32 while the file's pages of every
    one of them stay mapped (the mapping goes only when the last view does): 6 bytes per unquantized element at
    once, 50% over the fp32 weights the memory plan counts (measured at TinyLlama's real widths cut to one layer:
    899 MB during the upcast, where the QLoRA step peaks at 713). Copied here, the mapping goes before the upcast,
    whose peak is then the fp32 weights and one tensor in bf16, as on a GPU (where the weights are copied to the
    card while loading). CPU only. A tied embedding stays tied: its one parameter is copied once.
    """
    for param in model.parameters():
        if type(param).__name__ != "Params4bit":
            param.data = param.data.clone()


def use_reference_4bit_layout(model) -> int:
    """Keep every 4-bit layer of ``model`` on bitsandbytes' reference CPU layout; return how many there are.

    On a CPU with AVX512-BF16, bitsandbytes' ``Linear4bit.forward`` repacks a layer's weights, the first
    time it runs in eval mode without grad, into a blocked layout for a faster kernel. That kernel needs
    every out_features divisible by 32 and gives numbers that differ from the reference kernel's (about
    1e-5 relative in perplexity), so the same 4-bit weights would score differently on different CPUs, and
    between a run's evaluation passes and its training steps. ftflow turns the switch off, and unpacks a
    layer that was already packed, so every CPU scores with the kernel that trains. CUDA is unaffected.
    """
    try:
        from bitsandbytes.nn import Linear4bit
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse
    except ImportError:  # no bitsandbytes: no 4-bit layers either
        return 0
    layers = [module for module in model.modules() if isinstance(module, Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
        weight = layer.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
            layer.quant_state = weight.quant_state
    return len(layers)


def _explain(path: str, what: str, exc: Exception) -> str:
    if Path(path).exists():
        return f"could not load the {what} from directory {path}: {type(exc).__name__}: {exc}"
    return (
        f"could not load the {what} {path!r}: {type(exc).__name__}: {exc}. If it is a hub id, this machine "
        "must reach the hub or have it in the local cache (HF_HOME); if it is a directory, check the path."
    )


def count_parameters(model) -> int:
    """Parameters of the base model (an adapter's are not counted; 4-bit packed weights are unpacked)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return int(base.num_parameters())


def load_trained(run: dict, device: str, precision: Optional[str] = None):
    """The model a run trained, loaded the way a user would: base + adapter, or the full checkpoint."""
    base = run["base_model"]
    model_dir = Path(run["dir"]) / run["files"]["model"]
    if run["method"] in PEFT_METHODS:
        return load_model(base["path"], precision or run["precision"], device, adapter=str(model_dir),
                          trust_remote_code=base["trust_remote_code"], quantization=run.get("quantization"))
    return load_model(str(model_dir), precision or run["precision"], device,
                      trust_remote_code=base["trust_remote_code"])
