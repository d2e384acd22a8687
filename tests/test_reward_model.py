"""The scalar-head model (left/right padding, save/load) and reward-model training on a learnable rule."""

import random

import pytest
import torch

from rlhf_engine.data.jsonl import PreferenceRecord
from rlhf_engine.demo import task
from rlhf_engine.demo.tokenizer import build_byte_tokenizer
from rlhf_engine.models import load_causal_lm
from rlhf_engine.models.heads import ScalarHeadModel
from rlhf_engine.trainers.reward import RewardConfig, evaluate_reward_model, reward_loss, train_reward_model


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_tokenizer()


@pytest.fixture()
def rm(tokenizer, tmp_path):
    path = task.build_tiny_model_dir(str(tmp_path / "body"), vocab_size=len(tokenizer), seed=1)
    torch.manual_seed(0)
    return ScalarHeadModel(load_causal_lm(path))


def test_score_is_padding_side_independent(rm):
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    right = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    left_ids = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
    left = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    torch.testing.assert_close(rm.score(ids, right), rm.score(left_ids, left), atol=1e-5, rtol=1e-5)


def test_save_and_load_round_trip(rm, tmp_path):
    ids, mask = torch.tensor([[3, 4, 5]]), torch.ones(1, 3, dtype=torch.long)
    rm.save_pretrained(str(tmp_path / "rm"))
    loaded = ScalarHeadModel.from_pretrained(str(tmp_path / "rm"))
    torch.testing.assert_close(loaded.score(ids, mask), rm.score(ids, mask))
    with pytest.raises(FileNotFoundError, match="init_head=True"):
        ScalarHeadModel.from_pretrained(_plain(tmp_path))


def _plain(tmp_path):
    path = str(tmp_path / "plain")
    task.build_tiny_model_dir(path, vocab_size=300, seed=2)
    return path


def test_losses():
    chosen, rejected, margins = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.5])
    expected_bt = -(torch.nn.functional.logsigmoid(torch.tensor([1.0, -1.5]))).mean()
    torch.testing.assert_close(reward_loss(chosen, rejected, margins, "bt"), expected_bt)
    ranking = torch.nn.MarginRankingLoss(margin=0.5)(chosen, rejected, torch.ones(2))
    torch.testing.assert_close(reward_loss(chosen, rejected, torch.full((2,), 0.5), "margin-ranking"), ranking)


@pytest.mark.parametrize("loss", ["bt", "margin-ranking"])
def test_learns_a_preference_rule(rm, tokenizer, loss):
    rng = random.Random(0)

    def pair(subject):  # the rule: a kind ending is preferred
        body = f" The {subject} walked home."
        return PreferenceRecord(f"Tell me about a {subject}.", body + " It was kind.", body + " It was cruel.")

    train = [pair(rng.choice(task.SUBJECTS[:20])) for _ in range(200)]
    held_out = [pair(s) for s in task.SUBJECTS[20:]]
    config = RewardConfig(steps=60, batch_size=16, lr=3e-3, loss=loss, margin=1.0)
    before = evaluate_reward_model(rm, tokenizer, held_out, config)["accuracy"]
    train_reward_model(rm, tokenizer, train, config, progress=False)
    after = evaluate_reward_model(rm, tokenizer, held_out, config)["accuracy"]
    assert after > 0.9, (before, after)


def test_bad_config():
    with pytest.raises(ValueError, match="RewardConfig.loss"):
        RewardConfig(loss="hinge")
