"""Cloze paraphrase detection: answer position under both paddings, one prompt for every
split, Quora reading (quotes, missing fields), offline carving, training and output files."""

from __future__ import annotations

import pytest
import torch

import paraphrase_detection as para
from config import get_config
from engine.data import DataFormatError, PadCollator
from errors import InputError
from models.gpt2 import GPT2Model
from models.heads import NO_TOKEN_ID, YES_TOKEN_ID, ClozeParaphraseScorer
from models.loading import SHARED_TOKENIZER
from optimizer import AdamW
from tasks.paraphrase import score_paraphrase_pairs
from tasks.quora_data import (
    PARAPHRASE_PROMPT,
    ParaphrasePair,
    carve_quora_splits,
    encode_paraphrase_prompt,
    load_quora_splits,
    paraphrase_features,
    read_quora,
)
from tasks.restore import restore_task_model
from tests.conftest import SHARED_DATA


@pytest.fixture(scope="module")
def scorer() -> ClozeParaphraseScorer:
    torch.manual_seed(0)
    gpt = GPT2Model(get_config("tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    return ClozeParaphraseScorer(gpt).eval()


def pad(seqs: list[list[int]], side: str, pad_id: int = 50256) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad_id)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        ids[i, sl] = torch.tensor(s)
        mask[i, sl] = 1
    return ids, mask


@pytest.mark.parametrize("side", ["right", "left"])
def test_answer_read_at_last_real_token(scorer, side):
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 50000, (n,), generator=g).tolist() for n in (7, 3, 12, 1)]
    ids, mask = pad(seqs, side)
    with torch.no_grad():
        batched = scorer(ids, mask)  # (B, V)
        for i, s in enumerate(seqs):
            alone = scorer(torch.tensor([s]))  # (1, V), no padding at all
            torch.testing.assert_close(batched[i], alone[0], atol=1e-4, rtol=1e-4)
        # Reading the position the other padding would use lands on a pad and gives other
        # logits, so the comparison above can fail.
        wrong_pos = -1 if side == "right" else len(seqs[1]) - 1
        wrong = scorer.gpt.hidden_state_to_token(scorer.gpt(ids, mask)["last_hidden_state"][1, wrong_pos])
        assert not torch.allclose(wrong, batched[1], atol=1e-3)


def test_answer_logits_are_the_two_vocab_columns(scorer):
    ids, mask = pad([[10, 20, 30], [40, 50]], "right")
    with torch.no_grad():
        full = scorer(ids, mask)  # (B, V)
        two = scorer.answer_logits(ids, mask)  # (B, 2)
        p = scorer.p_yes(ids, mask)
    torch.testing.assert_close(two, full[:, [NO_TOKEN_ID, YES_TOKEN_ID]])
    torch.testing.assert_close(p, two.softmax(-1)[:, 1])
    assert ClozeParaphraseScorer.answer_token([1, 0]) == [8505, 3919]


def test_full_vocab_loss_is_cross_entropy_on_token_ids(scorer):
    ids, mask = pad([[10, 20, 30], [40, 50]], "left")
    labels = torch.tensor([1, 0])
    with torch.no_grad():
        full = scorer(ids, mask)
        expected = torch.nn.functional.cross_entropy(full, torch.tensor([8505, 3919]))
        restricted = torch.nn.functional.cross_entropy(full[:, [3919, 8505]], labels)
        torch.testing.assert_close(scorer.loss(ids, mask, labels, full_vocab=True), expected)
        torch.testing.assert_close(scorer.loss(ids, mask, labels), restricted)


# ----------------------------------------------------------------- prompts and truncation


def test_one_prompt_for_every_split_and_answer_token_follows(tokenizer):

    labeled = ParaphrasePair("a", "How do I learn Python?", 'What is "Python"?', 1)
    unlabeled = ParaphrasePair("a", "How do I learn Python?", 'What is "Python"?', None)
    train_f, test_f = paraphrase_features([labeled, unlabeled], tokenizer, 1024)
    assert train_f["input_ids"] == test_f["input_ids"]
    assert train_f["labels"] == 1 and "labels" not in test_f
    text = tokenizer.decode(train_f["input_ids"])
    assert text == PARAPHRASE_PROMPT.format(s1=labeled.sentence1, s2=labeled.sentence2)
    # Quotes close around both questions (the starter's train prompt left the second one open).
    assert text.count('"') == 6 and text.endswith("Are these questions asking the same thing?\n")
    # The answer the model is trained to give is the next token of the same text.
    for word, token in (("yes", YES_TOKEN_ID), ("no", NO_TOKEN_ID)):
        assert tokenizer.encode(text + word) == train_f["input_ids"] + [token]


def test_truncation_cuts_questions_not_the_cue(tokenizer, capsys):

    long_q = "Why " + "really " * 80 + "?"
    ids, cut = encode_paraphrase_prompt(tokenizer, long_q, "Short one?", 48)
    assert cut and len(ids) <= 48
    text = tokenizer.decode(ids)
    assert text.endswith('"\nAre these questions asking the same thing?\n')
    assert 'Question 2: "Short one?"' in text  # the longer question was cut, the short one kept
    ids, cut = encode_paraphrase_prompt(tokenizer, "Short?", "Also short?", 48)
    assert not cut
    pairs = [ParaphrasePair(str(i), long_q if i % 2 else "Hi?", "Yo?", 0) for i in range(4)]
    feats = paraphrase_features(pairs, tokenizer, 48, "t")
    assert max(len(f["input_ids"]) for f in feats) <= 48
    assert "cut the questions of 2 of 4 prompts" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no room"):
        encode_paraphrase_prompt(tokenizer, long_q, "Short one?", 10)


# ----------------------------------------------------------------- reading Quora files

HEADER = "\tid\tsentence1\tsentence2\tis_duplicate\n"


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_real_quora_file_quotes_and_unusable_rows(capsys):

    pairs = read_quora(SHARED_DATA / "quora-minbert-dev.csv")
    out = capsys.readouterr().out
    assert len(pairs) == 20214 - 2  # 20,214 data lines; two have no label ...
    assert "line 2577" in out and "line 14222" in out  # ... and are reported by line
    by_line = {p.line: p for p in pairs}
    assert by_line[3].sentence1.endswith('Do I need "the" here?') and by_line[3].sentence1.startswith("Which")
    assert by_line[306].sentence1.startswith('"Hanging on in quiet desperation is the English way." This')
    assert by_line[3].id == "318658e273ac78f3b1e957b8b" and by_line[3].label == 0
    assert {p.label for p in pairs} == {0, 1}
    # Only one question still holds doubled quotes: its author typed them (8 quotes in the file).
    assert [p.line for p in pairs if '""' in p.sentence1 + p.sentence2] == [18765]
    assert 'Since ""YOU"" have' in by_line[18765].sentence1


def test_malformed_rows_read_or_reported(tmp_path, capsys):

    f = write(tmp_path / "q.csv", HEADER
              + '0\ta1\t"""Is """"x"""" a word?"""\tWhat is x?\t1.0\n'
              + "1\ta2\tNo label here?\tNone?\t\n"
              + "2\ta3\tLabel two?\tHuh?\t2\n"
              + '3\ta4\t"""Cut short by a newline"\t\t0.0\n'
              + "4\tA5\tPlain?\tPlain!\t0\n")
    pairs = read_quora(f)
    out = capsys.readouterr().out
    assert [p.id for p in pairs] == ["a1", "a4", "a5"]  # ids lowercased like the starter
    assert pairs[0].sentence1 == 'Is "x" a word?' and pairs[0].label == 1
    assert pairs[1].sentence1 == '"Cut short by a newline' and pairs[1].sentence2 == ""
    assert "line 3" in out and "line 4" in out and "left out 2" in out
    assert "empty question on line(s) [5]" in out
    bad = write(tmp_path / "bad.csv", HEADER + "0\tb1\tone\ttwo\t1\textra\n")
    with pytest.raises(DataFormatError, match=r"bad\.csv:2: expected 5"):
        read_quora(bad)
    with pytest.raises(DataFormatError, match="is_duplicate"):
        read_quora(write(tmp_path / "t.csv", "\tid\tsentence1\tsentence2\n0\tc1\ta?\tb?\n"), labeled=True)
    test = read_quora(tmp_path / "t.csv")  # the course's test file has no label column
    assert [(p.id, p.label) for p in test] == [("c1", None)]


def quora_source(path, n: int = 50):
    rows = "".join(f"{i}\tid{i:03d}\tQuestion number {i}?\tAnother question {i % 7}?\t{i % 3 == 0:d}.0\n"
                   for i in range(n))
    return write(path, HEADER + rows)


def test_carved_splits_are_deterministic_and_disjoint(tmp_path):

    src = quora_source(tmp_path / "quora-minbert-dev.csv", 50)
    a, b = carve_quora_splits(src), carve_quora_splits(src)
    assert {k: [p.id for p in v] for k, v in a.items()} == {k: [p.id for p in v] for k, v in b.items()}
    assert [len(a[s]) for s in ("train", "dev", "test")] == [40, 5, 5]
    ids = [p.id for s in a.values() for p in s]
    assert sorted(ids) == sorted(f"id{i:03d}" for i in range(50))
    assert [p.id for p in a["train"][:5]] != [f"id{i:03d}" for i in range(5)]  # shuffled, not file order


def test_missing_files_fall_back_to_carved_splits(tmp_path, capsys):

    data = tmp_path / "data"
    data.mkdir()
    quora_source(data / "quora-minbert-dev.csv", 50)
    own_train = quora_source(tmp_path / "mine.tsv", 8)
    splits = load_quora_splits(own_train, data / "quora-dev.csv", data / "quora-test-student.csv")
    out = capsys.readouterr().out
    assert out.count("note:") == 1 and "dev, test carved" in out and "quora-minbert-dev.csv" in out
    assert len(splits["train"]) == 8 and len(splits["dev"]) == 5 and len(splits["test"]) == 5
    with pytest.raises(DataFormatError, match="quora-train.csv.*does not exist.*quora-minbert-dev"):
        load_quora_splits(tmp_path / "x" / "quora-train.csv", own_train, own_train, fallback=tmp_path / "none.csv")


# ----------------------------------------------------------------- training and the CLI


@pytest.mark.parametrize("full_vocab", [False, True])
def test_a_few_steps_lower_the_loss(tokenizer, full_vocab):

    torch.manual_seed(0)
    model = ClozeParaphraseScorer(GPT2Model(get_config("tiny", hidden_dropout_prob=0.0,
                                                       attention_probs_dropout_prob=0.0)))
    # Mostly "yes": even a random model can learn that prior in a few steps.
    pairs = [ParaphrasePair(str(i), f"How do I cook {w}?", f"What is {w}?", int(i not in (3, 6)))
             for i, w in enumerate(["rice", "pasta", "eggs", "beans", "soup", "fish", "bread", "tea"])]
    batch = PadCollator(tokenizer.pad_token_id)(paraphrase_features(pairs, tokenizer, 64))
    args = batch["input_ids"], batch["attention_mask"]
    opt = AdamW(model.parameters(), lr=1e-4)
    with torch.no_grad():
        p_before = model.p_yes(*args).mean()
    losses = []
    for _ in range(4):
        loss = model.loss(*args, batch["labels"], full_vocab=full_vocab)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(model.loss(*args, batch["labels"], full_vocab=full_vocab).item())
        p_after = model.p_yes(*args).mean()
    assert losses[-1] < losses[0] - 0.1, losses
    assert p_after > p_before  # label 1 pushed the model toward "yes", not "no"


def read_predictions(path) -> list[tuple[str, int]]:
    lines = path.read_text().split("\n")
    assert lines[0] == "id \t Predicted_Is_Paraphrase " and lines[-1] == ""
    rows = []
    for line in lines[1:-1]:
        assert line.endswith(" ")
        i, t = line[:-1].split(", ")
        rows.append((i, int(t)))
    return rows


def test_cli_writes_one_row_per_example_and_saves_a_reloadable_scorer(tmp_path, tokenizer):

    train = quora_source(tmp_path / "train.tsv", 12)
    dev = write(tmp_path / "dev.tsv", HEADER + '0\tD1\t"""Is """"x"""" ok?"""\tIs x fine?\t1.0\n'
                + "1\td2\tWhere is Rome?\tHow old is Rome?\t0\n2\td3\tWhy?\tWhy not?\t0.0\n")
    test = write(tmp_path / "test.tsv", "\tid\tsentence1\tsentence2\n"
                 + "".join(f"{i}\tt{i}\tQuestion {i}?\tQuery {i}?\n" for i in range(5)))
    out = tmp_path / "run"
    args = ["--model_size", "tiny", "--random_init", "--tokenizer", str(SHARED_TOKENIZER), "--epochs", "1",
            "--batch_size", "4", "--no_progress", "--output_dir", str(out), "--para_train", str(train),
            "--para_dev", str(dev), "--para_test", str(test), "--para_dev_out", str(out / "dev.csv"),
            "--para_test_out", str(out / "test.csv"), "--lr", "1e-4"]
    result = para.main(args)
    dev_rows, test_rows = read_predictions(out / "dev.csv"), read_predictions(out / "test.csv")
    assert [i for i, _ in dev_rows] == ["d1", "d2", "d3"]
    assert [i for i, _ in test_rows] == [f"t{i}" for i in range(5)]
    assert {t for _, t in dev_rows + test_rows} <= {YES_TOKEN_ID, NO_TOKEN_ID}
    assert set(result["dev"]) >= {"accuracy", "macro_f1"} and result["best"]["epoch"] == 1

    # The saved model reproduces the written predictions through the public scoring function.
    scorer = restore_task_model(result["checkpoint"], "paraphrase").model.eval()
    pairs = [(p.sentence1, p.sentence2) for p in read_quora(test)]
    p_yes = score_paraphrase_pairs(scorer, tokenizer, pairs, batch_size=2)
    assert [ClozeParaphraseScorer.answer_token([int(p > 0.5)])[0] for p in p_yes] == [t for _, t in test_rows]
    left = score_paraphrase_pairs(scorer, tokenizer, pairs, batch_size=3, padding_side="left")
    torch.testing.assert_close(torch.tensor(left), torch.tensor(p_yes), atol=1e-5, rtol=1e-4)
    alone = [score_paraphrase_pairs(scorer, tokenizer, [pair])[0] for pair in pairs]
    torch.testing.assert_close(torch.tensor(alone), torch.tensor(p_yes), atol=1e-5, rtol=1e-4)

    # LoRA: only adapters train, and the saved model is a plain GPT-2 with the adapters merged in.
    lora = para.main([*args, "--fine_tune_mode", "lora", "--output_dir", str(tmp_path / "lora"),
                    "--load", result["checkpoint"]])
    merged = restore_task_model(lora["checkpoint"], "paraphrase").model.eval()
    assert not any("lora" in k for k in merged.state_dict())
    assert score_paraphrase_pairs(merged, tokenizer, pairs[:2]) != p_yes[:2]


def test_a_prefix_model_loads_to_predict_again_and_to_train_further(tmp_path):
    """``--fine-tune-mode prefix --load paraphrase-model.pt``: the loaded model brings its prefix,
    which the mode keeps (it once added a second one and stopped: 'the model already has a prefix')."""
    train = quora_source(tmp_path / "train.tsv", 8)
    dev = write(tmp_path / "dev.tsv", HEADER + "0\td1\tWhere is Rome?\tHow old is Rome?\t0\n1\td2\tWhy?\tWhy not?\t1\n")
    common = ["--model_size", "tiny", "--random_init", "--tokenizer", str(SHARED_TOKENIZER), "--batch_size", "4",
              "--no_progress", "--para_train", str(train), "--para_dev", str(dev), "--para_test", str(dev),
              "--fine-tune-mode", "prefix", "--prefix_length", "3", "--lr", "1e-3"]
    first = para.main([*common, "--epochs", "1", "--output_dir", str(tmp_path / "a"),
                       "--para_dev_out", str(tmp_path / "a.csv"), "--para_test_out", str(tmp_path / "at.csv")])
    again = para.main([*common, "--epochs", "0", "--load", first["checkpoint"], "--output_dir", str(tmp_path / "b"),
                       "--para_dev_out", str(tmp_path / "b.csv"), "--para_test_out", str(tmp_path / "bt.csv")])
    assert (tmp_path / "b.csv").read_text() == (tmp_path / "a.csv").read_text() and again["dev"] == first["dev"]
    para.main([*common, "--epochs", "1", "--load", first["checkpoint"], "--output_dir", str(tmp_path / "c"),
               "--para_dev_out", str(tmp_path / "c.csv"), "--para_test_out", str(tmp_path / "ct.csv")])
    with pytest.raises(InputError, match="the loaded model's prefix has 3 positions; the flags ask for 5"):
        para.main([*common, "--prefix_length", "5", "--epochs", "0", "--load", first["checkpoint"],
                   "--output_dir", str(tmp_path / "d")])
