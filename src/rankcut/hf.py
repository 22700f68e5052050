"""Hugging Face ``transformers`` model directories: load one, feed it, and write a compressed one back as one.

A compressed directory is the usual layout (``config.json``, ``model.safetensors``, tokenizer files) plus
rankcut's ``plan.json``. The factorized layers store two weights where the original stored one, so a plain
``AutoModel.from_pretrained`` would report them missing and initialize them at random: load it with
``rankcut.load(dir)`` or ``rankcut.hf.from_pretrained(dir)``, which rebuild the architecture from
``config.json``, reshape it by the plan and load the weights. No pickle and no remote code is ever run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

CONFIG_FILE = "config.json"
FORMAT = "transformers"
# What a compressed output must not inherit from its input, at any depth: the old weights in any format (they
# would be stale, uncompressed copies), their indexes, exported graphs, training checkpoints, rankcut's files.
_NOT_CARRIED = ("plan.json", "report.json", "onnx", "openvino")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".h5", ".msgpack", ".ot", ".onnx", ".pt", ".pth", ".ckpt", ".gguf")


def _not_carried(name: str) -> bool:
    return (name in _NOT_CARRIED or name.startswith((".", "checkpoint-")) or name.endswith(".index.json")
            or name.endswith(_WEIGHT_SUFFIXES))


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ValueError("Hugging Face models need the 'transformers' package: pip install 'rankcut[hf]'") from None
    return transformers


def is_hf_dir(path: str | os.PathLike) -> bool:
    """True for a directory holding a ``transformers`` ``config.json``."""
    return (Path(path) / CONFIG_FILE).is_file()


def is_hf_model(model: nn.Module) -> bool:
    """True for a ``transformers`` model (it carries a config that can be saved as ``config.json``)."""
    return hasattr(getattr(model, "config", None), "to_json_string") and hasattr(model, "save_pretrained")


def _model_class(config: Any, architecture: str | None) -> Any:
    """The transformers class named by ``architecture`` (or the config's), else the AutoModel for the config."""
    transformers = _transformers()
    name = architecture or next(iter(getattr(config, "architectures", None) or []), None)
    cls = getattr(transformers, name, None) if name else None
    if cls is None or not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
        return transformers.AutoModel
    return cls


def load_pretrained(path: str | os.PathLike) -> nn.Module:
    """The uncompressed model of a transformers directory, from safetensors weights only, in eval mode."""
    directory = Path(path)
    if not is_hf_dir(directory):
        raise ValueError(f"{directory} is not a Hugging Face model directory: {CONFIG_FILE} is missing")
    if not any(directory.glob("*.safetensors")) and not (directory / "model.safetensors.index.json").is_file():
        raise ValueError(f"{directory} holds no .safetensors weights; rankcut never unpickles pytorch_model.bin. "
                         "Re-save it with model.save_pretrained(dir, safe_serialization=True)")
    transformers = _transformers()
    config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    cls = _model_class(config, None)
    try:
        model = cls.from_pretrained(directory, config=config, local_files_only=True, use_safetensors=True,
                                    trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load the transformers model in {directory}: {error}") from None
    return model.eval()


def build_from_config(path: str | os.PathLike, architecture: str | None = None) -> nn.Module:
    """The architecture described by ``path/config.json``, with untrained weights (they are loaded over)."""
    transformers = _transformers()
    config = transformers.AutoConfig.from_pretrained(Path(path), local_files_only=True, trust_remote_code=False)
    cls = _model_class(config, architecture)
    if cls is transformers.AutoModel:
        return cls.from_config(config).eval()
    return cls(config).eval()


def example_inputs(model: nn.Module, batch: int = 2, length: int = 16) -> dict[str, torch.Tensor]:
    """Deterministic example inputs for a transformers model: token ids, or pixels for vision models."""
    config = model.config
    generator = torch.Generator().manual_seed(0)
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        return {"pixel_values": torch.randn(batch, config.num_channels, size, size, generator=generator)}
    vocab = getattr(config, "vocab_size", None)
    if not vocab:
        raise ValueError(f"cannot make example inputs for {type(model).__name__}: its config has no vocab_size; "
                         "pass a task or example inputs")
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def write_config(model: nn.Module, out: Path) -> None:
    """Write the model's ``config.json`` (and ``generation_config.json`` when it has one) into ``out``."""
    model.config.save_pretrained(out)
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        generation.save_pretrained(out)


def carry_files(source_dir: str | os.PathLike, out: Path) -> None:
    """Copy the input directory's other files (tokenizer, README, sub-folders) into ``out``, but never its
    weights in any format, nor ``out`` itself when it lies inside the input."""
    target = out.resolve()

    def ignored(folder: str, names: list[str]) -> list[str]:
        return [name for name in names if _not_carried(name) or Path(folder, name).resolve() in (target,
                *target.parents)]

    shutil.copytree(source_dir, out, ignore=ignored, dirs_exist_ok=True)


def from_pretrained(path: str | os.PathLike, *, trust_source: bool = False) -> nn.Module:
    """Like ``AutoModel.from_pretrained`` for rankcut output: a compressed directory (by its plan) or a plain one.
    ``trust_source`` as in ``rankcut.load``."""
    from rankcut.checkpoint import PLAN_FILE, load

    return load(path, trust_source=trust_source) if (Path(path) / PLAN_FILE).is_file() else load_pretrained(path)
