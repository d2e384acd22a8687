"""The advantage estimators against float64 definitions written plainly here: GAE on every backend (Triton
under TRITON_INTERPRET=1, the native C++ scan, the PyTorch twin), group advantages, REINFORCE++ returns."""

import pytest
import torch

from rlhf_engine.ops import gae, group_advantages, reinforce_pp_returns


def ragged_mask(b, t):
    """Right-padded rows of random lengths, masked spans inside every other row, one all-masked row."""
    lengths = torch.randint(1, t + 1, (b,))
    mask = torch.arange(t)[None, :] < lengths[:, None]
    for row in range(0, b, 2):
        a = int(torch.randint(0, t, ()))
        mask[row, a : a + 3] = False
    mask[b // 2] = False
    return mask


# ---------------------------------------------------------------------------------------------------------------
# gae, group_advantages
# ---------------------------------------------------------------------------------------------------------------
def ref_gae(rewards, values, mask, gamma, lam):
    b, t = rewards.shape
    adv = torch.zeros(b, t, dtype=torch.float64)
    for row in range(b):
        next_value, last = 0.0, 0.0
        for i in reversed(range(t)):
            if not mask[row, i]:
                continue
            delta = float(rewards[row, i]) + gamma * next_value - float(values[row, i])
            last = delta + gamma * lam * last
            adv[row, i] = last
            next_value = float(values[row, i])
    returns = torch.where(mask.bool(), adv + values.double(), torch.zeros_like(adv))
    return adv, returns


@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)])
def test_gae_matches_reference(ppo_backend, gamma, lam):
    rewards, values = torch.randn(7, 23), torch.randn(7, 23)
    mask = ragged_mask(7, 23)
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    ref_adv, ref_ret = ref_gae(rewards, values, mask, gamma, lam)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv.double(), ref_adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret.double(), ref_ret, atol=1e-5, rtol=1e-5)


def test_gae_skips_interior_masked_span(ppo_backend):
    # a masked span in the middle must not change the advantages around it
    rewards = torch.tensor([[0.0, 0.0, 5.0, 5.0, 1.0]])
    values = torch.tensor([[0.5, 0.2, 9.0, 9.0, 0.1]])
    mask = torch.tensor([[1, 1, 0, 0, 1]], dtype=torch.bool)
    adv, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    compact_adv, _ = gae(rewards[:, [0, 1, 4]], values[:, [0, 1, 4]], torch.ones(1, 3, dtype=torch.bool))
    torch.testing.assert_close(adv[:, [0, 1, 4]], compact_adv)
    assert torch.all(adv[:, 2:4] == 0)


def test_gae_more_rows_than_programs(monkeypatch):
    """The Triton launch grid is capped (CUDA limits grid dimensions): programs stride over the other rows."""
    from rlhf_engine.kernels import gae as kernels

    monkeypatch.setenv("RLHF_ENGINE_BACKEND", "triton")
    monkeypatch.setattr(kernels, "MAX_PROGRAMS", 3)
    rewards, values, mask = torch.randn(11, 9), torch.randn(11, 9), ragged_mask(11, 9)
    adv, ret = gae(rewards, values, mask, gamma=0.99, lam=0.95)
    ref_adv, ref_ret = ref_gae(rewards, values, mask, 0.99, 0.95)
    torch.testing.assert_close(adv.double(), ref_adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret.double(), ref_ret, atol=1e-5, rtol=1e-5)


def test_gae_bad_input_is_named():
    with pytest.raises(ValueError, match="gamma"):
        gae(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), gamma=1.5)
    with pytest.raises(ValueError, match="values shape"):
        gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))


def test_group_advantages():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 5.0, 1.0])
    grpo = group_advantages(scores, 4)
    for g in range(2):
        s = scores[4 * g : 4 * g + 4].double()
        torch.testing.assert_close(grpo[4 * g : 4 * g + 4].double(), (s - s.mean()) / (s.std() + 1e-6))
    no_std = group_advantages(scores, 4, norm_std=False)
    torch.testing.assert_close(no_std[:4], torch.tensor([-1.5, -0.5, 0.5, 1.5]))
    rloo = group_advantages(scores, 4, kind="rloo")
    torch.testing.assert_close(rloo[:4], torch.tensor([1 - 3.0, 2 - 8 / 3, 3 - 7 / 3, 4 - 2.0]))
    with pytest.raises(ValueError, match="does not divide"):
        group_advantages(scores, 3)
    with pytest.raises(ValueError, match="kind"):
        group_advantages(scores, 4, kind="ppo")
    assert torch.equal(group_advantages(scores, 1, kind="rloo"), torch.zeros(8))  # a group of one: no baseline
    assert torch.equal(group_advantages(scores, 1), torch.zeros(8))
    with pytest.raises(ValueError, match="exactly one of group_size"):
        group_advantages(scores)
    with pytest.raises(ValueError, match="index must be an integer tensor"):
        group_advantages(scores, index=torch.zeros(8))


def _group_reference(scores, index, kind, norm_std=True, eps=1e-6):
    """The estimators written per group in float64, from the definitions."""
    s = scores.double()
    out = torch.zeros_like(s)
    for g in index.unique():
        members = (index == g).nonzero().flatten()
        group = s[members]
        if len(group) == 1:
            continue
        if kind == "rloo":
            out[members] = group - (group.sum() - group) / (len(group) - 1)
        elif kind == "grpo" and norm_std:
            out[members] = (group - group.mean()) / (group.std() + eps)
        else:
            out[members] = group - group.mean()
    if kind == "reinforce++-baseline":
        out = (out - out.mean()) / (out.std() + eps)
    return out


@pytest.mark.parametrize("kind", ["grpo", "rloo", "reinforce++-baseline"])
@pytest.mark.parametrize("norm_std", [True, False])
def test_group_advantages_by_index_match_float64_definitions(kind, norm_std):
    """Unequal groups (sizes 1, 2, 3, 5, 7) in shuffled order, by index; equal groups by group_size agree with
    the same ids laid out adjacently."""
    gen = torch.Generator().manual_seed(3)
    sizes = [1, 2, 3, 5, 7]
    index = torch.cat([torch.full((n,), 10 * g, dtype=torch.int64) for g, n in enumerate(sizes)])
    index = index[torch.randperm(len(index), generator=gen)]
    scores = torch.randn(len(index), generator=gen)
    got = group_advantages(scores, index=index, kind=kind, norm_std=norm_std)
    torch.testing.assert_close(got.double(), _group_reference(scores, index, kind, norm_std), atol=1e-5, rtol=1e-5)
    equal = torch.randn(6 * 7, generator=gen)
    by_size = group_advantages(equal, 6, kind=kind, norm_std=norm_std)
    by_index = group_advantages(equal, index=torch.arange(42) // 6, kind=kind, norm_std=norm_std)
    torch.testing.assert_close(by_size, by_index)
    torch.testing.assert_close(by_size.double(), _group_reference(equal, torch.arange(42) // 6, kind, norm_std),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_returns_match_a_float64_loop(gamma):
    """Left and right padding, a masked gap, NaN in masked rewards, an all-masked row; T = 37."""
    gen = torch.Generator().manual_seed(5)
    b, t = 6, 37
    rewards = torch.randn(b, t, generator=gen)
    mask = torch.zeros(b, t)
    for row, (start, stop) in enumerate([(0, 37), (5, 30), (10, 11), (0, 20), (3, 37), (0, 0)]):
        mask[row, start:stop] = 1
    mask[3, 7:9] = 0  # a gap inside a response
    rewards = torch.where(mask == 0, torch.nan, rewards)
    expected = torch.zeros(b, t, dtype=torch.float64)
    for row in range(b):
        running = 0.0
        for col in range(t - 1, -1, -1):
            r = float(rewards[row, col]) if mask[row, col] else 0.0
            running = r + gamma * running
            expected[row, col] = running if mask[row, col] else 0.0
    raw = reinforce_pp_returns(rewards, mask, gamma, whiten=False)
    torch.testing.assert_close(raw.double(), expected, atol=1e-5, rtol=1e-5)
    m = mask.bool()
    values = expected[m]
    whitened = torch.zeros_like(expected)
    whitened[m] = (values - values.mean()) / (values.var(unbiased=True) + 1e-8).sqrt()
    torch.testing.assert_close(reinforce_pp_returns(rewards, mask, gamma).double(), whitened, atol=1e-5, rtol=1e-5)
    assert torch.equal(reinforce_pp_returns(rewards, torch.zeros(b, t), gamma), torch.zeros(b, t))  # no NaN
    with pytest.raises(ValueError, match="mask must have the rewards' shape"):
        reinforce_pp_returns(rewards, mask[:, :5])
