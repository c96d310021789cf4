"""The family registry: every family builds, prunes, extends, converts and decodes as transformers' own model does.

Tiny random models of each family (tests/conftest.py), with sliding windows
shorter than the sequences where the family has them.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from prunext.core.checkpoint import build_from_hf, save_native
from prunext.core.families import FAMILIES as REGISTRY
from prunext.core.families import family_of
from prunext.core.loading import load_model
from prunext.core.model import CACHE_ARG
from prunext.core.modules import LoRALinear, OutputNorm
from prunext.core.plan import LINEAR_NAMES, Plan, Position
from prunext.errors import ModelError
from prunext.extend import methods as extend_methods
from prunext.extend import plans
from prunext.prune import methods
from prunext.prune.importance import score_blocks, score_blocks_offloaded
from prunext.prune.ratio import ModelSizes, plan_budget

FAMILIES = tuple(REGISTRY)
WINDOW = 4  # sliding window of the tiny models; every sequence here is longer
REPO = Path(__file__).resolve().parents[2]


def _ids(batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _visible(model) -> None:
    """Give adapters a nonzero update, so a wrong merge or a wrong part shows in the logits."""
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)


def _pruned(hf):
    """flexigpt at 25% through the library functions prune's recipe calls, hybrid split included."""
    windows = _ids(4, 16, seed=3)
    scores = score_blocks(hf, windows, "bi", batch_size=2, progress=False)
    budget = plan_budget("flexigpt", ModelSizes.from_model(hf), 0.25, adapter_rank=2)
    weights = methods.block_weights(hf, range(4))
    pruning = methods.decide(scores, budget, weights, filter_rank=2, out_norm=True, kept_lora=0.5)
    torch.manual_seed(0)
    model = methods.build_model(hf, pruning, out_norm_init=0.3)
    methods.init_adapters_svd(model, pruning, weights)
    return model, pruning, budget


def _cached_logits(model, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits from a prefill of ``prefill`` tokens, then one token at a time through the KV cache."""
    out = model(ids[:, :prefill], use_cache=True)
    cache, logits = getattr(out, CACHE_ARG), [out.logits]
    for t in range(prefill, ids.shape[1]):
        out = model(ids[:, t : t + 1], use_cache=True, **{CACHE_ARG: cache})
        cache = getattr(out, CACHE_ARG)
        logits.append(out.logits)
    return torch.cat(logits, dim=1)  # (batch, seq, vocab)


# --------------------------------------------------------------------------- identity
@pytest.mark.parametrize("family", FAMILIES)
def test_identity_plan_is_the_family_model(tiny_hf, family):
    hf = tiny_hf(family, window=WINDOW)
    model = build_from_hf(hf, Plan.identity(4))
    assert type(model.model) is family_of(family).model_cls()
    x = _ids()
    torch.testing.assert_close(model(x).logits, hf(x).logits, rtol=0, atol=1e-5)


def test_gemma_scales_embeddings_and_softcaps_logits(tiny_hf):
    hf = tiny_hf("gemma2")
    model = build_from_hf(hf, Plan.identity(4))
    x = _ids(1, 6)
    embedded = model.model.embed_tokens(x)
    torch.testing.assert_close(embedded, model.model.embed_tokens.weight[x] * 32**0.5)
    cap = hf.config.final_logit_softcapping
    logits = model(x).logits
    assert logits.abs().max() < cap and torch.allclose(logits, hf(x).logits, atol=1e-5)


# --------------------------------------------------------------------------- prune and extend
@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_model_decodes_through_the_cache_as_its_full_forward(tiny_hf, family):
    hf = tiny_hf(family, window=WINDOW)
    model, pruning, budget = _pruned(hf)
    assert methods.stored_params(model) == budget.total_params_after  # --ratio accounting exact, fused or not
    _visible(model)
    config = model.config
    if getattr(config, "layer_types", None) is not None:  # each position keeps the attention kind of its block
        assert config.layer_types == [hf.config.layer_types[p.source] for p in pruning.plan.positions]
    x = _ids()
    torch.testing.assert_close(_cached_logits(model, x, prefill=5), model(x).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_extended_model_decodes_through_the_cache_as_its_full_forward(tiny_hf, family):
    hf = tiny_hf(family, window=WINDOW)
    source = build_from_hf(hf, Plan.identity(4))
    plan = plans.flexigpt_plan(plans.block_expansion(4, 6, (1, 2)), 2, LINEAR_NAMES, out_norm=True)
    model = extend_methods.build_flexigpt(source, plan, out_norm_init=0.3)
    _visible(model)
    assert model.config.num_hidden_layers == 6
    if getattr(model.config, "layer_types", None) is not None:
        assert model.config.layer_types == [hf.config.layer_types[s] for s in (0, 1, 1, 2, 2, 3)]
    x = _ids()
    torch.testing.assert_close(_cached_logits(model, x, prefill=5), model(x).logits, rtol=1e-4, atol=1e-5)
    generated = model.generate(x[:1, :3], max_new_tokens=9, do_sample=False, use_cache=True)
    assert torch.equal(generated, model.generate(x[:1, :3], max_new_tokens=9, do_sample=False, use_cache=False))


@pytest.mark.parametrize("family", ["gemma2", "olmo2"])
def test_sandwich_output_norms_replace_the_post_norms_and_start_small(tiny_hf, family):
    hf = tiny_hf(family)
    plan = Plan((Position(0), Position(1), Position(1, out_norm=True), Position(3)), 4)
    model = build_from_hf(hf, plan, out_norm_init=0.0)
    layer, fam = model.model.layers[2], family_of(family)
    assert layer.attn_out_norm.kind == "rms" and layer.attn_out_norm.bias is None
    # init 0: the position adds nothing, as if it were dropped; the shared post-norm is not run there
    dropped = build_from_hf(hf, Plan((Position(0), Position(1), Position(3)), 4))
    x = _ids()
    torch.testing.assert_close(model(x).logits, dropped(x).logits, rtol=0, atol=1e-5)
    # a small scale is that scale times the gain of the block it runs (Gemma's 1 + w)
    model = build_from_hf(hf, plan, out_norm_init=0.01)
    layer = model.model.layers[2]
    shared = layer.get_submodule(fam.post_attn_norm).weight
    assert shared is model.model.layers[1].get_submodule(fam.post_attn_norm).weight
    torch.testing.assert_close(layer.attn_out_norm.weight, 0.01 * (fam.norm_offset + shared))


def test_pre_norm_output_norms_are_flexigpts_layernorm(tiny_hf):
    plan = Plan((Position(0), Position(0, out_norm=True), Position(2), Position(3)), 4)
    layer = build_from_hf(tiny_hf("qwen3"), plan).model.layers[1]
    assert isinstance(layer.mlp_out_norm, OutputNorm) and layer.mlp_out_norm.kind == "layernorm"
    assert layer.mlp_out_norm.bias is not None and torch.all(layer.mlp_out_norm.weight == layer.mlp_out_norm.init_scale)


# --------------------------------------------------------------------------- fused linears
def _phi3_as_llama(phi3):
    """The same weights in Llama's layout: qkv_proj and gate_up_proj split into their parts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    c = phi3.config
    config = AutoConfig.for_model("llama", vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                                  num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                                  num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
                                  max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
                                  rope_parameters=c.rope_parameters, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    llama = AutoModelForCausalLM.from_config(config).eval()
    state = {}
    for key, tensor in phi3.state_dict().items():
        if "qkv_proj" in key:
            q, k, v = tensor.split([c.num_attention_heads * c.head_dim] + [c.num_key_value_heads * c.head_dim] * 2)
            state.update({key.replace("qkv_proj", n): t for n, t in (("q_proj", q), ("k_proj", k), ("v_proj", v))})
        elif "gate_up_proj" in key:
            gate, up = tensor.chunk(2)
            state.update({key.replace("gate_up_proj", "gate_proj"): gate, key.replace("gate_up_proj", "up_proj"): up})
        else:
            state[key] = tensor
    llama.load_state_dict(state)
    return llama


def test_fused_phi3_prunes_exactly_as_its_unfused_twin(tiny_hf):
    """Distances, SVD init, LoRA and --ratio work on the logical parts of a fused linear."""
    phi3 = tiny_hf("phi3")
    llama = _phi3_as_llama(phi3)
    x = _ids()
    torch.testing.assert_close(llama(x).logits, phi3(x).logits, rtol=0, atol=1e-5)
    fused, fused_pruning, fused_budget = _pruned(phi3)
    plain, plain_pruning, plain_budget = _pruned(llama)
    assert fused_pruning.sources == plain_pruning.sources and fused_pruning.plan == plain_pruning.plan
    torch.testing.assert_close(fused_pruning.distances, plain_pruning.distances, rtol=1e-9, atol=1e-9)
    assert fused_budget.adapter_params == plain_budget.adapter_params  # the same adapters, stored fused
    assert methods.stored_params(fused) == methods.stored_params(plain)
    qkv = fused.model.layers[fused_pruning.pruned[0]].self_attn.qkv_proj
    assert isinstance(qkv, LoRALinear) and len(qkv.parts) == 3 and qkv.lora_A.shape[0] == 3 * qkv.rank
    torch.testing.assert_close(fused(x).logits, plain(x).logits, rtol=1e-4, atol=1e-5)


def test_fused_linear_adapts_only_its_targeted_parts(tiny_hf):
    plan = Plan((Position(0), Position(0, lora_rank=2, lora_targets=("q_proj", "v_proj", "up_proj")), Position(2), Position(3)), 4)
    model = build_from_hf(tiny_hf("phi3"), plan)
    _visible(model)
    layer = model.model.layers[1]
    qkv, gate_up = layer.self_attn.qkv_proj, layer.mlp.gate_up_proj
    assert qkv.parts == ((0, 32), (48, 16)) and gate_up.parts == ((64, 64),)
    delta = qkv.merged_weight() - qkv.weight
    assert delta[:32].abs().sum() > 0 and torch.all(delta[32:48] == 0) and delta[48:].abs().sum() > 0
    x = torch.randn(3, 32)
    torch.testing.assert_close(qkv(x), x @ qkv.merged_weight().T, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- conversion
FRESH = """
import json, sys, torch
from transformers import AutoModelForCausalLM
x = torch.tensor(json.loads(sys.argv[1]))
out = {}
for folder in sys.argv[3:]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out[folder] = (type(model).__name__, model(x).logits)
assert not any(m.startswith("prunext") for m in sys.modules), "prunext was imported"
torch.save(out, sys.argv[2])
"""


def test_native_to_plain_hf_loads_without_prunext_for_every_family(tiny_hf, tmp_path):
    """Pruned positions with adapters (and, where the family allows, output norms) -> plain HF -> a fresh process."""
    from prunext.cli import main

    x, expected, folders = _ids(), {}, []
    for family in FAMILIES:
        fam = family_of(family)
        norms = fam.out_norm_replaces_post_norm  # Gemma and OLMo-2 express output norms as their post-norms
        plan = Plan((Position(0), Position(1), Position(1, lora_rank=3, lora_targets=LINEAR_NAMES, out_norm=norms),
                     Position(3), Position(0, lora_rank=2, lora_targets=("k_proj", "up_proj"), lora_alpha=4.0)), 4)  # fmt: skip
        model = build_from_hf(tiny_hf(family, window=WINDOW), plan, out_norm_init=0.5)
        _visible(model)
        save_native(model, tmp_path / family / "native")
        hf = tmp_path / family / "hf"
        assert main(["convert", "--from", str(tmp_path / family / "native"), "--to", str(hf), "--format", "hf"]) == 0
        config = json.loads((hf / "config.json").read_text())
        assert config["model_type"] == family and config["num_hidden_layers"] == 5
        assert config["architectures"] == [fam.causal_lm_class]
        if config.get("layer_types"):
            assert config["layer_types"] == [model.config.layer_types[i] for i in range(5)]
        expected[str(hf)] = model(x).logits
        folders.append(str(hf))
    result = tmp_path / "fresh.pt"
    subprocess.run([sys.executable, "-c", FRESH, json.dumps(x.tolist()), str(result), *folders], check=True, timeout=600)
    fresh = torch.load(result)
    for folder, logits in expected.items():
        name, got = fresh[folder]
        assert name == family_of(Path(folder).parent.name).causal_lm_class
        torch.testing.assert_close(got, logits, rtol=1e-5, atol=1e-5, msg=folder)


# --------------------------------------------------------------------------- offloaded scoring
@pytest.mark.parametrize("family", FAMILIES)
def test_offloaded_scoring_equals_in_memory(tiny_hf, tmp_path, family):
    """Every family; among them Gemma-3 (sandwich, local and global rotary, sliding layers), Gemma-2 (scaled
    embeddings, softcapped attention), OLMo-2 (post-norm) and Phi-3 (fused, sliding everywhere)."""
    hf = tiny_hf(family, window=WINDOW)
    hf.save_pretrained(tmp_path / "hf")
    windows = _ids(5, 16, seed=4)
    for metric, window in (("bi", 1), ("angular", 2)):
        memory = score_blocks(hf, windows, metric, window, batch_size=2, progress=False)
        offloaded = score_blocks_offloaded(str(tmp_path / "hf"), windows, metric, window, batch_size=3, progress=False)
        assert offloaded.tokens == memory.tokens
        assert offloaded.scores == pytest.approx(memory.scores, abs=1e-6)


# --------------------------------------------------------------------------- refusal
def test_unknown_family_in_a_folder_is_refused_from_its_config(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=32, n_head=4).save_pretrained(tmp_path / "gpt2")
    (tmp_path / "gpt2" / "model.safetensors").write_bytes(b"not weights: reading them would fail otherwise")
    start = time.perf_counter()
    with pytest.raises(ModelError, match=r"model type 'gpt2' is not supported.*supported: llama, mistral"):
        load_model(str(tmp_path / "gpt2"))
    assert time.perf_counter() - start < 1.0


def test_multimodal_gemma3_is_refused_with_what_to_do(tmp_path):
    (tmp_path / "g3").mkdir()
    (tmp_path / "g3" / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": {}, "vision_config": {}}))
    with pytest.raises(ModelError, match="gemma3_text"):
        load_model(str(tmp_path / "g3"))


def _gguf(path: Path, architecture: str) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((64, 16), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unknown_family_in_a_gguf_is_refused_before_dequantizing(tmp_path):
    path = _gguf(tmp_path / "model.gguf", "gpt2")
    start = time.perf_counter()
    with pytest.raises(ModelError, match="GGUF architecture 'gpt2' is not supported.*llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3"):
        load_model(str(path))
    assert time.perf_counter() - start < 1.0
    with pytest.raises(ModelError, match="GGUF architecture 'gpt2'"):  # a folder holding it, too
        load_model(str(tmp_path))


# --------------------------------------------------------------------------- docs
def test_readme_family_table_matches_the_registry():
    readme = (REPO / "README.md").read_text()
    for fam in REGISTRY.values():
        row = f"| `{fam.model_type}` | {fam.block_shape} | {fam.describe_out_norms()} | {', '.join(fam.tested)} |"
        assert row in readme, row
    rows = re.findall(r"^\| `([a-z0-9_]+)` \| (?:pre-norm|sandwich|post-norm) \|", readme, flags=re.M)
    assert rows == list(REGISTRY)
