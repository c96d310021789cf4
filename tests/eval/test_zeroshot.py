import json
import math
import socket

import pytest
import torch

from prunext.core.checkpoint import build_from_hf, save_native
from prunext.core.plan import Plan, Position
from prunext.eval.tasks import load_docs
from prunext.eval.zeroshot import evaluate_tasks, format_table, run_lm_eval, summarize

LIMIT = 3


@pytest.fixture
def shared_model(tiny_hf):
    """A tiny extended model: block 1 runs twice, the second time with its own LoRA and output norms."""
    plan = Plan(
        [Position(0), Position(1), Position(1, lora_rank=2, lora_targets=("q_proj", "down_proj"), out_norm=True), Position(3)],
        num_source_blocks=4,
    )
    model = build_from_hf(tiny_hf("llama"), plan)
    with torch.no_grad():  # B starts at 0; make the adapters matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(generator=torch.Generator().manual_seed(1))
    return model


@pytest.fixture
def network_attempts(monkeypatch) -> list:
    """Every name lookup or connection tried during the test (refused); lm-eval may swallow the error, the list keeps it."""
    attempts = []

    def refuse(*args):
        attempts.append(args)
        raise OSError(f"no network in this test (tried {args})")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def hand_items(task: str, limit: int) -> list[tuple[list[str], list[str], list[str], int]]:
    """(contexts, continuations, choice texts, gold) per item, from the prompts lm-eval's YAMLs document."""
    items = []
    for doc in load_docs(task).select(range(limit)):
        if task == "piqa":  # piqa.yaml: "Question: {{goal}}\nAnswer:", choices [sol1, sol2]
            choices, gold = [doc["sol1"], doc["sol2"]], doc["label"]
            contexts = [f"Question: {doc['goal']}\nAnswer:"] * 2
            continuations = [" " + c for c in choices]
        elif task == "arc_easy":  # arc_easy.yaml: "Question: {{question}}\nAnswer:", choices.text
            choices, gold = doc["choices"]["text"], doc["choices"]["label"].index(doc["answerKey"])
            contexts = [f"Question: {doc['question']}\nAnswer:"] * len(choices)
            continuations = [" " + c for c in choices]
        elif task == "winogrande":  # preprocess_winogrande.py: each option fills the blank; the rest is scored
            blank = doc["sentence"].index("_")
            choices, gold = [doc["option1"], doc["option2"]], int(doc["answer"]) - 1
            contexts = [doc["sentence"][:blank] + option for option in choices]
            continuations = [" " + doc["sentence"][blank + 1 :].strip()] * 2
        items.append((contexts, continuations, choices, gold))
    return items


@torch.no_grad()
def hand_loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """Summed log p(continuation | context) and whether every continuation token is the argmax.

    Tokenized as lm-eval's HFLM does, one sequence at a time: the continuation is
    what ``tokenize(context + continuation)`` has beyond ``tokenize(context)``;
    a sequence longer than the model's max length + 1 loses tokens on the left.
    """
    assert context == context.rstrip()  # otherwise HFLM moves trailing spaces into the continuation
    whole = tokenizer(context + continuation)["input_ids"]
    n_cont = len(whole) - len(tokenizer(context)["input_ids"])
    ids = whole[-(model.config.max_position_embeddings + 1) :]
    logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].double(), dim=-1)  # (len(ids) - 1, vocab)
    targets = range(len(ids) - n_cont, len(ids))
    ll = sum(logp[t - 1, ids[t]].item() for t in targets)
    return ll, all(logp[t - 1].argmax().item() == ids[t] for t in targets)


def test_zero_shot_equals_a_hand_computation_of_the_loglikelihoods(shared_model, tiny_tokenizer, network_attempts):
    tasks = ["piqa", "arc_easy", "winogrande"]
    shared_model.train()
    pointers = {n: p.data_ptr() for n, p in shared_model.named_parameters(remove_duplicate=False)}
    raw = run_lm_eval(shared_model, tiny_tokenizer, tasks, limit=LIMIT, batch_size=3)
    result = summarize(raw, tasks, LIMIT)

    assert network_attempts == []  # local task data only, nothing fetched
    # evaluated as it is: same shared tensors, mode restored
    assert pointers == {n: p.data_ptr() for n, p in shared_model.named_parameters(remove_duplicate=False)}
    assert shared_model.training
    shared_model.eval()

    for task in tasks:
        samples = sorted(raw["samples"][task], key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in samples] == list(range(LIMIT))  # the first items, in order
        acc, acc_norm = [], []
        for (contexts, continuations, choices, gold), sample in zip(hand_items(task, LIMIT), samples, strict=True):
            assert [list(a) for a in sample["arguments"]] == [list(p) for p in zip(contexts, continuations)]
            lls = [hand_loglikelihood(shared_model, tiny_tokenizer, c, k)[0] for c, k in zip(contexts, continuations)]
            assert [ll for ll, _greedy in sample["filtered_resps"]] == pytest.approx(lls, rel=1e-5, abs=1e-4)
            best = max(range(len(lls)), key=lambda i: lls[i])
            assert sorted(lls)[-1] - sorted(lls)[-2] > 1e-3  # the argmax is not decided by float noise
            acc.append(float(best == gold))
            normed = [ll / len(choice) for ll, choice in zip(lls, choices)]  # characters of the choice, no space
            acc_norm.append(float(max(range(len(normed)), key=lambda i: normed[i]) == gold))
        row = result["tasks"][task]
        assert row["n"] == LIMIT
        assert row["acc"] == pytest.approx(sum(acc) / LIMIT)
        if task == "winogrande":
            assert row["acc_norm"] is None  # lm-eval's winogrande defines acc only
        else:
            assert row["acc_norm"] == pytest.approx(sum(acc_norm) / LIMIT)
    assert result["average"] == pytest.approx(sum(result["tasks"][t]["acc"] for t in tasks) / len(tasks))


def test_lambada_reports_greedy_accuracy_and_target_perplexity(tiny_hf, tiny_tokenizer):
    model = build_from_hf(tiny_hf("llama"), Plan.identity(4))
    limit = 4
    result = evaluate_tasks(model, tiny_tokenizer, ["lambada"], limit=limit, batch_size=2)

    hand = []
    for text in load_docs("lambada").select(range(limit))["text"]:
        context, word = text.rsplit(" ", 1)  # lambada_openai.yaml: the last space-separated word is the target
        hand.append(hand_loglikelihood(model, tiny_tokenizer, context, " " + word))
    row = result["tasks"]["lambada"]
    assert row["n"] == limit and row["acc_norm"] is None
    assert row["acc"] == sum(greedy for _, greedy in hand) / limit
    # lm-eval's perplexity aggregation: exp(-mean of per-item summed log-likelihoods)
    assert row["perplexity"] == pytest.approx(math.exp(-sum(ll for ll, _ in hand) / limit), rel=1e-4)
    json.dumps(result)  # the report is plain JSON


def test_table_lists_every_task_and_marks_missing_metrics():
    result = {
        "tasks": {
            "piqa": {"acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.75, "acc_norm_stderr": 0.1, "n": 4},
            "winogrande": {"acc": 0.25, "acc_stderr": 0.1, "acc_norm": None, "n": 4},
        },
        "average": 0.375,
    }
    lines = format_table(result).splitlines()
    assert [line.split()[0] for line in lines[:1] + lines[2:]] == ["task", "piqa", "winogrande", "average"]
    assert lines[2].split()[2:] == ["0.5000", "±", "0.1000", "0.7500", "±", "0.1000", "-"]
    assert lines[3].split()[2:] == ["0.2500", "±", "0.1000", "-", "-"] and lines[4].split()[1] == "0.3750"


def test_cli_unknown_task_is_one_line_and_exit_2(capsys):
    from prunext.cli import main

    code = main(["eval", "--model", "/nonexistent/model", "--tasks", "piqa,nope"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "unknown task nope" in err and "known tasks: piqa, hellaswag" in err  # refused before loading the model


def test_cli_writes_perplexity_and_tasks_to_json(tmp_path, tiny_hf, tiny_tokenizer, capsys):
    from prunext.cli import main

    save_native(build_from_hf(tiny_hf("llama"), Plan.identity(4)), tmp_path / "model", tokenizer=tiny_tokenizer)
    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog.\n" * 40)
    out = tmp_path / "eval.json"
    args = ["eval", "--model", str(tmp_path / "model"), "--ppl", str(tmp_path / "text.txt"), "--seq-len", "32"]
    assert main(args + ["--tasks", "arc_easy", "--limit", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["perplexity"]["seq_len"] == 32 and report["perplexity"]["ppl"] > 1
    assert report["tasks"]["arc_easy"]["n"] == 2 and report["average"] == report["tasks"]["arc_easy"]["acc"]
    assert report["lm_eval_version"] == "0.4.13" and "characters" in report["conventions"]["acc_norm"]
    assert "arc_easy" in capsys.readouterr().out


@pytest.mark.integration
def test_builtin_model_beats_chance_on_piqa(builtin_model_dir):
    from prunext.core.loading import load_model

    model, tokenizer = load_model(str(builtin_model_dir))
    result = evaluate_tasks(model, tokenizer, ["piqa"], limit=20, batch_size=8)
    # SmolLM2-135M scores about 0.68 on all of PIQA; chance is 0.5. These 20 items are fixed, so this is deterministic.
    assert result["tasks"]["piqa"]["n"] == 20
    assert result["tasks"]["piqa"]["acc"] > 0.5
