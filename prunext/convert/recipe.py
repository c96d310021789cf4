"""``prunext convert``: any accepted model or a DeepSpeed ZeRO-3 checkpoint -> native folder or plain dense HF folder.

Flow: check arguments and what the target format can express -> load -> write atomically -> optionally verify.
A ``--from`` that is a training run's checkpoint folder goes through :mod:`prunext.convert.zero`.
"""

from __future__ import annotations

HELP = "convert a model between formats: HF / GGUF / builtin / native / ZeRO-3 checkpoint -> native, plain HF or GGUF"
EPILOG = """\
examples:
  prunext convert --from builtin:smollm2-135m --to smollm2-native/
  prunext convert --from model.Q4_1.gguf --to native/ --dtype float32
  prunext convert --from pruned/ --to pruned-hf/ --format hf --dtype bfloat16
  prunext convert --from run/checkpoints --to healed/ --verify      (newest complete ZeRO-3 tag)
  prunext convert --from sg-lora/ --to sg-lora.gguf --format gguf --dtype float16

--format native (default) writes a prunext folder: config.json with the plan,
safetensors holding every shared tensor once, tokenizer files.
--format hf writes the base family's plain model (loads without prunext): each
position gets its own copy of its block's weights with its adapters merged.
A plan with output norms cannot be expressed that way and is refused.
--format gguf writes that dense model as one .gguf file for llama.cpp (Llama,
Mistral, Qwen2, Qwen3), tokenizer and chat template embedded; --to is the file.
A DeepSpeed checkpoint folder (OUT/checkpoints, OUT, or one tag folder) is
rebuilt to full fp32 weights on one CPU process, without GPUs or the training
world size; the newest complete tag is used unless --tag names one.
"""


def add_arguments(parser) -> None:
    parser.add_argument("--from", dest="source", required=True, metavar="SRC", help="builtin:NAME, a native/HF folder, a .gguf file or a hub id")
    parser.add_argument("--to", dest="out", required=True, metavar="DIR", help="output folder (must not exist or be empty); a .gguf file for --format gguf")
    parser.add_argument("--format", choices=("native", "hf", "gguf"), default="native", help="output format (default native)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="output dtype (default: as loaded, float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --to folder")
    parser.add_argument("--tag", default=None, help="checkpoint source: the tag to convert (default: the newest complete one)")
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="checkpoint source: the model folder training started from (config + tokenizer; default OUT/final, else run_config.json's)")
    parser.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="native format: shard the safetensors above this size (default 5GB)")
    parser.add_argument("--verify", action="store_true",
                        help="load source and result and print the max logit difference on a few fixed token windows")


def run(args) -> int:
    import json
    import logging
    from pathlib import Path

    import torch

    from prunext.convert.hf import check_hf_expressible, write_dense_hf
    from prunext.core.checkpoint import read_plan, write_native
    from prunext.core.loading import load_model
    from prunext.fsutil import atomic_dir, check_out_dir

    from prunext.convert.zero import find_checkpoint_dir
    from prunext.errors import UserError

    log = logging.getLogger(__name__)
    if args.format == "gguf":
        return _run_gguf(args)
    check_out_dir(args.out, args.overwrite)
    try:
        from prunext.core.checkpoint import parse_size

        if parse_size(args.max_shard_size) <= 0:
            raise ValueError
    except ValueError:
        raise UserError(f"--max-shard-size {args.max_shard_size} is not a size such as 5GB, 500MB or 1000000") from None
    checkpoint = find_checkpoint_dir(args.source)
    if checkpoint is not None:
        return _run_checkpoint(args, *checkpoint)
    for flag in ("tag", "model"):
        if getattr(args, flag) is not None:
            raise UserError(f"--{flag} applies to a DeepSpeed checkpoint --from, and {args.source} is not one")
    if args.format == "hf":
        plan = read_plan(args.source)
        if plan is not None:
            base_type = json.loads((Path(args.source) / "config.json").read_text()).get("base_model_type", "llama")
            check_hf_expressible(plan, base_type)
    dtype = getattr(torch, args.dtype) if args.dtype else torch.float32
    model, tokenizer = load_model(args.source, dtype=dtype)
    with atomic_dir(args.out, args.overwrite) as tmp:
        if args.format == "hf":
            write_dense_hf(model, tmp, tokenizer=tokenizer)
        else:
            write_native(model, tmp, tokenizer=tokenizer, max_shard_size=args.max_shard_size)
        (tmp / "convert_report.json").write_text(json.dumps({"from": str(args.source), "format": args.format,
                                                             "dtype": str(dtype).replace("torch.", "")}, indent=2) + "\n")
    log.info("wrote %s model (%d positions) to %s", args.format, len(model.plan), args.out)
    print(f"converted {args.source} -> {args.out} ({args.format}, {str(dtype).replace('torch.', '')}, {len(model.plan)} positions)")
    if args.verify:
        from transformers import AutoModelForCausalLM

        from prunext.convert.zero import max_logit_diff, verify_windows

        result = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32).eval()
        windows = verify_windows(model.config.vocab_size)
        diff = max_logit_diff(result, model.float().eval(), windows)
        print(f"verify: max |logit difference| vs {args.source} = {diff:.3g} on {tuple(windows.shape)} fixed token windows")
    return 0


def _run_checkpoint(args, ckpt_dir, tag_in_path) -> int:
    """A DeepSpeed ZeRO-3 checkpoint folder -> native/HF folder, on one CPU process."""
    import json

    import torch

    from prunext.convert.zero import convert_zero_checkpoint, verify_checkpoint_result
    from prunext.errors import UserError
    from prunext.fsutil import atomic_dir

    if tag_in_path is not None and args.tag not in (None, tag_in_path):
        raise UserError(f"--from names tag {tag_in_path} and --tag says {args.tag}; give one")
    dtype = getattr(torch, args.dtype) if args.dtype else torch.float32
    with atomic_dir(args.out, args.overwrite) as tmp:
        done = convert_zero_checkpoint(ckpt_dir, tmp, tag=args.tag or tag_in_path, fmt=args.format, dtype=dtype,
                                       model=args.model, max_shard_size=args.max_shard_size)
        (tmp / "convert_report.json").write_text(json.dumps({"from": str(args.source), "format": args.format,
                                                             "dtype": str(dtype).replace("torch.", ""), **done}, indent=2) + "\n")
    print(f"converted {done['tag_dir']} -> {args.out} ({args.format}, {str(dtype).replace('torch.', '')}, "
          f"{done['positions']} positions, {done['tensors']} tensors, {done['params']:,} parameters stored)")
    if args.verify:
        print(verify_checkpoint_result(ckpt_dir, args.out, args.format, done["tag"]))
    return 0


def _run_gguf(args) -> int:
    """A model with a dense form -> one GGUF file (:mod:`prunext.convert.gguf`), checked before loading."""
    from pathlib import Path

    import torch

    from prunext.convert.gguf import check_gguf_config, check_gguf_expressible, check_gguf_out, write_gguf
    from prunext.convert.zero import find_checkpoint_dir
    from prunext.core.checkpoint import read_config, read_plan
    from prunext.core.loading import load_model, require_tokenizer
    from prunext.errors import UserError

    check_gguf_out(args.out, args.overwrite)
    for flag in ("tag", "model"):
        if getattr(args, flag) is not None:
            raise UserError(f"--{flag} applies to a DeepSpeed checkpoint --from with --format native or hf")
    if find_checkpoint_dir(args.source) is not None:
        raise UserError(f"--format gguf converts a model, and {args.source} is a training checkpoint; "
                        "convert it to a native folder first (prunext convert --from CKPT --to DIR)")
    plan = read_plan(args.source)
    if plan is not None:  # a native folder: everything GGUF cannot carry is refused before loading
        config = read_config(Path(args.source))
        check_gguf_expressible(plan, config.base_model_type)
        check_gguf_config(config.base_config())
    dtype = args.dtype or "float32"
    model, tokenizer = load_model(args.source, dtype=torch.float32)
    tokenizer = require_tokenizer(tokenizer, args.source)
    done = write_gguf(model.eval(), args.out, tokenizer, dtype=dtype, overwrite=args.overwrite)
    print(f"converted {args.source} -> {args.out} (gguf {done['architecture']}, {dtype}, {done['positions']} blocks, "
          f"{done['parameters']:,} parameters, {done['bytes']:,} bytes)")
    if args.verify:
        from transformers import AutoModelForCausalLM

        from prunext.convert.zero import max_logit_diff, verify_windows

        out = Path(args.out)
        result = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
        windows = verify_windows(model.config.vocab_size)
        diff = max_logit_diff(result, model.float().eval(), windows)
        print(f"verify: max |logit difference| vs {args.source} = {diff:.3g} on {tuple(windows.shape)} fixed token windows")
    return 0
