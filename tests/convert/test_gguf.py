"""native -> GGUF: transformers' own GGUF loader reads the file back with the same logits and tokenizer."""

import json

import numpy as np
import pytest
import torch

from prunext.cli import main
from prunext.convert.gguf import permute_qk
from prunext.core.checkpoint import build_from_hf, save_native
from prunext.core.plan import LINEAR_NAMES, Plan, Position

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Anarchism is a political philosophy and movement."]


def shortgpt_lora_plan() -> Plan:
    """A shortgpt-lora plan: block 2 dropped, LoRA on every kept block (merged on export)."""
    return Plan(tuple(Position(b, lora_rank=3, lora_targets=LINEAR_NAMES) for b in (0, 1, 3)), num_source_blocks=4)


def _native(tiny_hf, tiny_tokenizer, folder, family, plan):
    model = build_from_hf(tiny_hf(family), plan)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    save_native(model, folder, tokenizer=tiny_tokenizer)
    return model.eval()


def _load_gguf(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.parametrize("family, plan", [("llama", None), ("llama", "shortgpt-lora"), ("mistral", "shortgpt-lora"), ("qwen2", "shortgpt-lora")])
def test_gguf_round_trip_equal_logits_and_tokens(tiny_hf, tiny_tokenizer, tmp_path, family, plan):
    plan = Plan.identity(4) if plan is None else shortgpt_lora_plan()
    model = _native(tiny_hf, tiny_tokenizer, tmp_path / "native", family, plan)
    out = tmp_path / "out" / "model.gguf"
    assert main(["convert", "--from", str(tmp_path / "native"), "--to", str(out), "--format", "gguf"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.gguf"]  # no temporary file left
    loaded, tokenizer = _load_gguf(out)
    assert len(loaded.model.layers) == len(plan)
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)
    for text in SENTENCES:
        assert tokenizer(text).input_ids == tiny_tokenizer(text).input_ids
    assert tokenizer.eos_token == tiny_tokenizer.eos_token


def test_gguf_half_precision_and_chat_template(tiny_hf, tiny_tokenizer, tmp_path):
    import gguf

    tiny_tokenizer = type(tiny_tokenizer).from_pretrained(_save_tok(tiny_tokenizer, tmp_path / "tok"))
    tiny_tokenizer.chat_template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    model = _native(tiny_hf, tiny_tokenizer, tmp_path / "native", "llama", shortgpt_lora_plan())
    for dtype, qtype, atol in (("float16", gguf.GGMLQuantizationType.F16, 2e-2), ("bfloat16", gguf.GGMLQuantizationType.BF16, 1e-1)):
        out = tmp_path / f"{dtype}.gguf"
        assert main(["convert", "--from", str(tmp_path / "native"), "--to", str(out), "--format", "gguf", "--dtype", dtype]) == 0
        reader = gguf.GGUFReader(out)
        types = {t.name: t.tensor_type for t in reader.tensors}
        assert types["blk.0.attn_q.weight"] == qtype and types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
        loaded, tokenizer = _load_gguf(out)
        x = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=atol)
        assert tokenizer.chat_template == tiny_tokenizer.chat_template


def _save_tok(tok, folder):
    tok.save_pretrained(folder)
    return folder


def test_permutation_is_what_the_loader_reverses():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(4 * 8, 16)  # 4 kv heads of dim 8
    processor = LlamaTensorProcessor(config={"num_attention_heads": 8, "num_key_value_heads": 4})
    back = processor.process(permute_qk(w, 8, 4).numpy(), "blk.0.attn_k.weight").weights
    np.testing.assert_array_equal(back, w.numpy())
    assert not torch.equal(permute_qk(w, 8, 4), w)


@pytest.mark.parametrize(
    "case, message",
    [
        ("out_norm", "--format gguf cannot express output feature normalization (positions [1])"),
        ("exists", "exists; choose another file or pass --overwrite"),
        ("folder", "give a path ending in .gguf"),
    ],
)
def test_gguf_bad_input_is_one_line_and_writes_nothing(tiny_hf, tiny_tokenizer, tmp_path, capsys, case, message):
    plan = Plan((Position(0), Position(0, lora_rank=2, lora_targets=LINEAR_NAMES, out_norm=True), Position(2)), 4)
    _native(tiny_hf, tiny_tokenizer, tmp_path / "native", "llama", plan if case == "out_norm" else Plan.identity(4))
    out = tmp_path / "model.gguf"
    if case == "exists":
        out.write_text("mine")
    if case == "folder":
        out = tmp_path / "gguf-out"
    code = main(["convert", "--from", str(tmp_path / "native"), "--to", str(out), "--format", "gguf"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("prunext convert: error: ") and message in err[-1], err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["native"] + (["model.gguf"] if case == "exists" else []))
    if case == "exists":
        assert out.read_text() == "mine"


def test_gguf_refuses_rope_scaling_and_overwrites_when_asked(tiny_hf, tiny_tokenizer, tmp_path, capsys):
    hf = tiny_hf("llama")
    hf.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    hf.save_pretrained(tmp_path / "plain")
    tiny_tokenizer.save_pretrained(tmp_path / "plain")
    assert main(["convert", "--from", str(tmp_path / "plain"), "--to", str(tmp_path / "a.gguf"), "--format", "gguf"]) == 2
    assert "rope scaling of type 'linear'" in capsys.readouterr().err and not (tmp_path / "a.gguf").exists()

    _native(tiny_hf, tiny_tokenizer, tmp_path / "native", "llama", Plan.identity(4))
    (tmp_path / "b.gguf").write_text("old")
    assert main(["convert", "--from", str(tmp_path / "native"), "--to", str(tmp_path / "b.gguf"), "--format", "gguf", "--overwrite"]) == 0
    assert (tmp_path / "b.gguf").read_bytes()[:4] == b"GGUF"
    assert json.loads((tmp_path / "native" / "config.json").read_text())["model_type"] == "prunext"


def _gemma(family: str, layers: int):
    """A tiny Gemma as GGUF readers assume one: Gemma's own layer pattern, query scale 256 = head size, softcaps."""
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0} if family == "gemma2" else {}
    config = AutoConfig.for_model(family, vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                                  sliding_window=8, max_position_embeddings=256, **extra)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms start at 0 (Gemma's 1 + w): perturb them so the +1 on export is seen
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize(
    "family, plan",
    [
        ("phi3", Plan.identity(4)),
        ("phi3", shortgpt_lora_plan()),  # fused qkv / gate_up: each part's adapter merged into its rows
        ("gemma2", Plan.identity(4)),
        # flexigpt on a sandwich family: replacements keep Gemma 2's sliding/full alternation, output norms become post norms
        ("gemma2", Plan((Position(0), Position(1), Position(0, 3, LINEAR_NAMES, out_norm=True), Position(1, 3, LINEAR_NAMES, out_norm=True)), 4)),
        ("gemma3_text", Plan.identity(6)),
    ],
    ids=["phi3", "phi3-shortgpt-lora", "gemma2", "gemma2-flexigpt", "gemma3"],
)
def test_gguf_round_trip_more_families(tiny_hf, tiny_tokenizer, tmp_path, family, plan):
    hf = tiny_hf(family) if family == "phi3" else _gemma(family, plan.num_source_blocks)
    model = build_from_hf(hf, plan)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "_out_norm" in name:
                p.normal_(0, 0.3) if "lora_B" in name else p.add_(0.2)
    save_native(model, tmp_path / "native", tokenizer=tiny_tokenizer)
    out = tmp_path / "model.gguf"
    assert main(["convert", "--from", str(tmp_path / "native"), "--to", str(out), "--format", "gguf", "--verify"]) == 0
    loaded, tokenizer = _load_gguf(out)
    assert loaded.config.model_type == family and len(loaded.model.layers) == len(plan)
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))  # longer than the sliding window
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model.eval()(x).logits, rtol=1e-5, atol=1e-5)
    assert tokenizer(SENTENCES[0]).input_ids == tiny_tokenizer(SENTENCES[0]).input_ids


@pytest.mark.parametrize(
    "case, message",
    [
        ("gemma2-dropped", "full-attention layers are [1, 2], but GGUF readers assume every 2th layer of a gemma2 is full"),
        ("gemma2-scale", "query_pre_attn_scalar is 8, but GGUF readers assume 256"),
        ("olmo2", "does not write model type 'olmo2': transformers' GGUF loader cannot read OLMo-2 files"),
    ],
)
def test_gguf_refuses_what_readers_would_misread(tiny_hf, tiny_tokenizer, tmp_path, capsys, case, message):
    if case == "gemma2-dropped":  # block 2 dropped: S F F, not Gemma 2's alternation
        model = build_from_hf(_gemma("gemma2", 4), Plan((Position(0), Position(1), Position(3)), 4))
    elif case == "gemma2-scale":
        model = build_from_hf(tiny_hf("gemma2"), Plan.identity(4))  # conftest's tiny Gemma 2: query scale 8
    else:
        model = build_from_hf(tiny_hf("olmo2"), Plan.identity(4))
    save_native(model, tmp_path / "native", tokenizer=tiny_tokenizer)
    assert main(["convert", "--from", str(tmp_path / "native"), "--to", str(tmp_path / "m.gguf"), "--format", "gguf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1], err
    assert not (tmp_path / "m.gguf").exists()


def _sentencepiece_tokenizer(style: str):
    """A sentencepiece-style BPE tokenizer (byte fallback, "▁" for spaces) trained offline, as transformers builds
    Llama 2's (``llama``: a "▁" before the text) or Gemma's (``gemma``: none) from a vocabulary and merges."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GemmaTokenizer, LlamaTokenizer

    specials = ["<unk>", "<s>", "</s>"] if style == "llama" else ["<pad>", "<eos>", "<bos>", "<unk>"]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials + [f"<0x{b:02X}>" for b in range(256)])
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first" if style == "llama" else "never")
    tok.train_from_iterator(SENTENCES * 20, trainer)
    spec = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    if style == "llama":
        # a padding token, as Phi-3's has (transformers' own Phi-3 default, 32000, lies outside a tiny vocabulary)
        return LlamaTokenizer(vocab=spec["vocab"], merges=merges, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>")
    return GemmaTokenizer(vocab=spec["vocab"], merges=merges)


@pytest.mark.parametrize("family, style", [("llama", "llama"), ("phi3", "llama"), ("gemma2", "gemma")])
def test_gguf_sentencepiece_tokenizers_round_trip(tiny_hf, tmp_path, family, style):
    """Llama 2 / Phi-3 / Gemma style vocabularies: tokens, scores, byte tokens and the space prefix survive."""
    tokenizer = _sentencepiece_tokenizer(style)
    if family == "gemma2":
        hf = _gemma("gemma2", 4)
        hf.resize_token_embeddings(len(tokenizer))  # Gemma's tokenizer adds <mask> after the trained vocabulary
    else:
        hf = tiny_hf(family, vocab=320)
    model = build_from_hf(hf, Plan.identity(4))
    save_native(model, tmp_path / "native", tokenizer=tokenizer)
    out = tmp_path / "model.gguf"
    assert main(["convert", "--from", str(tmp_path / "native"), "--to", str(out), "--format", "gguf"]) == 0
    loaded, back = _load_gguf(out)
    for text in [*SENTENCES, "The fox: naïve café ünïcode", "a  b"]:  # unseen characters go through byte tokens
        assert back(text).input_ids == tokenizer(text).input_ids, text
        assert back.decode(back(text).input_ids, skip_special_tokens=True) == tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True)
    x = torch.randint(0, 320, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model.eval()(x).logits, rtol=1e-5, atol=1e-5)
