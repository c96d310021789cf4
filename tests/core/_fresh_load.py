"""Load native folders with transformers alone, as someone without prunext would.

Run with ``tests/no_prunext`` on ``PYTHONPATH`` (prunext cannot be imported)::

    python _fresh_load.py OUT.pt DIR [DIR ...]    load each DIR with trust_remote_code=True; save what the tests compare
    python _fresh_load.py --try DIR [--no-trust]  load DIR; on failure print the error and exit 3

For each folder OUT.pt holds the input ids and the logits, greedy generations
with and without the KV cache, the class that loaded, and the sharing seen:
for every base tensor a reused position runs, whether it is the very object
of its home position.
"""

import sys

import torch
from transformers import AutoModelForCausalLM

OWNED = ("lora_A", "lora_B", "attn_out_norm.", "mlp_out_norm.")


def prunext_blocked() -> bool:
    try:
        import prunext  # noqa: F401
    except ImportError:
        return True
    return False


def sharing(model) -> tuple[int, int]:
    """(base tensors of reused positions, how many of them are their home position's very Parameter)."""
    homes: dict[int, int] = {}
    shared = same = 0
    layers = model.model.layers
    for i, position in enumerate(model.config.prunext_plan["positions"]):
        home = homes.setdefault(position["source"], i)
        if home == i:
            continue
        for name, param in layers[home].named_parameters():
            if not any(part in name for part in OWNED):
                shared += 1
                same += layers[i].get_parameter(name) is param
    return shared, same


def load(folder: str):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


def main(argv: list[str]) -> int:
    if not prunext_blocked():
        raise SystemExit("prunext is importable here; run with tests/no_prunext on PYTHONPATH")
    if argv[0] == "--try":
        try:
            if "--no-trust" in argv:
                AutoModelForCausalLM.from_pretrained(argv[1])
            else:
                load(argv[1])
        except Exception as e:  # report whatever transformers raised, in its own words
            print(f"{type(e).__name__}: {e}")
            return 3
        return 0
    out, results = argv[0], {}
    for folder in argv[1:]:
        model = load(folder)
        vocab = model.config.vocab_size
        ids = torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = model(ids).logits
        greedy = {"do_sample": False, "max_new_tokens": 10, "min_new_tokens": 10, "pad_token_id": 0}
        cached = model.generate(ids[:1, :6], use_cache=True, **greedy)
        uncached = model.generate(ids[:1, :6], use_cache=False, **greedy)
        results[folder] = {
            "ids": ids,
            "logits": logits,
            "cached": cached,
            "uncached": uncached,
            "class": f"{type(model).__module__}.{type(model).__name__}",
            "sharing": sharing(model),
            "unique_params": sum(p.numel() for p in model.parameters()),  # parameters() yields a shared one once
        }
    assert not any(m == "prunext" or m.startswith("prunext.") for m in sys.modules)
    torch.save(results, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
