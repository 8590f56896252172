"""engram-jax as an lm-evaluation-harness model: scores equal the model's own, and the
command runs tasks defined here over local JSON files (offline)."""

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the tasks below read local files only
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("lm_eval")

import jax  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from train.lm_eval_model import EngramLM, bucket  # noqa: E402

MC_TASK = """task: engram_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""

ROLLING_TASK = """task: engram_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""

QUESTIONS = [("alpha beta gamma delta", [" epsilon", " omega", " mu"], 0),
             ("iota kappa lambda", [" pi rho", " mu nu", " chi"], 1),
             ("sigma tau upsilon phi chi", [" psi", " alpha"], 0),
             ("eta theta", [" iota kappa", " beta"], 0)]
TEXTS = ["alpha beta gamma delta epsilon zeta = 3",
         "mu nu xi omicron pi rho sigma tau upsilon phi chi psi omega alpha beta gamma = 5 " * 3]


@pytest.fixture(scope="module")
def trained():
    import micro_runs
    from train.evaluate import Trained

    return Trained(micro_runs.trained_run(engram=True))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    (root / "mc.jsonl").write_text("\n".join(json.dumps({"question": q, "choices": c, "answer": a})
                                             for q, c, a in QUESTIONS))
    (root / "texts.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS))
    (root / "engram_mc.yaml").write_text(MC_TASK.format(data=root / "mc.jsonl"))
    (root / "engram_rolling.yaml").write_text(ROLLING_TASK.format(data=root / "texts.jsonl"))
    return root


# The direct computation's one row length: every test text fits (the longest is 130 ids).
DIRECT_LENGTH = 160


@pytest.fixture(scope="module")
def direct(trained):
    """`direct(tokens, scored)`: the model's own summed log-probability of the last
    `scored` of `tokens`, each given all tokens before it, from one row of the model's
    logits (`Trained.apply`, right-padded to DIRECT_LENGTH, jitted once): no harness code."""
    log_softmax = jax.jit(lambda row, hash_ids: jax.nn.log_softmax(trained.apply(row, hash_ids)[0], axis=-1))

    def log_prob(tokens: list[int], scored: int) -> float:
        assert len(tokens) <= DIRECT_LENGTH
        row = np.full((1, DIRECT_LENGTH), tokens[0], np.int32)  # [1, T]
        row[0, : len(tokens)] = tokens
        log_probs = np.asarray(log_softmax(row, trained.hasher(row)))  # [T, V]
        picked = log_probs[np.arange(len(tokens) - 1), row[0, 1: len(tokens)]]  # [len - 1]
        return float(picked[-scored:].sum())

    return log_prob


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_buckets_are_powers_of_two_within_the_maximum():
    assert [bucket(n, 64) for n in (1, 16, 17, 33, 64)] == [16, 16, 32, 64, 64]
    assert bucket(33, 40) == 40


def test_harness_loglikelihood_equals_the_models_own_log_probability(trained, direct):
    model = EngramLM(trained=trained, batch_size=3)
    args = [(q, c) for q, choices, _ in QUESTIONS for c in choices] + [("", "alpha beta")]
    got = model.loglikelihood(requests("loglikelihood", args))
    for (context, continuation), (log_prob, _) in zip(args, got):
        whole = trained.encode(context + continuation)  # the end-of-document id, then the text
        scored = len(whole) - len(trained.encode(context))
        assert log_prob == pytest.approx(direct(whole, scored), abs=1e-4)
    assert len({round(lp, 3) for lp, _ in got}) > 5  # the scores differ: a real comparison
    # One compilation per [B, T] bucket that ran: the short rows share the 16 bucket.
    assert model.shapes == {(3, 16)} and model._log_probs._cache_size() == len(model.shapes)


def test_generate_until_is_the_greedy_continuation_cut_at_a_stop_string(trained):
    model = EngramLM(trained=trained, batch_size=2)
    contexts = ["alpha beta gamma", "mu nu", "sigma tau upsilon phi"]
    texts = model.generate_until(requests("generate_until", [(c, {"until": [], "max_gen_toks": 6})
                                                             for c in contexts]))
    for context, text, ids in zip(contexts, texts, model.generated_ids):
        assert text == trained.tokenizer.decode(ids) and 1 <= len(ids) <= 6
        # Every new id is the argmax of the full forward (no cache) at its position.
        (_, greedy), = model.score([(trained.encode(context), ids)])
        assert greedy
    stop = texts[0][len(texts[0]) // 2:][:2]  # a string the first continuation holds
    cut = model.generate_until(requests("generate_until", [(contexts[0], {"until": [stop], "max_gen_toks": 6})]))
    assert cut == [texts[0][: texts[0].find(stop)]]


def test_rolling_loglikelihood_sums_disjoint_windows(trained, direct):
    text = TEXTS[1]
    ids = trained.tokenizer.encode(text).ids
    assert 64 < len(ids) < DIRECT_LENGTH
    whole = EngramLM(trained=trained, batch_size=2, max_length=DIRECT_LENGTH).loglikelihood_rolling(
        requests("loglikelihood_rolling", [(text,)]))[0]
    assert whole == pytest.approx(direct(trained.encode(text), len(ids)), abs=1e-3)
    # In windows of 16 predicted tokens, each after at most 15 tokens of context.
    windowed = EngramLM(trained=trained, batch_size=2, max_length=16).loglikelihood_rolling(
        requests("loglikelihood_rolling", [(text,)]))[0]
    expected, start = 0.0, 0
    context = [trained.encode("")[0]] + ids
    while start < len(ids):
        end = min(start + 16, len(ids))
        window = context[max(0, end - 16): end + 1]  # up to 16 inputs, then the last target
        expected += direct(window, end - start)
        start = end
    assert windowed == pytest.approx(expected, abs=1e-3)
    assert abs(windowed - whole) > 1e-2  # less context: another score


@pytest.mark.slow
def test_engram_eval_runs_local_tasks_with_engram_on_and_off(trained, direct, task_dir, capsys):
    import micro_runs
    from train.main import eval_main

    run = micro_runs.trained_run(engram=True)
    assert eval_main(["--checkpoint", str(run), "--tasks", "engram_mc,engram_rolling", "--include-path",
                      str(task_dir), "--engram-off", "--no-validation", "--batch-size", "4",
                      "--max-length", str(DIRECT_LENGTH)]) == 0  # no text is cut into windows
    out = capsys.readouterr().out
    assert "lm-eval, Engram on" in out and "lm-eval, Engram off" in out and "Engram off at layers [1]" in out
    saved = json.loads((run / "eval" / "lm_eval_step8.json").read_text())
    assert saved["engram_off"] == [1] and saved["tasks"] == ["engram_mc", "engram_rolling"]
    # Accuracy is what the model's own log-probabilities choose.
    chosen = [int(np.argmax([direct(trained.encode(q + c), len(trained.encode(q + c))
                                             - len(trained.encode(q))) for c in choices]))
              for q, choices, _ in QUESTIONS]
    accuracy = np.mean([c == a for c, (_, _, a) in zip(chosen, QUESTIONS)])
    assert saved["on"]["results"]["engram_mc"]["acc,none"] == pytest.approx(accuracy)
    # Bits per byte of the rolling task: its summed log-probabilities over the texts' bytes.
    total = sum(direct(trained.encode(t), len(trained.tokenizer.encode(t).ids)) for t in TEXTS)
    bits = -total / np.log(2) / sum(len(t.encode()) for t in TEXTS)
    assert saved["on"]["results"]["engram_rolling"]["bits_per_byte,none"] == pytest.approx(bits, rel=1e-4)
    off = json.loads((run / "eval" / "engram_off.json").read_text())
    rows = {(r["name"], r["metric"]): r for r in off["scores"]}
    assert rows["engram_rolling", "bits_per_byte"]["on"] == pytest.approx(bits, rel=1e-4)
    assert rows["engram_rolling", "bits_per_byte"]["off"] != pytest.approx(bits, rel=1e-4)


@pytest.mark.slow
def test_an_unknown_task_is_one_line(task_dir, capsys):
    import micro_runs
    from train.main import eval_main

    code = eval_main(["--checkpoint", str(micro_runs.trained_run(engram=True)), "--tasks", "engram_mc,no_such_task",
                      "--include-path", str(task_dir)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("engram-eval: error: unknown task(s) no_such_task: not among lm-eval's tasks")
