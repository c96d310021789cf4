"""DeepSpeed ZeRO-3 checkpoints -> full fp32 weights on one CPU process -> native (or dense HF) folder.

What ``prunext train`` leaves (see :mod:`prunext.train.checkpoints`)::

    OUT/checkpoints/stepN/zero_pp_rank_<r>_mp_rank_00_model_states.pt   names, shapes, shared pairs, frozen fragments
    OUT/checkpoints/stepN/zero_pp_rank_<r>_mp_rank_00_optim_states.pt   rank r's slice of the fp32 flat group(s)
    OUT/checkpoints/stepN/prunext_state.json    written after a barrier: the tag is complete
    OUT/checkpoints/latest                      the newest complete tag
    OUT/final/config.json                       the model config with the plan (when the run finished)
    OUT/run_config.json                         settings["model"]: the folder training started from

Rebuilding needs neither GPUs nor the original world size: each trainable
parameter is the concatenation of its ``1/world`` slices, read from the
memory-mapped optimizer files with DeepSpeed's own bookkeeping
(``deepspeed.utils.zero_to_fp32``); frozen parameters are the concatenation
of their fragments in the memory-mapped model-state files. ZeRO-3 holds a
weight-shared block once (one ``ds_id``) under its first name, and the
model states record the other names as ``shared_params`` pairs; the native
plan stores each shared tensor once under its home position
(:func:`prunext.core.mapping.stored_keys`), so the two line up and nothing is
duplicated. DeepSpeed's ``zero_to_fp32`` script is not used to write: with
safetensors output it aborts on shared tensors.

Memory: each shard's header is written first and the tensors are appended
one at a time (:func:`prunext.core.checkpoint.write_stored_streaming`), and the checkpoint files are
memory-mapped (page cache, not process memory), so the process holds about
one tensor rather than one model (``--format hf`` builds the whole model).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from prunext.errors import ModelError, UserError

log = logging.getLogger(__name__)

STATE_FILE = "prunext_state.json"  # prunext.train.checkpoints.STATE_FILE (kept import-light)
LATEST = "latest"
_RANK_FILE = re.compile(r"(?:.*_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_(model|optim)_states\.pt")
_STEP = re.compile(r"step(\d+)")


# ------------------------------------------------------------ finding the tag
def _rank_files(tag_dir: Path) -> dict[str, dict[int, Path]]:
    files: dict[str, dict[int, Path]] = {"model": {}, "optim": {}}
    for p in tag_dir.iterdir():
        m = _RANK_FILE.fullmatch(p.name)
        if m and p.is_file() and int(m[2]) == 0:
            files[m[3]][int(m[1])] = p
    return files


def is_zero_tag(path: Path) -> bool:
    """A folder holding DeepSpeed ZeRO rank files (``*_model_states.pt``)."""
    return path.is_dir() and any(_RANK_FILE.fullmatch(p.name) for p in path.iterdir())


def find_checkpoint_dir(path: str | Path) -> tuple[Path, str | None] | None:
    """Recognise a DeepSpeed checkpoint source: ``OUT/checkpoints``, a run folder ``OUT``, or one tag folder.

    Returns:
        ``(checkpoint folder, tag or None)``, or None when ``path`` is not a DeepSpeed checkpoint.
    """
    path = Path(path).expanduser()
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    if is_zero_tag(path):
        return path.parent, path.name
    for folder in (path, path / "checkpoints"):
        if folder.is_dir() and ((folder / LATEST).is_file() or any(is_zero_tag(p) for p in folder.iterdir() if p.is_dir())):
            return folder, None
    return None


@dataclass
class TagStatus:
    name: str
    folder: Path
    complete: bool
    why: str  # what is missing, when incomplete
    world: int | None


def tag_status(folder: Path) -> TagStatus:
    """Whether a tag is complete: prunext's marker is there and every rank's two files exist."""
    files = _rank_files(folder)
    world = None
    state = folder / STATE_FILE
    if state.is_file():
        try:
            world = json.loads(state.read_text())["settings"]["world_size"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            return TagStatus(folder.name, folder, False, f"{STATE_FILE} is damaged", None)
    if world is None:
        world = max(len(files["model"]), len(files["optim"]))
    missing = [f"rank {r} {kind} states" for r in range(world) for kind in ("model", "optim") if r not in files[kind]]
    if not state.is_file():
        return TagStatus(folder.name, folder, False, f"no {STATE_FILE} (the run stopped while saving it)", world)
    if missing or world == 0:
        return TagStatus(folder.name, folder, False, f"missing {', '.join(missing[:3]) or 'every rank file'}", world)
    empty = [p.name for kinds in files.values() for p in kinds.values() if p.stat().st_size == 0]
    if empty:
        return TagStatus(folder.name, folder, False, f"empty file {empty[0]}", world)
    return TagStatus(folder.name, folder, True, "", world)


def _tag_order(folder: Path) -> tuple[int, float]:
    m = _STEP.fullmatch(folder.name)
    return (int(m[1]) if m else -1, folder.stat().st_mtime)


def choose_tag(ckpt_dir: Path, tag: str | None = None) -> TagStatus:
    """The tag to convert: ``tag`` when given (must be complete), else the newest complete one.

    A newer tag that is incomplete (a run killed while saving) is skipped with a warning naming it.

    Raises:
        UserError: ``tag`` is missing or incomplete, or no tag is complete.
    """
    if tag is not None:
        folder = ckpt_dir / tag
        if not folder.is_dir():
            have = sorted(p.name for p in ckpt_dir.iterdir() if is_zero_tag(p)) if ckpt_dir.is_dir() else []
            raise UserError(f"--tag {tag}: no folder {folder}; tags there: {', '.join(have) or 'none'}")
        status = tag_status(folder)
        if not status.complete:
            raise UserError(f"checkpoint {folder} is incomplete ({status.why}); pick another --tag or leave it out for the newest complete one")
        return status
    candidates = sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and is_zero_tag(p)), key=_tag_order, reverse=True)
    skipped = []
    for folder in candidates:
        status = tag_status(folder)
        if status.complete:
            for s in skipped:
                log.warning("checkpoint %s is incomplete (%s); using %s, the newest complete one", s.folder, s.why, status.name)
            return status
        skipped.append(status)
    raise UserError(
        f"{ckpt_dir} has no complete checkpoint"
        + (f" ({', '.join(f'{s.name}: {s.why}' for s in skipped)})" if skipped else " (no tag folders with *_model_states.pt)")
    )


# ------------------------------------------------------------ the model's config
def model_source(ckpt_dir: Path, model: str | None = None) -> Path:
    """The folder whose config (with the plan) and tokenizer describe the checkpoint's model.

    Order: ``--model``; the run's ``final/``; the folder training started from (``run_config.json``).
    """
    if model is not None:
        from prunext.core.loading import resolve_model_path

        where = resolve_model_path(model)
        if not (isinstance(where, Path) and (where / "config.json").is_file()):
            raise ModelError(f"--model {model} is not a model folder with config.json; give the folder training started from")
        return where
    run = ckpt_dir.parent
    if (run / "final" / "config.json").is_file():
        return run / "final"
    try:
        started = json.loads((run / "run_config.json").read_text())["settings"]["model"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        started = None
    if started is not None:
        from prunext.core.loading import resolve_model_path

        try:
            where = resolve_model_path(started)
        except UserError:
            where = None
        if isinstance(where, Path) and (where / "config.json").is_file():
            return where
    raise ModelError(
        f"cannot tell which model {ckpt_dir} holds (no {run / 'final'}, and run_config.json's model "
        f"{started!r} is not a folder here); pass --model with the folder training started from"
    )


# ------------------------------------------------------------ lazy fp32 tensors
def open_zero3(tag_dir: Path) -> dict[str, Lazy]:
    """Every parameter name in a ZeRO-3 tag -> a lazy full fp32 tensor; shared names point to one entry.

    Files are memory-mapped; nothing is assembled yet.
    """
    import torch
    from deepspeed.utils import zero_to_fp32 as z

    from prunext.core.checkpoint import Lazy

    files = _rank_files(tag_dir)
    world = len(files["model"])
    try:
        states = [torch.load(files["model"][r], map_location="cpu", mmap=True, weights_only=False) for r in range(world)]
        with contextlib.redirect_stdout(io.StringIO()) as said:  # DeepSpeed prints its progress
            stage, partitions, flat_groups, _ = z.parse_optim_states([str(files["optim"][r]) for r in range(world)], str(tag_dir))
    except (OSError, RuntimeError, KeyError, ValueError, EOFError) as e:
        raise ModelError(f"checkpoint {tag_dir} is damaged ({str(e).splitlines()[0]}); use another --tag") from e
    if stage != 3:
        raise UserError(f"checkpoint {tag_dir} is ZeRO stage {stage}; this converter reads ZeRO-3 checkpoints")
    if partitions != world:
        raise ModelError(f"checkpoint {tag_dir} was saved by {partitions} ranks but holds {world} rank files")

    lazy: dict[str, Lazy] = {}
    # Trainable: DeepSpeed's own offsets into the flat groups (its GatheredTensor concatenates one param's slices).
    gathered: dict = {}
    shapes = type("S", (), {"param_shapes": states[0]["param_shapes"]})
    with contextlib.redirect_stdout(said), contextlib.redirect_stderr(io.StringIO()):
        z._zero3_merge_trainable_params(gathered, world, flat_groups, [shapes])
    log.debug("deepspeed: %s", said.getvalue().strip())
    for name, g in gathered.items():
        lazy[name] = Lazy(tuple(g.shape), g.contiguous)
    # Frozen: each rank holds an equal, padded slice of the flattened tensor.
    for name, shape in (states[0].get("frozen_param_shapes") or {}).items():
        frags = [s["frozen_param_fragments"][name] for s in states]
        lazy[name] = Lazy(tuple(shape), lambda frags=frags, shape=shape: torch.cat([f.reshape(-1) for f in frags])[: shape.numel()].view(shape))
    for name in states[0].get("buffer_names") or []:
        t = states[0]["module"][name]
        lazy[name] = Lazy(tuple(t.shape), lambda t=t: t.clone(), None if t.is_floating_point() else t.dtype)
    # ZeRO-3 keeps a shared Parameter once; the other names it ran under point at it (rank 0 records them).
    for alias, holder in (states[0].get("shared_params") or {}).items():
        if holder in lazy:
            lazy[alias] = lazy[holder]
    return lazy


def stored_lazy(config, lazy: dict[str, Lazy]) -> dict[str, Lazy]:
    """Pick the native stored keys (each shared tensor once) out of the checkpoint, checking names and shapes.

    Raises:
        ModelError: the checkpoint's parameters disagree with the config's plan.
    """
    from accelerate import init_empty_weights

    from prunext.core.mapping import stored_keys
    from prunext.core.model import PrunextForCausalLM

    with init_empty_weights(include_buffers=False):
        meta = PrunextForCausalLM(config)
    full = meta.state_dict()
    keys = stored_keys(config.plan, full.keys(), config.tie_word_embeddings)
    missing = [k for k in keys if k not in lazy]
    unexpected = [k for k in lazy if k not in full]
    wrong = [f"{k} {lazy[k].shape} != {tuple(full[k].shape)}" for k in keys if k in lazy and lazy[k].shape != tuple(full[k].shape)]
    if missing or unexpected or wrong:
        raise ModelError(
            "the checkpoint does not fit the model config's plan "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}, shapes {wrong[:2]}); "
            "pass --model with the folder this run started from"
        )
    return {k: lazy[k] for k in keys}


def fold_norm_gate(stored: dict[str, Lazy], tag_dir: Path) -> dict[str, Lazy]:
    """A tag saved while ``train --norm-open`` was still opening holds raw output-norm weights: apply its gate."""
    from prunext.core.checkpoint import Lazy
    from prunext.train.normopen import checkpoint_gate

    gate = checkpoint_gate(tag_dir / STATE_FILE)
    if gate == 1.0:
        return stored
    log.info("%s was saved while --norm-open was opening the output norms: their weights x %.4g", tag_dir.name, gate)
    folded = {name: Lazy(lz.shape, lambda load=lz.load: load() * gate) if "_out_norm." in name else lz for name, lz in stored.items()}
    return folded


def _tokenizer(folder: Path):
    from prunext.core.loading import TOKENIZER_FILES

    if not any((folder / n).exists() for n in TOKENIZER_FILES):
        log.warning("%s has no tokenizer; the converted folder will have none", folder)
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def convert_zero_checkpoint(
    ckpt_dir: Path,
    out_tmp: Path,
    *,
    tag: str | None = None,
    fmt: str = "native",
    dtype=None,
    model: str | None = None,
    max_shard_size: int | str = "5GB",
) -> dict:
    """Convert one complete tag of ``ckpt_dir`` into ``out_tmp`` (an existing, empty folder).

    Returns:
        What was done: ``tag``, ``tag_dir``, ``model_source``, ``positions``, ``tensors``, ``params``.
    """
    import math

    import torch

    from prunext.convert.hf import check_hf_expressible
    from prunext.core.checkpoint import read_config, write_stored_streaming

    dtype = dtype or torch.float32
    status = choose_tag(ckpt_dir, tag)
    source = model_source(ckpt_dir, model)
    config = read_config(source)
    if fmt == "hf":
        check_hf_expressible(config.plan, config.base_model_type)  # before reading any weights
    log.info("reading %s (%d ranks); model config from %s", status.folder, status.world, source)
    stored = fold_norm_gate(stored_lazy(config, open_zero3(status.folder)), status.folder)
    tokenizer = _tokenizer(source)
    config.dtype = dtype
    if fmt == "hf":
        from accelerate import init_empty_weights
        from tqdm.auto import tqdm

        from prunext.convert.hf import write_dense_hf
        from prunext.core.checkpoint import assign_stored
        from prunext.core.model import PrunextForCausalLM

        with init_empty_weights(include_buffers=False):
            built = PrunextForCausalLM(config)
        state = {k: v.load().to(dtype) for k, v in tqdm(stored.items(), desc="tensors", unit="tensor")}
        assign_stored(built, state, owned_may_be_missing=False)
        _generation_config(built, source)
        write_dense_hf(built, out_tmp, tokenizer=tokenizer, dtype=dtype)
    else:
        from prunext.core.portable import write_portable_code

        config.architectures = ["PrunextForCausalLM"]
        config.save_pretrained(out_tmp)
        write_portable_code(out_tmp)
        if (source / "generation_config.json").is_file():
            import shutil

            shutil.copy(source / "generation_config.json", out_tmp / "generation_config.json")
        write_stored_streaming(stored, out_tmp, dtype, max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_tmp)
    return {
        "tag": status.name,
        "tag_dir": str(status.folder),
        "model_source": str(source),
        "positions": len(config.plan),
        "tensors": len(stored),
        "params": sum(math.prod(v.shape) for v in stored.values()),
    }


def _generation_config(model, source: Path) -> None:
    if (source / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(source)


# ------------------------------------------------------------ --verify
def verify_windows(vocab_size: int, n: int = 4, length: int = 32):
    """A few fixed token windows (seeded), independent of any data set: (n, length) LongTensor."""
    import torch

    return torch.randint(0, vocab_size, (n, length), generator=torch.Generator().manual_seed(1234))


def max_logit_diff(a, b, windows) -> float:
    import torch

    with torch.no_grad():
        return (a(windows).logits.float() - b(windows).logits.float()).abs().max().item()


def verify_checkpoint_result(ckpt_dir: Path, out: Path, fmt: str, tag: str) -> str:
    """Compare the converted folder's logits with the run's ``final/``, or check they are finite."""
    import torch
    from transformers import AutoModelForCausalLM

    import prunext  # noqa: F401  (registers the native format)

    out = Path(out)
    result = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    windows = verify_windows(result.config.vocab_size)
    final = ckpt_dir.parent / "final"
    if (final / "config.json").is_file():
        reference = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
        diff = max_logit_diff(result, reference, windows)
        latest = (ckpt_dir / LATEST).read_text().strip() if (ckpt_dir / LATEST).is_file() else None
        note = "" if tag == latest else f" (tag {tag} is not the last checkpoint {latest}: a difference is expected)"
        stored_dtype = str(json.loads((out / "config.json").read_text()).get("dtype", "float32"))
        if stored_dtype != "float32":
            note += f" (the result is {stored_dtype}: rounding differences are expected)"
        return f"verify: max |logit difference| vs {final} = {diff:.3g} on {tuple(windows.shape)} fixed token windows{note}"
    with torch.no_grad():
        logits = result(windows).logits
    finite = bool(torch.isfinite(logits).all())
    return f"verify: no {final} to compare with; the result's logits on {tuple(windows.shape)} fixed token windows are {'all finite' if finite else 'NOT finite'}"
