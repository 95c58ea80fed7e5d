"""The mathematics of the training objectives (methods/objectives) on a tiny random model."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from classifier import main as classifier_main
from cli.common import add_objective_args, objective_settings_from_args, run_main
from config import get_config
from methods.objectives import ObjectiveSettings
from methods.objectives.combined import body_outputs, build_objective
from methods.objectives.contrastive import PairViewCollator, info_nce, supervised_pair_loss
from methods.objectives.rdrop import rdrop_loss, symmetric_kl, two_passes
from methods.objectives.smart import MomentumTeacher, adversarial_perturbation, perturbed_embeddings, smoothness_loss
from models.gpt2 import GPT2Model
from models.heads import GPT2SentimentClassifier, pool
from tasks.common import PlainLoss, training_loss


def tiny_classifier(dropout: float = 0.1, seed: int = 0) -> GPT2SentimentClassifier:
    torch.manual_seed(seed)
    cfg = get_config("tiny", vocab_size=97, max_position_embeddings=32, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout)
    return GPT2SentimentClassifier(GPT2Model(cfg), num_labels=3, hidden_dropout_prob=dropout)


def batch(B: int = 4, T: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 4:] = 0  # right-padded rows of different lengths
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(B) % 3}


def logits_fn(model, b):
    return model(b["input_ids"], b["attention_mask"])


# ----------------------------------------------------------- divergences and R-Drop


def test_symmetric_kl_matches_direct_computation():
    torch.manual_seed(0)
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    p, q = a.softmax(-1), b.softmax(-1)
    direct = ((p * (p / q).log()).sum(-1) + (q * (q / p).log()).sum(-1)).mean()
    assert torch.allclose(symmetric_kl(a, b), direct, atol=1e-6)
    assert torch.allclose(rdrop_loss(a, b), direct / 2, atol=1e-6)
    assert symmetric_kl(a, a).abs() < 1e-7


def test_rdrop_term_is_zero_without_dropout_and_positive_with_it():
    b = batch()
    model = tiny_classifier(dropout=0.1)
    model.eval()
    assert rdrop_loss(*two_passes(model, b, logits_fn)).item() == 0.0
    model.train()
    assert rdrop_loss(*two_passes(model, b, logits_fn)).item() > 1e-6
    no_dropout = tiny_classifier(dropout=0.0).train()
    assert rdrop_loss(*two_passes(no_dropout, b, logits_fn)).item() == 0.0


# ----------------------------------------------------------- contrastive


def direct_info_nce(anchors, candidates, targets, tau):
    total = 0.0
    for i, t in enumerate(targets):
        sims = [F.cosine_similarity(anchors[i], c, dim=0).item() / tau for c in candidates]
        total += -(sims[t] - math.log(sum(math.exp(s) for s in sims)))
    return total / len(targets)


def test_info_nce_matches_direct_computation_and_prefers_aligned_views():
    torch.manual_seed(0)
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    assert info_nce(a, b, temperature=0.1).item() == pytest.approx(direct_info_nce(a, b, range(6), 0.1), rel=1e-5)
    aligned = a + 0.01 * torch.randn(6, 8)
    assert info_nce(a, aligned, temperature=0.05) < info_nce(a, b, temperature=0.05)
    with pytest.raises(ValueError):
        info_nce(a, b, temperature=0.0)


def test_supervised_pair_loss_uses_positive_pairs_as_anchors():
    torch.manual_seed(0)
    first, second = torch.randn(5, 8), torch.randn(5, 8)
    labels = torch.tensor([1, 0, 1, 1, 0])
    rows = [0, 2, 3]
    want = direct_info_nce(first[rows], second, rows, 0.05)
    assert supervised_pair_loss(first, second, labels).item() == pytest.approx(want, rel=1e-5)
    first.requires_grad_(True)
    zero = supervised_pair_loss(first, second, torch.zeros(5, dtype=torch.long))
    assert zero.item() == 0.0
    zero.backward()  # attached to the graph: a batch without positives does not break backward


def test_pair_view_collator_pads_each_question_with_its_mask():
    collate = PairViewCollator(pad_id=0)
    out = collate([{"input_ids": [5, 6, 7], "sentence1_input_ids": [1, 2], "sentence2_input_ids": [3], "labels": 1},
                   {"input_ids": [5], "sentence1_input_ids": [4], "sentence2_input_ids": [8, 9, 10], "labels": 0}])
    assert out["sentence1_input_ids"].tolist() == [[1, 2], [4, 0]]
    assert out["sentence1_attention_mask"].tolist() == [[1, 1], [1, 0]]
    assert out["sentence2_attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


# ----------------------------------------------------------- pooling


def test_pooling_is_the_same_under_left_and_right_padding():
    gpt = tiny_classifier(dropout=0.0).gpt.eval()
    texts = [[5, 9, 2, 40], [7, 3], [11, 12, 13, 14, 15, 16]]
    T = max(map(len, texts))
    right = torch.zeros(3, T, dtype=torch.long)
    left = torch.zeros(3, T, dtype=torch.long)
    rmask, lmask = torch.zeros_like(right), torch.zeros_like(left)
    for i, t in enumerate(texts):
        right[i, :len(t)], rmask[i, :len(t)] = torch.tensor(t), 1
        left[i, T - len(t):], lmask[i, T - len(t):] = torch.tensor(t), 1
    hr = gpt(right, rmask)["last_hidden_state"]
    hl = gpt(left, lmask)["last_hidden_state"]
    for mode in ("mean", "last"):
        assert torch.allclose(pool(hr, rmask, mode), pool(hl, lmask, mode), atol=1e-5), mode
    alone = gpt(torch.tensor([texts[1]]))["last_hidden_state"]
    assert torch.allclose(pool(hr, rmask, "mean")[1], alone[0].mean(0), atol=1e-5)
    assert torch.allclose(pool(hr, rmask, "last"), gpt(right, rmask)["last_token"])


def test_mean_pooling_ignores_pad_positions():
    h = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 1, 1, 1]])
    changed = h.clone()
    changed[0, 2:] = 1e6
    changed[1, 0] = -1e6
    assert torch.allclose(pool(h, mask, "mean"), pool(changed, mask, "mean"))
    assert torch.allclose(pool(h, mask, "mean")[0], h[0, :2].mean(0))
    with pytest.raises(ValueError):
        pool(h, mask, "max")


# ----------------------------------------------------------- SMART


def test_perturbed_embeddings_adds_delta_to_token_embeddings_only_inside_the_block():
    model = tiny_classifier(dropout=0.0).eval()
    b = batch()
    clean = logits_fn(model, b)
    delta = torch.zeros(4, 7, 128)
    delta[2, 3] = 0.5 * torch.randn(128)  # not constant: LayerNorm would remove a constant shift
    with perturbed_embeddings(model, delta):
        moved = logits_fn(model, b)
        emb = model.gpt.embed(b["input_ids"], b["attention_mask"])
    assert torch.allclose(emb - model.gpt.embed(b["input_ids"], b["attention_mask"]), delta, atol=1e-6)
    assert not torch.allclose(moved[2], clean[2])
    assert torch.allclose(moved[[0, 1, 3]], clean[[0, 1, 3]], atol=1e-6)  # other rows untouched
    assert torch.equal(logits_fn(model, b), clean)  # hook removed
    with pytest.raises(RuntimeError, match="could not perturb"), perturbed_embeddings(model, delta):
        model.classifier(torch.zeros(4, 128))  # the embedding never ran: no silent no-op


def test_smart_perturbation_stays_in_the_ball_and_beats_a_random_one():
    model = tiny_classifier(dropout=0.0).eval()
    b = batch()
    clean = logits_fn(model, b).detach()
    eps = 0.05
    torch.manual_seed(3)
    delta = adversarial_perturbation(model, b, logits_fn, clean, b["attention_mask"], eps, steps=3, step_size=0.02)
    assert delta.abs().max() <= eps + 1e-7
    assert delta.abs().max() > eps / 2  # it moved
    assert (delta[b["attention_mask"] == 0] == 0).all()  # pads are never perturbed

    def kl_at(d):
        with perturbed_embeddings(model, d), torch.no_grad():
            return symmetric_kl(logits_fn(model, b), clean).item()

    adversarial = kl_at(delta)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):  # same magnitudes (same inf- and 2-norms), random signs
        signs = torch.randint(0, 2, delta.shape, generator=g) * 2 - 1
        assert adversarial > kl_at(delta.abs() * signs)


def test_smart_term_is_zero_at_epsilon_zero_and_positive_above():
    model = tiny_classifier(dropout=0.0).eval()
    b = batch()
    clean = logits_fn(model, b)
    for eps in (0.0, 0.05):
        delta = adversarial_perturbation(model, b, logits_fn, clean, b["attention_mask"], epsilon=eps, steps=2)
        term = smoothness_loss(model, b, logits_fn, clean, delta).item()
        assert term == 0.0 if eps == 0 else term > 0


def test_momentum_teacher_update_and_prediction():
    model = tiny_classifier(dropout=0.1)
    b = batch()
    teacher = MomentumTeacher(model, momentum=0.9)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    teacher.update(model)
    for n, p in model.named_parameters():
        assert torch.allclose(teacher.params[n], 0.9 * start[n] + 0.1 * p, atol=1e-6), n
    model.train()
    t_logits = teacher.logits(model, b, logits_fn)
    assert model.training  # mode restored
    assert torch.equal(model.classifier.weight, start["classifier.weight"] + 1.0)  # live weights restored
    # The teacher predicts with its own weights, without dropout.
    for n, p in model.named_parameters():
        p.data = teacher.params[n].clone()
    assert torch.allclose(t_logits, logits_fn(model.eval(), b), atol=1e-6)
    frozen = tiny_classifier()
    frozen.gpt.requires_grad_(False)
    assert set(MomentumTeacher(frozen).params) == {"classifier.weight", "classifier.bias"}


# ----------------------------------------------------------- flags and the wrapper


def parse(*argv: str) -> ObjectiveSettings:
    return objective_settings_from_args(add_objective_args(argparse.ArgumentParser()).parse_args(list(argv)))


def test_flags_default_off_and_reject_bad_values(capsys):
    s = parse()
    assert s == ObjectiveSettings() and not s.enabled
    assert s.rdrop_alpha == s.contrastive_weight == s.smart_weight == s.smart_proximal_weight == 0
    s = parse("--rdrop_alpha", "1", "--pooling", "mean", "--contrastive_supervised")
    assert (s.rdrop_alpha, s.pooling, s.contrastive_supervised) == (1.0, "mean", True)
    # Any weight, or the pairs' views, asks for the objective; the pooling and a term's settings alone do not.
    for flags in (["--rdrop_alpha", "1"], ["--contrastive_weight", "1"], ["--smart_weight", "1"],
                  ["--smart_proximal_weight", "1"], ["--contrastive_supervised"]):
        assert parse(*flags).enabled, flags
    assert not parse("--pooling", "mean", "--smart_epsilon", "0.1", "--contrastive_temperature", "0.5").enabled
    for bad in (["--rdrop_alpha", "-1"], ["--contrastive_temperature", "0"], ["--smart_momentum", "1"],
                ["--smart_steps", "-2"], ["--smart_weight", "x"], ["--pooling", "max"]):
        with pytest.raises(SystemExit) as e:
            parse(*bad)
        assert e.value.code == 2
        assert bad[0] in capsys.readouterr().err
    with pytest.raises(ValueError):
        ObjectiveSettings(contrastive_temperature=0.0)


def test_smart_under_fsdp_is_refused_in_one_line(capsys):
    """Issue 25, bug 2: SMART under ``--fsdp`` crashed inside FSDP2 (a mixed Tensor/DTensor forward,
    then SIGSEGV); the command refuses it while reading its flags, in one line, exit status 2.
    Other objectives under --fsdp, and SMART without it, are accepted."""
    for flags in (["--smart_weight", "1"], ["--smart_proximal_weight", "1"]):
        with pytest.raises(SystemExit) as e:
            run_main(lambda flags=flags: classifier_main(["--fsdp", *flags]))
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: SMART") and "--fsdp" in err
    parser = add_objective_args(argparse.ArgumentParser())
    parser.add_argument("--fsdp", action="store_true")
    assert objective_settings_from_args(parser.parse_args(["--fsdp", "--contrastive_weight", "1"])).enabled
    assert objective_settings_from_args(parser.parse_args(["--smart_weight", "1"])).enabled


def test_objective_off_is_the_plain_cross_entropy():
    model = tiny_classifier(dropout=0.1).train()
    b = batch()
    objective = build_objective(parse(), logits_fn)
    torch.manual_seed(5)
    got = objective(model, b)
    torch.manual_seed(5)
    assert torch.equal(got, F.cross_entropy(logits_fn(model, b), b["labels"]))
    assert objective.callbacks == []


def test_a_run_without_objective_trains_on_the_plain_loss_with_the_same_gradients():
    """Off, a task skips the wrapper (``training_loss`` gives ``PlainLoss``): same loss and
    gradients, bit for bit, as the objective with every term off."""
    plain = training_loss(parse(), logits_fn)
    assert isinstance(plain, PlainLoss) and list(plain.callbacks) == []
    assert not isinstance(training_loss(parse("--rdrop_alpha", "1"), logits_fn), PlainLoss)
    grads = []
    for loss_fn in (plain, build_objective(parse(), logits_fn)):
        model = tiny_classifier(dropout=0.1).train()
        torch.manual_seed(5)
        loss = loss_fn(model, batch())
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1]))


def test_objective_combines_every_term_and_trains():
    model = tiny_classifier(dropout=0.1).train()
    b = batch()
    args = parse("--rdrop_alpha", "1", "--contrastive_weight", "0.5", "--smart_weight", "2", "--smart_epsilon",
                 "0.01", "--smart_proximal_weight", "1", "--pooling", "mean")
    objective = build_objective(args, logits_fn)
    torch.manual_seed(7)
    loss = objective(model, b)
    terms = objective.last_terms
    assert set(terms) == {"task", "rdrop", "contrastive", "smart", "proximal"}
    want = terms["task"] + terms["rdrop"] + 0.5 * terms["contrastive"] + 2 * terms["smart"] + terms["proximal"]
    assert torch.allclose(loss.detach(), want, atol=1e-5)
    assert all(v > 0 for v in terms.values())
    # Replay the two dropout passes from the same seed: each term is its formula of *those* passes.
    torch.manual_seed(7)
    with torch.no_grad(), body_outputs(model) as seen:
        first, second = logits_fn(model, b), logits_fn(model, b)
        views = [pool(h, m, "mean") for h, m in seen]
        teacher = logits_fn(model.eval(), b)  # the momentum teacher starts at the live weights, no dropout
    model.train()
    assert len(views) == 2 and not torch.allclose(views[0], views[1])  # two dropout masks, two views
    y = b["labels"]
    torch.testing.assert_close(terms["task"], (F.cross_entropy(first, y) + F.cross_entropy(second, y)) / 2)
    torch.testing.assert_close(terms["rdrop"], 0.5 * symmetric_kl(first, second))
    # SimCSE: each text's first view against the second views of all, at the set temperature;
    # one pass used twice (the views equal) would give a different, smaller loss.
    torch.testing.assert_close(terms["contrastive"], info_nce(views[0], views[1], temperature=0.05))
    assert terms["contrastive"] > info_nce(views[0], views[0], temperature=0.05) + 1e-3
    torch.testing.assert_close(terms["proximal"], symmetric_kl(first, teacher))
    loss.backward()
    assert model.gpt.wte.weight.grad is not None and model.classifier.weight.grad.abs().sum() > 0
    assert objective.callbacks == [objective]


def test_objective_without_dropout_adds_nothing_from_rdrop_or_smart_at_epsilon_zero():
    model = tiny_classifier(dropout=0.0).train()
    b = batch()
    objective = build_objective(parse("--rdrop_alpha", "3", "--smart_weight", "1", "--smart_epsilon", "0"), logits_fn)
    loss = objective(model, b)
    assert objective.last_terms["rdrop"].item() == 0.0 and objective.last_terms["smart"].item() == 0.0
    assert torch.allclose(loss, F.cross_entropy(logits_fn(model, b), b["labels"]))


def test_supervised_contrastive_objective_reads_the_pair_views():
    model = tiny_classifier(dropout=0.0).train()
    collate = PairViewCollator(pad_id=0)
    b = collate([{"input_ids": [1, 2, 3, 4], "sentence1_input_ids": [1, 2], "sentence2_input_ids": [3, 4], "labels": 1},
                 {"input_ids": [5, 6, 7], "sentence1_input_ids": [5], "sentence2_input_ids": [6, 7], "labels": 0},
                 {"input_ids": [8, 9], "sentence1_input_ids": [8], "sentence2_input_ids": [9], "labels": 1}])
    objective = build_objective(parse("--contrastive_weight", "1", "--contrastive_supervised"),
                                lambda m, x: m(x["input_ids"], x["attention_mask"])[:, :2])
    objective(model, b)
    gpt = model.gpt
    h1 = pool(gpt(b["sentence1_input_ids"], b["sentence1_attention_mask"])["last_hidden_state"],
              b["sentence1_attention_mask"], "last")
    h2 = pool(gpt(b["sentence2_input_ids"], b["sentence2_attention_mask"])["last_hidden_state"],
              b["sentence2_attention_mask"], "last")
    want = supervised_pair_loss(h1, h2, b["labels"])
    assert objective.last_terms["contrastive"].item() == pytest.approx(want.item(), rel=1e-5)
    plain = batch()
    plain["labels"] = plain["labels"] % 2
    with pytest.raises(KeyError, match="PairViewCollator"):
        objective(model, plain)


def test_body_outputs_records_each_pass_with_its_mask():
    model = tiny_classifier(dropout=0.0)
    b = batch()
    with body_outputs(model) as seen:
        logits_fn(model, b)
        model.gpt(b["input_ids"], attention_mask=b["attention_mask"])
    assert len(seen) == 2 and all(torch.equal(m, b["attention_mask"]) for _, m in seen)


def test_trainer_runs_the_objective_and_updates_the_momentum_teacher(tmp_path):
    from engine.trainer import Callback, TrainConfig, Trainer

    class Record(Callback):  # every parameter after each step, once the teacher has followed it
        def __init__(self) -> None:
            self.steps: list[dict[str, torch.Tensor]] = []

        def on_step_end(self, trainer, step, loss):
            self.steps.append({n: p.detach().clone() for n, p in trainer.model.named_parameters()})

    model = tiny_classifier(dropout=0.1)
    b = batch()
    objective = build_objective(parse("--rdrop_alpha", "1", "--smart_weight", "1", "--smart_epsilon", "0.01",
                                      "--smart_proximal_weight", "1", "--smart_momentum", "0.5"), logits_fn)
    cfg = TrainConfig(epochs=1, lr=1e-2, output_dir=str(tmp_path), progress=False, plot=False, save_top_k=0)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    record = Record()
    trainer = Trainer(model, objective, [b, b], None, cfg, callbacks=[*objective.callbacks, record])
    trainer.fit()
    assert trainer.global_step == 2 and len(record.steps) == 2
    theta1, theta2 = record.steps
    assert not torch.allclose(theta1["classifier.weight"], start["classifier.weight"])
    assert not torch.allclose(theta2["classifier.weight"], theta1["classifier.weight"])
    # theta~ <- m theta~ + (1 - m) theta after each step, from theta_0 at m = 0.5:
    # theta~ = 0.25 theta_0 + 0.25 theta_1 + 0.5 theta_2, for every parameter the teacher holds.
    assert set(objective.teacher.params) == set(start)
    for n, ema in objective.teacher.params.items():
        torch.testing.assert_close(ema, 0.25 * start[n] + 0.25 * theta1[n] + 0.5 * theta2[n], msg=n)
