"""The memory tables of docs/scaling.md, from prunext's estimator (prunext/train/estimate.py); no weights, no GPU.

    .venv/bin/python bench/scaling_table.py > /tmp/tables.md

Llama-2 7B and 13B and Llama-3 70B configs, pruned by 30% of their blocks as
`prunext prune` does by default (FlexiGPT hybrid: each replaced position runs
the block before the replaced run with LoRA rank hidden/32 and output norms,
kept blocks get LoRA rank hidden/64), healed with the dense model as teacher
(`--loss auto`), bf16, with the shipped configs.
"""

from __future__ import annotations

from transformers import AutoConfig

from prunext.core.config import PrunextConfig
from prunext.core.plan import LINEAR_NAMES, Plan, Position
from prunext.train.estimate import GIB, estimate, sizes_of

MODELS = {
    "Llama-2-7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
    "Llama-2-13B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000),
    "Llama-3-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256),
}
SETUPS = [  # (label, world, ranks per node, offload)
    ("1 node x 8 GPUs, zero3.json", 8, 8, False),
    ("2 nodes x 8 GPUs, zero3.json", 16, 8, False),
    ("2 nodes x 8 GPUs, zero3_offload.json", 16, 8, True),
]


def pruned_plan(layers: int, hidden: int, ratio: float = 0.3) -> Plan:
    """A FlexiGPT hybrid plan: the ``ratio`` of blocks before the last two replaced by the block before them."""
    n = round(ratio * layers)
    first = layers - 2 - n
    positions = []
    for i in range(layers):
        if first <= i < first + n:
            positions.append(Position(first - 1, lora_rank=hidden // 32, lora_targets=LINEAR_NAMES, out_norm=True))
        else:
            positions.append(Position(i, lora_rank=hidden // 64, lora_targets=LINEAR_NAMES))
    return Plan(tuple(positions), num_source_blocks=layers)


def main() -> None:
    print("| model | stored (pruned) | trained | teacher | where | per GPU | host per node |")
    print("|---|---:|---:|---:|---|---:|---:|")
    for name, fields in MODELS.items():
        base = AutoConfig.for_model("llama", **fields)
        layers = fields["num_hidden_layers"]
        student = sizes_of(PrunextConfig.from_base(base, pruned_plan(layers, fields["hidden_size"])), "replacement")
        teacher = sizes_of(PrunextConfig.from_base(base, Plan.identity(layers)), None)
        for label, world, per_node, offload in SETUPS:
            need = estimate(student, teacher, world, per_node, "bfloat16", offload_optimizer=offload, offload_param=offload)
            print(f"| {name} | {student.total / 1e9:.2f}B | {student.trainable / 1e6:.0f}M | {teacher.total / 1e9:.2f}B | "
                  f"{label} | {need.device_per_rank / GIB:.1f} GiB | {need.host_per_node / GIB:.1f} GiB |")
    print()
    print("`--trainable all` (every weight trains; no teacher, `--loss lm`):")
    print()
    print("| model | stored (pruned) | where | per GPU | host per node |")
    print("|---|---:|---|---:|---:|")
    for name, fields in MODELS.items():
        base = AutoConfig.for_model("llama", **fields)
        student = sizes_of(PrunextConfig.from_base(base, pruned_plan(fields["num_hidden_layers"], fields["hidden_size"])), "all")
        for label, world, per_node, offload in SETUPS:
            need = estimate(student, None, world, per_node, "bfloat16", offload_optimizer=offload, offload_param=offload)
            print(f"| {name} | {student.total / 1e9:.2f}B | {label} | {need.device_per_rank / GIB:.1f} GiB | {need.host_per_node / GIB:.1f} GiB |")


if __name__ == "__main__":
    main()
