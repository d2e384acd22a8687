"""Making experience: rollout -> scores -> shaping -> KL -> advantages, everything the PPO-family update reads,
apart from the update (trainers/ppo.py). ``ExperienceMaker.rollout`` generates (with DAPO's dynamic sampling when
asked), scores (reward model or reward function; with workers, while the log-prob passes run), shapes the scores
(DAPO's soft overlong punishment), takes the old and reference log-probs and computes the advantages of the
algorithm; ``rollout_correction`` gives the update its importance weights between the rollout engine's sampling
policy and the trained one.

Per-token tensors are [B, T] in target space with ``mask`` 1 on response tokens (see trainers/ppo.py).
"""

from __future__ import annotations

import time

import torch

from rlhf_engine.data.jsonl import as_records
from rlhf_engine.distributed import gathered
from rlhf_engine.models.heads import CausalLMLogprobs, position_ids_for
from rlhf_engine.models.loading import max_positions
from rlhf_engine.models.lora import as_reference
from rlhf_engine.ops import gae, group_advantages, kl_penalty, masked_mean, masked_whiten, reinforce_pp_returns
from rlhf_engine.precision import autocast
from rlhf_engine.rollout import SamplingParams
from rlhf_engine.trainers.common import with_config_tf32

ROLLOUT_CORRECTIONS = ("none", "tis", "mis", "seq-tis", "seq-mis")


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13) of responses of ``lengths`` [B] tokens:

        0                                          length <= max_new_tokens - buffer
        -penalty (length - (max - buffer)) / buffer  inside the last ``buffer`` tokens
        -penalty                                   length > max_new_tokens (cannot happen: the rollout stops there)

    Returns [B] fp32, added to the scores; ``buffer`` 0 gives zeros.
    """
    lengths = lengths.float()
    if buffer <= 0:
        return torch.zeros_like(lengths)
    start = max_new_tokens - buffer
    return -penalty * ((lengths - start) / buffer).clamp(min=0.0, max=1.0)


def rollout_correction(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, kind: str, *,
                       cap: float, low: float | None = None) -> tuple[torch.Tensor | None, torch.Tensor, dict]:
    """Corrects for the rollout engine sampling from a slightly different policy than the one trained (other
    kernels, other precision): with the per-token ratio rho = exp(old_logp - rollout_logp) on response tokens,

        tis      token weights min(rho, cap)                       (truncated importance sampling)
        mis      tokens with rho outside [low, cap] leave the loss  (masked importance sampling)
        seq-tis  each row weighted by min(rho_seq, cap), rho_seq = exp(mean over the row's tokens of log rho)
        seq-mis  rows with rho_seq outside [low, cap] leave the loss
        none     nothing

    (low defaults to 1 / cap.) old_logp, rollout_logp, mask [B, T]. Returns ``(weights, loss_mask, stats)``:
    weights [B, T] fp32 for ``ppo_policy_loss(rollout_is_weights=)`` (None for none and the masking kinds),
    loss_mask [B, T] bool (the mask minus what was masked), and the logged numbers: rollout_ratio_mean / _max
    (of rho, or rho_seq for the seq kinds), and rollout_masked_tokens / rollout_masked_seqs (shares, masking
    kinds) or rollout_weight_mean / _max (truncating kinds).
    """
    if kind not in ROLLOUT_CORRECTIONS:
        raise ValueError(f"rollout_correction must be one of {list(ROLLOUT_CORRECTIONS)}, found {kind!r}")
    live = mask != 0
    if kind == "none":
        return None, live, {}
    low = 1.0 / cap if low is None else low
    log_ratio = torch.where(live, old_logp.float() - rollout_logp.float(), 0.0)
    tokens = live.sum().clamp(min=1)
    if kind.startswith("seq-"):
        count = live.sum(-1)
        seq_log = log_ratio.sum(-1) / count.clamp(min=1)
        ratio = torch.exp(seq_log.clamp(-20.0, 20.0))  # [B]
        rows = count > 0
        n_rows = rows.sum().clamp(min=1)
        stats = {"rollout_ratio_mean": float((ratio * rows).sum() / n_rows),
                 "rollout_ratio_max": float(ratio[rows].max()) if bool(rows.any()) else 0.0}
        if kind == "seq-tis":
            weight = ratio.clamp(max=cap)
            stats["rollout_weight_mean"] = float((weight * rows).sum() / n_rows)
            stats["rollout_weight_max"] = min(stats["rollout_ratio_max"], cap)
            return torch.where(live, weight[:, None], 0.0), live, stats
        keep = (ratio >= low) & (ratio <= cap)
        loss_mask = live & keep[:, None]
    else:
        ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))  # [B, T]
        stats = {"rollout_ratio_mean": float((ratio * live).sum() / tokens),
                 "rollout_ratio_max": float(ratio[live].max()) if bool(live.any()) else 0.0}
        if kind == "tis":
            weight = torch.where(live, ratio.clamp(max=cap), 0.0)
            stats["rollout_weight_mean"] = float(weight.sum() / tokens)
            stats["rollout_weight_max"] = min(stats["rollout_ratio_max"], cap)
            return weight, live, stats
        loss_mask = live & (ratio >= low) & (ratio <= cap)
    had_tokens = live.any(-1)
    stats["rollout_masked_tokens"] = float((live & ~loss_mask).sum() / tokens)
    stats["rollout_masked_seqs"] = float((had_tokens & ~loss_mask.any(-1)).sum() / had_tokens.sum().clamp(min=1))
    return None, loss_mask, stats


KL_IN_REWARD = ("ppo", "reinforce++")  # the algorithms whose reward carries the KL (kl_in_reward)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(values, mask)
    return masked_mean((values - mean) ** 2, mask)


class ExperienceMaker:
    """The experience half of ``PPOTrainer`` (its base class): reads the trainer's config, tokenizer, dist,
    engine, rollout_weights, policy_module, reference, critic_module, scorer, reward_model, rng,
    kl_reward_coef, _prompt_source and _reduce."""

    # ------------------------------------------------------------------------------------------------------------
    def _encode_prompt(self, prompt: str) -> list[int]:
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)[-(self.config.max_prompt_length - 1) :]
        return ([self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []) + ids

    def _logprobs(self, module, input_ids, attention_mask, targets, *, entropy=False, prompt_len=None):
        """log-probs (and entropy) of ``targets`` [B, L-1] under ``module`` (a CausalLMLogprobs, possibly
        wrapped, or a plain causal LM) at the sampling temperature. ``prompt_len`` [B] (rows in groups of
        n_samples sharing a prompt, as the rollout lays them out) lets each prompt run once for its group."""
        if hasattr(module, "get_output_embeddings"):
            module = CausalLMLogprobs(module)
        n = self.config.n_samples
        shared = None
        # NOTE: not under FSDP: the shared path runs the body twice in one forward, untested with FSDP2's hooks; nor
        # under gradient checkpointing with gradients, which drops the prompt's cache the second forward reads
        checkpointed = self.config.gradient_checkpointing and torch.is_grad_enabled()
        if (prompt_len is not None and self.config.share_prompts and n > 1 and self.dist.strategy != "fsdp"
                and not checkpointed):
            shared = (n, prompt_len[::n].tolist())
        with self._autocast():
            return module(input_ids, attention_mask, targets, position_ids=position_ids_for(attention_mask),
                          temperature=self.config.temperature, return_entropy=entropy, shared_prompts=shared)

    def _autocast(self):
        return autocast(self.config.precision, self.device)

    def _model_scores(self, sequences: list[list[int]]) -> torch.Tensor:
        """The reward model's score of each sample on ``sequences``, the tokens the policy saw (its prompt cut to
        max_prompt_length, then the response), ending in EOS as in its training."""
        from rlhf_engine.trainers.reward import score_ids

        eos = self.tokenizer.eos_token_id
        sequences = [s if eos is None or s[-1] == eos else s + [eos] for s in sequences]
        limit = max_positions(self.reward_model)
        longest = max(len(s) for s in sequences)
        if limit is not None and longest > limit:
            raise ValueError(f"a sample of {longest} tokens (prompt cut to max_prompt_length, response of at most "
                             f"max_new_tokens, EOS) is longer than the reward model's max_position_embeddings = "
                             f"{limit}: lower PPOConfig.max_prompt_length or max_new_tokens")
        with self._autocast():
            return score_ids(self.reward_model, sequences, self.tokenizer.pad_token_id).cpu()

    def _generate(self, records: list, *, greedy: bool = False) -> list:
        """The n samples of each record's prompt (``RolloutOutput`` per record; ``greedy``: one greedy response
        each); no prompts, no samples (a rank with nothing to sample still joins FSDP's gather, a collective)."""
        cfg = self.config
        eos = self.tokenizer.eos_token_id
        params = SamplingParams(n=1 if greedy else cfg.n_samples, temperature=0.0 if greedy else cfg.temperature,
                                top_p=1.0 if greedy else cfg.top_p,
                                max_new_tokens=cfg.max_new_tokens, stop_token_ids=(eos,) if eos is not None else (),
                                seed=self.rng.randrange(2**31))
        self.rollout_weights.refresh()  # a copy only when an optimizer step moved the master weights
        with gathered(self.policy_module):  # FSDP: whole parameters for the rollout, freed after
            if not records:
                return []
            return self.engine.generate([self._encode_prompt(r.prompt) for r in records], params)

    def _response_text(self, sample) -> str:
        """A sample's response as the reward function sees it: decoded, without EOS or special tokens."""
        eos = self.tokenizer.eos_token_id
        return self.tokenizer.decode([t for t in sample.token_ids if t != eos], skip_special_tokens=True)

    def _score_groups(self, groups: list) -> tuple[torch.Tensor, int, dict]:
        """(scores [samples], reward errors, reward_fn extras) of ``groups`` [(record, RolloutOutput)]."""
        samples = [(record, out, s) for record, out in groups for s in out.samples]
        if self.scorer is None:
            return self._model_scores([out.prompt_token_ids + s.token_ids for _, out, s in samples]), 0, {}
        responses = [self._response_text(s) for _, _, s in samples]
        return self.scorer.submit([r.prompt for r, _, _ in samples], responses,
                                  [r.fields for r, _, _ in samples]).result()

    def _sample_informative_groups(self, records: list, prompts: list) -> tuple[list, tuple | None, dict]:
        """DAPO's dynamic sampling: groups whose n rewards are all equal carry no group advantage and are dropped;
        fresh prompts (drawn from the run's prompts like the iteration's own) are sampled until this rank holds
        as many groups as it was given, or ``max_sampling_rounds`` rounds have run. Every rank runs the same
        rounds and keeps the same number of groups (the least any rank found), so the update's collectives
        match. Returns (groups, (scores, errors, extras) of the kept samples, logged numbers)."""
        cfg, n = self.config, self.config.n_samples
        quota = len(records)
        source = self._prompt_source or as_records(prompts, "prompts", "prompts")
        kept, kept_scores, dropped, errors, extras, rounds, scored_rounds = [], [], 0, 0, {}, 0, 0
        pool = records
        while True:
            rounds += 1
            groups = list(zip(pool, self._generate(pool), strict=True))
            if groups:
                scores, round_errors, round_extras = self._score_groups(groups)
                errors += round_errors
                scored_rounds += 1
                extras = {k: extras.get(k, 0.0) + v for k, v in round_extras.items()}
                for g, group in enumerate(groups):
                    if len(kept) == quota:
                        break
                    group_scores = scores[g * n : (g + 1) * n]
                    if bool((group_scores == group_scores[0]).all()):
                        dropped += 1
                    else:
                        kept.append(group)
                        kept_scores.append(group_scores)
            (missing,) = self.dist.all_reduce([float(quota - len(kept))])
            if missing == 0 or rounds >= cfg.max_sampling_rounds:
                break
            # every rank draws the same global prompts (the RNG stays in step) and samples its share if it needs any
            draw = [self.rng.choice(source) for _ in range(cfg.prompts_per_iteration)]
            pool = self.dist.shard(draw) if len(kept) < quota else []
        common = -self.dist.reduce_stats({}, {"fewest": -float(len(kept))})["fewest"]
        kept, kept_scores = kept[: int(common)], kept_scores[: int(common)]
        stats = {"sampling_rounds": float(rounds), "groups_kept": float(len(kept)), "groups_dropped": float(dropped)}
        if not kept:
            return [], None, stats
        extras = {k: v / scored_rounds for k, v in extras.items()}  # means over the rounds' batches
        return kept, (torch.cat(kept_scores), errors, extras), stats

    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    @with_config_tf32
    def rollout(self, prompts: list[str]) -> dict:
        """Generates, scores and prepares one iteration's batch (everything the update needs)."""
        cfg = self.config
        t0 = time.perf_counter()
        records = self.dist.shard(as_records(prompts, "prompts", "prompts"))  # each rank its own prompts
        if cfg.dynamic_sampling:
            groups, scored, sampling_stats = self._sample_informative_groups(records, prompts)
        else:
            groups, scored, sampling_stats = list(zip(records, self._generate(records), strict=True)), None, {}
        baseline = None
        if cfg.algorithm == "remax":  # ReMax (arXiv 2310.10505): the reward of a greedy response per prompt
            greedy = self._generate(records, greedy=True)
            baseline, _, _ = self._score_groups(list(zip(records, greedy, strict=True)))
            sampling_stats["baseline_reward_mean"] = baseline.float().mean().item()
            if cfg.overlong_buffer:  # shaped as the samples' scores are, so equal lengths cancel
                lengths = torch.tensor([len(out.samples[0].token_ids) for out in greedy])
                baseline = baseline + overlong_penalty(lengths, cfg.max_new_tokens, cfg.overlong_buffer,
                                                       cfg.overlong_penalty)
        rollout_seconds = time.perf_counter() - t0
        if not groups:  # dynamic sampling found no group with a reward signal on some rank: nothing to learn from
            return {"batch": None, "stats": self._reduce(sampling_stats), "responses": [], "prompts": [],
                    "scores": torch.zeros(0), "skip": True}
        rows, texts_p, texts_r, fields = [], [], [], []
        for record, out in groups:
            for s in out.samples:
                rows.append((out.prompt_token_ids, s))
                texts_p.append(record.prompt)
                fields.append(record.fields)
                texts_r.append(self._response_text(s))
        # with reward workers the scores are computed while the log-prob passes below run
        pending = self.scorer.submit(texts_p, texts_r, fields) if self.scorer is not None and scored is None else None
        width = max(len(p) + len(s.token_ids) for p, s in rows)
        b = len(rows)
        input_ids = torch.full((b, width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((b, width), dtype=torch.long)
        targets = torch.full((b, width - 1), -100, dtype=torch.long)
        rollout_logp = torch.zeros((b, width - 1))
        last = torch.zeros(b, dtype=torch.long)
        for i, (p, s) in enumerate(rows):
            seq = p + s.token_ids
            input_ids[i, : len(seq)] = torch.tensor(seq)
            attention_mask[i, : len(seq)] = 1
            targets[i, len(p) - 1 : len(seq) - 1] = torch.tensor(s.token_ids)
            rollout_logp[i, len(p) - 1 : len(seq) - 1] = torch.tensor(s.logprobs)
            last[i] = len(seq) - 2
        mask = targets != -100
        truncated = torch.tensor([s.finish_reason == "length" for _, s in rows])
        response_lengths = torch.tensor([len(s.token_ids) for _, s in rows])
        device = next(self.policy.parameters()).device
        input_ids, attention_mask, targets = input_ids.to(device), attention_mask.to(device), targets.to(device)
        # NOTE: an on-policy update (one epoch, one minibatch) has old = detached current log-probs (ratio 1), so
        # its own forward gives them; the KL in the reward, though, needs them before the update.
        on_policy = (cfg.reuse_logprobs and cfg.ppo_epochs == 1
                     and not (cfg.algorithm in KL_IN_REWARD and cfg.kl_in_reward)
                     and cfg.prompts_per_iteration * cfg.n_samples <= cfg.minibatch_size)
        prompt_len = torch.tensor([len(p) for p, _ in rows], device=device)
        old_logp = None if on_policy else self._logprobs(self.policy_module, input_ids, attention_mask, targets,
                                                         prompt_len=prompt_len)
        if self.reference is not None:
            ref_logp = self._logprobs(self.reference, input_ids, attention_mask, targets, prompt_len=prompt_len)
        else:  # LoRA: the reference is the policy with its adapters disabled
            with as_reference(self.policy):
                ref_logp = self._logprobs(self.policy_module, input_ids, attention_mask, targets,
                                          prompt_len=prompt_len)
        if scored is not None:  # dynamic sampling scored the groups already
            scores, reward_errors, reward_extras = scored
        elif pending is not None:
            scores, reward_errors, reward_extras = pending.result()
        else:
            scores, reward_errors, reward_extras = self._model_scores([p + s.token_ids for p, s in rows]), 0, {}
        scores = scores.to(device)
        finite = bool(torch.isfinite(scores).all()) and (baseline is None or bool(torch.isfinite(baseline).all()))
        (bad_rewards,) = self.dist.all_reduce([float(not finite)])
        if bad_rewards:
            if not cfg.skip_nonfinite:
                raise FloatingPointError(f"iteration {self.iteration}: a reward is not finite (NaN or inf from the "
                                         f"reward model or reward_fn); fix the reward, or set skip_nonfinite: true")
            scores = torch.nan_to_num(scores, nan=0.0, posinf=0.0, neginf=0.0)  # the update is skipped anyway
            baseline = None if baseline is None else torch.nan_to_num(baseline, nan=0.0, posinf=0.0, neginf=0.0)
        raw_scores = scores
        if cfg.overlong_buffer:  # DAPO: a soft punishment inside the last overlong_buffer tokens
            scores = scores + overlong_penalty(response_lengths, cfg.max_new_tokens, cfg.overlong_buffer,
                                               cfg.overlong_penalty).to(device)
        mask, rollout_logp, last = mask.to(device), rollout_logp.to(device), last.to(device)
        truncated = truncated.to(device)
        sample_logp = rollout_logp if on_policy else old_logp
        kl = kl_penalty(sample_logp, ref_logp, cfg.kl_reward_kind) * mask
        batch = dict(input_ids=input_ids, attention_mask=attention_mask, targets=targets, mask=mask,
                     ref_logp=ref_logp, rollout_logp=rollout_logp, prompt_len=prompt_len,
                     # the policy loss's mask: mask_truncated drops completions cut at max_new_tokens
                     loss_mask=mask & ~truncated[:, None] if cfg.mask_truncated else mask)
        if not on_policy:
            batch["old_logp"] = old_logp
        if cfg.algorithm in KL_IN_REWARD:  # per-token rewards: the score at the last token, minus the KL if asked
            rewards = torch.zeros_like(ref_logp)
            rewards[torch.arange(b, device=device), last] = scores
            if cfg.kl_in_reward:
                rewards = rewards - self.kl_reward_coef * kl
        if cfg.algorithm == "ppo":
            with self._autocast():
                values = self.critic_module(input_ids, attention_mask)[:, :-1] * mask
            advantages, returns = gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
            batch.update(values=values, returns=returns)
            # how much of the returns' variance the critic explains (1 perfect, 0 a constant guess, < 0 worse)
            unexplained = masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-8)
            explained_variance = 1.0 - float(unexplained)
        elif cfg.algorithm == "reinforce++":  # G_t = r_t + gamma G_{t+1} of the KL-shaped token rewards
            advantages = reinforce_pp_returns(rewards, mask, cfg.gamma, whiten=False)  # whitened below, globally
        elif cfg.algorithm == "remax":  # each sample's reward minus its prompt's greedy sample's
            advantages = (scores - baseline.to(device).repeat_interleave(cfg.n_samples))[:, None] * mask
        else:
            group = group_advantages(scores, cfg.n_samples, kind=cfg.algorithm)
            advantages = group[:, None].expand_as(ref_logp) * mask
        if cfg.whiten_advantages:
            # over the global batch: mean and variance from every rank's tokens
            reduce = self.dist.all_reduce if self.dist.enabled else None
            advantages = masked_whiten(advantages, mask, all_reduce=reduce)
        batch["advantages"] = advantages
        # logged KL: k3 (exp(r) - 1 - r with r = ref - logp, >= 0 token by token) summed per sequence; k1, the
        # reward's default estimator, is unbiased but a batch mean of it can be negative
        # (clamped at 0: exp(r) - 1 - r can round to -1e-8 for a tiny r in fp32)
        seq_kl_k3 = (kl_penalty(sample_logp, ref_logp, "k3").clamp(min=0) * mask).sum(-1).mean()
        stats = {
            "reward_mean": raw_scores.mean().item(),
            "reward_std": raw_scores.std().item() if b > 1 else 0.0,
            "kl": seq_kl_k3.item(),
            # kl_reward_kind per sequence: what the reward subtracts and the adaptive controller reads
            "kl_reward": kl.sum(-1).mean().item(),
            "response_length": mask.sum(-1).float().mean().item(),
            "truncated": truncated.float().mean().item(),  # share of samples cut at max_new_tokens
            "rollout_seconds": rollout_seconds,
            "tokens_per_s": self.engine.stats["decode_tokens"] / max(rollout_seconds, 1e-9),
        }
        if self.config.reward_on_error is not None:
            stats["reward_errors"] = float(reward_errors)  # samples scored reward_on_error
        if cfg.overlong_buffer:
            stats["overlong_penalty"] = (scores - raw_scores).mean().item()
        stats.update({f"reward/{k}": v for k, v in reward_extras.items()})  # a reward_fn's own logged numbers
        stats.update(sampling_stats)
        if not on_policy:  # else the update measures it on its own forward
            stats["logprob_mismatch_max"] = ((old_logp - rollout_logp).abs() * mask).max().item()
        if cfg.algorithm == "ppo":
            stats["explained_variance"] = explained_variance
        return {"batch": batch, "stats": self._reduce(stats), "responses": texts_r, "prompts": texts_p,
                "scores": scores, "skip": bool(bad_rewards)}
