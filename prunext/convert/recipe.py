"""``prunext convert``: any accepted model -> native folder or plain dense HF folder.

Flow: check arguments and what the target format can express -> load -> write atomically.
"""

from __future__ import annotations

HELP = "convert a model between formats: HF / GGUF / builtin / native -> native or plain HF"
EPILOG = """\
examples:
  prunext convert --from builtin:smollm2-135m --to smollm2-native/
  prunext convert --from model.Q4_1.gguf --to native/ --dtype float32
  prunext convert --from pruned/ --to pruned-hf/ --format hf --dtype bfloat16

--format native (default) writes a prunext folder: config.json with the plan,
safetensors holding every shared tensor once, tokenizer files.
--format hf writes the base family's plain model (loads without prunext): each
position gets its own copy of its block's weights with its adapters merged.
A plan with output norms cannot be expressed that way and is refused.
"""


def add_arguments(parser) -> None:
    parser.add_argument("--from", dest="source", required=True, metavar="SRC", help="builtin:NAME, a native/HF folder, a .gguf file or a hub id")
    parser.add_argument("--to", dest="out", required=True, metavar="DIR", help="output folder (must not exist or be empty)")
    parser.add_argument("--format", choices=("native", "hf"), default="native", help="output format (default native)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="output dtype (default: as loaded, float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --to folder")


def _plan_of_native_folder(source: str):
    """The plan of a native folder, read from config.json without loading weights; None otherwise."""
    import json
    from pathlib import Path

    from prunext.core.plan import Plan

    config = Path(source) / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    if data.get("model_type") != "prunext" or data.get("prunext_plan") is None:
        return None
    return Plan.from_dict(data["prunext_plan"])


def run(args) -> int:
    import logging

    import torch

    from prunext.convert.hf import check_hf_expressible, write_dense_hf
    from prunext.core.checkpoint import write_native
    from prunext.core.loading import load_model
    from prunext.fsutil import atomic_dir, check_out_dir

    log = logging.getLogger(__name__)
    check_out_dir(args.out, args.overwrite)
    if args.format == "hf":
        plan = _plan_of_native_folder(args.source)
        if plan is not None:
            check_hf_expressible(plan)
    dtype = getattr(torch, args.dtype) if args.dtype else torch.float32
    model, tokenizer = load_model(args.source, dtype=dtype)
    with atomic_dir(args.out, args.overwrite) as tmp:
        if args.format == "hf":
            write_dense_hf(model, tmp, tokenizer=tokenizer)
        else:
            write_native(model, tmp, tokenizer=tokenizer)
    log.info("wrote %s model (%d positions) to %s", args.format, len(model.plan), args.out)
    print(f"converted {args.source} -> {args.out} ({args.format}, {str(dtype).replace('torch.', '')}, {len(model.plan)} positions)")
    return 0
