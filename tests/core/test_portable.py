"""prunext/core/portable.py: every native folder carries code that loads it with transformers alone.

The folders are the ones prunext's commands write (``native_folders`` in
conftest.py: prune, extend, train's ``final/``, convert from a ZeRO-3
checkpoint). They are loaded in a fresh process where prunext cannot be
imported (tests/no_prunext), with ``trust_remote_code=True``, and compared
with prunext's own load of the same folder.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from no_prunext import run_without_prunext
from prunext.core.card import stored_parameters
from prunext.core.checkpoint import load_native
from prunext.core.model import PrunextForCausalLM
from prunext.core.portable import (
    AUTO_MAP,
    CONFIG_FILE,
    CONFIG_MODULES,
    MODELING_FILE,
    MODELING_MODULES,
    PortableCodeError,
    code_differences,
    inline,
    portable_sources,
)

FRESH_LOAD = Path(__file__).with_name("_fresh_load.py")
NATIVE = ("pruned", "extended", "final", "converted")
GREEDY = {"do_sample": False, "max_new_tokens": 10, "min_new_tokens": 10, "pad_token_id": 0}


def test_generated_files_are_the_package_modules_whole():
    sources = portable_sources()
    assert set(sources) == {CONFIG_FILE, MODELING_FILE}
    for name, modules in ((CONFIG_FILE, CONFIG_MODULES), (MODELING_FILE, MODELING_MODULES)):
        text = sources[name]
        compile(text, name, "exec")
        for module in modules:
            assert inline(module).body in text, module
        imports = [n for n in ast.walk(ast.parse(text)) if isinstance(n, (ast.Import, ast.ImportFrom))]
        tops = {a.name.split(".")[0] for n in imports if isinstance(n, ast.Import) for a in n.names}
        tops |= {n.module.split(".")[0] for n in imports if isinstance(n, ast.ImportFrom) and n.level == 0}
        assert "prunext" not in tops and tops <= {"__future__", "dataclasses", "functools", "importlib", "math",
                                                  "torch", "transformers", "safetensors"}, tops
        relative = {n.module for n in imports if isinstance(n, ast.ImportFrom) and n.level > 0}
        assert relative == ({"configuration_prunext"} if name == MODELING_FILE else set())


@pytest.mark.parametrize("name", NATIVE)
def test_every_native_folder_carries_the_code_this_prunext_writes(native_folders, name):
    folder = native_folders[name]
    assert code_differences(folder) == []
    assert all((folder / f).read_text() == text for f, text in portable_sources().items())
    assert json.loads((folder / "config.json").read_text())["auto_map"] == AUTO_MAP


def test_a_dense_folder_carries_no_code(native_folders):
    folder = native_folders["dense"]
    assert not (folder / MODELING_FILE).exists() and "auto_map" not in json.loads((folder / "config.json").read_text())


@pytest.fixture(scope="module")
def fresh(native_folders, tmp_path_factory):
    """What a process without prunext saw when loading each native folder (one process for all)."""
    where = tmp_path_factory.mktemp("fresh")
    out = where / "fresh.pt"
    proc = run_without_prunext([sys.executable, FRESH_LOAD, out, *(native_folders[n] for n in NATIVE)], cwd=where)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {name: result for name, result in zip(NATIVE, torch.load(out).values())}


@pytest.mark.parametrize("name", NATIVE)
def test_folder_loads_without_prunext_as_prunext_loads_it(native_folders, fresh, name):
    got = fresh[name]
    assert got["class"].startswith("transformers_modules.") and got["class"].endswith("modeling_prunext.PrunextForCausalLM")
    ours = load_native(native_folders[name], dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(got["logits"], ours(got["ids"]).logits, rtol=0, atol=1e-6)
    assert torch.equal(got["cached"], got["uncached"])  # generation with the KV cache is right
    assert torch.equal(got["cached"], ours.generate(got["ids"][:1, :6], **GREEDY))
    shared, same = got["sharing"]
    assert shared > 0 and same == shared  # every reused base tensor is its home position's very Parameter
    assert got["unique_params"] == stored_parameters(native_folders[name]) == sum(p.numel() for p in ours.parameters())


def test_with_prunext_imported_transformers_loads_through_prunext(native_folders):
    folder = native_folders["pruned"]
    for trust in (True, False):
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust)
        assert type(model) is PrunextForCausalLM
    assert type(AutoConfig.from_pretrained(folder, trust_remote_code=True)).__module__ == "prunext.core.config"


def _copy(native_folders, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(native_folders["pruned"], copy)
    return copy


def test_missing_code_still_loads_through_prunext_and_fails_in_transformers_words_without_it(native_folders, tmp_path):
    folder = _copy(native_folders, tmp_path)
    (folder / MODELING_FILE).unlink()
    want = load_native(native_folders["pruned"])
    for model in (load_native(folder), AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)):
        assert type(model) is PrunextForCausalLM
        assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, want.model.layers[0].self_attn.q_proj.weight)
    proc = run_without_prunext([sys.executable, FRESH_LOAD, "--try", folder], cwd=tmp_path)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert proc.stdout.startswith("OSError: ") and MODELING_FILE in proc.stdout, proc.stdout


def test_edited_code_is_ignored_by_prunext_and_named_in_a_warning(native_folders, tmp_path, caplog):
    folder = _copy(native_folders, tmp_path)
    with (folder / MODELING_FILE).open("a") as f:
        f.write("\nraise RuntimeError('this file was edited')\n")
    with caplog.at_level(logging.WARNING, logger="prunext.core.checkpoint"):
        model = load_native(folder)
    assert type(model) is PrunextForCausalLM
    assert type(AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)) is PrunextForCausalLM
    assert code_differences(folder) == [MODELING_FILE]
    assert any(MODELING_FILE in r.getMessage() and "differ from what this prunext writes" in r.getMessage() for r in caplog.records)


def test_without_auto_map_transformers_says_the_model_type_is_unknown(native_folders, tmp_path):
    folder = _copy(native_folders, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    del config["auto_map"]
    (folder / "config.json").write_text(json.dumps(config))
    assert code_differences(folder) == ["config.json auto_map"]
    assert type(load_native(folder)) is PrunextForCausalLM
    proc = run_without_prunext([sys.executable, FRESH_LOAD, "--try", folder], cwd=tmp_path)
    assert proc.returncode == 3 and "model type `prunext`" in proc.stdout, proc.stdout + proc.stderr


def test_without_trust_remote_code_transformers_asks_for_it(native_folders, tmp_path):
    proc = run_without_prunext([sys.executable, FRESH_LOAD, "--try", native_folders["pruned"], "--no-trust"], cwd=tmp_path)
    assert proc.returncode == 3 and "ValueError: " in proc.stdout, proc.stdout + proc.stderr
    error = proc.stdout[proc.stdout.index("ValueError: "):]
    assert "contains custom code" in error and "trust_remote_code=True" in error, error


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("import prunext.core.plan\n", "`import prunext...` cannot be inlined"),
        ("from prunext.core.plan import Plan as P\n", "as ...` or `*` cannot be inlined"),
        ("def f():\n    from prunext.core.plan import Plan\n    return Plan\n", "inside a block cannot be inlined"),
    ],
)
def test_a_module_that_cannot_be_inlined_is_refused(tmp_path, monkeypatch, source, message):
    (tmp_path / "portable_case.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("portable_case", None)
    with pytest.raises(PortableCodeError, match=re.escape(message)):
        inline("portable_case")


def test_the_built_in_cache_written_by_another_version_gets_this_versions_code(native_folders, tmp_path, monkeypatch,
                                                                                caplog):  # fmt: skip
    from prunext.core.loading import BUILTIN_FORMAT, builtin_folder

    monkeypatch.setenv("PRUNEXT_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "models" / f"smollm2-135m-v{BUILTIN_FORMAT}"
    shutil.copytree(native_folders["pruned"], cached)  # stands in for a converted built-in model
    weights = {p.name: p.read_bytes() for p in cached.glob("*.safetensors")}
    with (cached / MODELING_FILE).open("a") as f:
        f.write("\n# written by an earlier prunext\n")
    assert code_differences(cached) == [MODELING_FILE]
    with caplog.at_level(logging.INFO):
        assert builtin_folder("smollm2-135m") == cached  # no conversion: the folder is there
        load_native(cached)
    assert code_differences(cached) == [] and not list(cached.glob(".*"))  # no temporary file left
    assert {p.name: p.read_bytes() for p in cached.glob("*.safetensors")} == weights
    assert any("rewritten as this prunext writes them" in r.getMessage() for r in caplog.records)
    assert not any("differ from what this prunext writes" in r.getMessage() for r in caplog.records)
