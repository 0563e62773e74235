"""Decoding one source sequence with a PALM model: greedy, sampling (temperature, top-k, top-p) or beam search.

The encoder runs once; each step asks the model for the next token's log-probabilities, feeding only the
new token when a key/value cache is used (use_cache=False reruns the whole prefix: the reference it must match).
"""
from __future__ import annotations

import torch

from pretrain.models.palm import DecoderCache, Palm

STRATEGIES = ("greedy", "sample", "beam")


def check_args(strategy: str, top_k: int, top_p: float, temperature: float, num_beams: int,
               min_new_tokens: int = 0, no_repeat_ngram_size: int = 0) -> None:  # fmt: skip
    """The decoding settings alone, so that a command line can be checked before a model is loaded."""
    if min_new_tokens < 0:
        raise ValueError(f"min_new_tokens={min_new_tokens}: must be >= 0")
    if no_repeat_ngram_size < 0:
        raise ValueError(f"no_repeat_ngram_size={no_repeat_ngram_size}: must be >= 0 (0 = off)")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}: must be one of {', '.join(STRATEGIES)}")
    if top_k < 0:
        raise ValueError(f"top_k={top_k}: must be >= 0 (0 = no top-k filtering)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p}: must be in (0, 1] (1 = no nucleus filtering)")
    if temperature <= 0.0:
        raise ValueError(f"temperature={temperature}: must be > 0 (use strategy='greedy' for argmax decoding)")
    if num_beams < 1:
        raise ValueError(f"num_beams={num_beams}: must be >= 1")


def _check_input(max_new_tokens: int, max_positions: int, enc_input_ids: torch.Tensor) -> None:
    if not 1 <= max_new_tokens <= max_positions:  # the decoder's last input is bos + max_new_tokens - 1 tokens
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be in [1, max_positions={max_positions}]")
    if enc_input_ids.dim() != 2 or enc_input_ids.shape[0] != 1:
        raise ValueError(f"enc_input_ids has shape {list(enc_input_ids.shape)}: must be [1, S], one source sequence")


def _filter(logprobs: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then top-p: logits with the excluded tokens at -inf."""
    logits = logprobs / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        p = sorted_logits.softmax(-1)
        drop = p.cumsum(-1) - p >= top_p  # the mass before a token already reaches top_p: the first always stays
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _constrain(logprobs: torch.Tensor, seqs: torch.Tensor, eos_id: int, min_new_tokens: int, no_repeat: int) -> torch.Tensor:
    """The next-token scores of each row of seqs ([n, 1 + tokens so far], bos first) with eos barred before
    min_new_tokens new tokens and, when no_repeat > 0, every token that would repeat an n-gram of the row (bos
    included) barred: transformers' MinNewTokensLength and NoRepeatNGram processors, so an export decodes alike."""
    if seqs.shape[1] - 1 < min_new_tokens:
        logprobs = logprobs.clone()
        logprobs[:, eos_id] = float("-inf")
    if no_repeat > 0 and seqs.shape[1] >= no_repeat:
        banned = []
        for row in seqs.tolist():
            prefix = tuple(row[len(row) - no_repeat + 1 :])
            banned.append({row[i + no_repeat - 1] for i in range(len(row) - no_repeat + 1) if tuple(row[i : i + no_repeat - 1]) == prefix})
        if any(banned):
            logprobs = logprobs.clone()
            for r, tokens in enumerate(banned):
                logprobs[r, list(tokens)] = float("-inf")
    return logprobs


@torch.no_grad()
def generate(
    model: Palm, enc_input_ids: torch.Tensor, *, bos_id: int, eos_id: int, max_new_tokens: int, strategy: str,
    top_k: int = 0, top_p: float = 1.0, temperature: float = 1.0, num_beams: int = 4, length_penalty: float = 1.0,
    generator: torch.Generator | None = None, use_cache: bool = True, min_new_tokens: int = 0,
    no_repeat_ngram_size: int = 0,
) -> list[int]:  # fmt: skip
    """The new tokens for the source enc_input_ids [1, S] (eos excluded), at most max_new_tokens of them; eos is
    barred before min_new_tokens, and with no_repeat_ngram_size=n no n-gram occurs twice (bos counted)."""
    check_args(strategy, top_k, top_p, temperature, num_beams, min_new_tokens, no_repeat_ngram_size)
    _check_input(max_new_tokens, model.cfg.max_positions, enc_input_ids)
    was_training = model.training
    model.eval()
    try:
        mask = torch.ones_like(enc_input_ids, dtype=torch.bool)
        memory = model.encode(enc_input_ids, mask)
        cache = model.new_cache() if use_cache else None
        constrain = lambda lp, seqs: _constrain(lp, seqs, eos_id, min_new_tokens, no_repeat_ngram_size)  # noqa: E731
        if strategy == "beam":
            return _beam(model, enc_input_ids, mask, memory, cache, bos_id, eos_id, max_new_tokens, num_beams,
                         length_penalty, constrain)  # fmt: skip
        tokens = [bos_id]
        for _ in range(max_new_tokens):
            dec = torch.tensor([tokens], device=enc_input_ids.device)
            logprobs, cache = model.next_token_logprobs(dec, memory, mask, enc_input_ids, cache)
            logprobs = constrain(logprobs, dec)
            if strategy == "greedy":
                nxt = int(logprobs[0].argmax())
            else:
                probs = _filter(logprobs[0], temperature, top_k, top_p).softmax(-1)
                nxt = int(torch.multinomial(probs, 1, generator=generator))
            if nxt == eos_id:
                break
            tokens.append(nxt)
        return tokens[1:]
    finally:
        model.train(was_training)


def _beam(
    model: Palm, enc_input_ids: torch.Tensor, mask: torch.Tensor, memory: torch.Tensor, cache: DecoderCache | None,
    bos_id: int, eos_id: int, max_new_tokens: int, num_beams: int, length_penalty: float, constrain,
) -> list[int]:  # fmt: skip
    """Beam search; a hypothesis' final score is its summed log-probability / len**length_penalty, len counting
    its new tokens (eos included). Starts from one beam, which the first step expands to num_beams."""
    seqs = torch.tensor([[bos_id]], device=enc_input_ids.device)  # [beams, 1 + tokens so far]
    scores = torch.zeros(1, device=enc_input_ids.device)  # summed log-probabilities of the live beams
    finished: list[tuple[float, list[int]]] = []
    for step in range(1, max_new_tokens + 1):  # step = the length of the hypotheses this step makes
        n = seqs.shape[0]
        # every beam reads the same source: expanded views, no copies
        logprobs, cache = model.next_token_logprobs(
            seqs, memory.expand(n, -1, -1), mask.expand(n, -1), enc_input_ids.expand(n, -1), cache
        )
        logprobs = constrain(logprobs, seqs)
        vocab = logprobs.shape[-1]
        # 2 * num_beams candidates: however many of them end in eos, num_beams live ones remain.
        cand_scores, cand = (scores[:, None] + logprobs).view(-1).topk(min(2 * num_beams, n * vocab))
        keep: list[int] = []
        for rank, (score, c) in enumerate(zip(cand_scores.tolist(), cand.tolist())):
            beam, token = divmod(c, vocab)
            if token == eos_id:
                if rank < num_beams:  # an eos below the top num_beams would not have been a beam either
                    finished.append((score / step**length_penalty, seqs[beam, 1:].tolist()))
            elif len(keep) < num_beams:
                keep.append(rank)
        idx = torch.tensor(keep, device=cand.device)
        beams = cand[idx] // vocab
        seqs = torch.cat([seqs[beams], (cand[idx] % vocab)[:, None]], 1)
        scores = cand_scores[idx]
        if cache is not None:
            cache.reorder(beams)
        finished.sort(key=lambda f: f[0], reverse=True)
        # Judged as if it ended now (the usual heuristic): can the best live beam still enter the n best?
        if len(finished) >= num_beams and finished[num_beams - 1][0] >= float(scores[0]) / step**length_penalty:
            return finished[0][1]
    live = [(float(s) / max_new_tokens**length_penalty, seq[1:].tolist()) for s, seq in zip(scores, seqs)]
    return max(finished + live, key=lambda f: f[0])[1]
