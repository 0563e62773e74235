"""Decoding with a PALM model: greedy, sampling (temperature, top-k, top-p) or beam search, of one source
sequence (`generate`) or of a padded batch of them (`generate_batch`), each row decoded as it would be alone.

The encoder runs once; each step asks the model for the next token's log-probabilities of every row, feeding only
the new token when a key/value cache is used (use_cache=False reruns the whole prefix: the reference it must
match). A batch steps until all its rows are done and, where ranks decode together (pretrain.generate under
ZeRO-3, whose every step gathers the decoder's parameters from all ranks), until every rank's batch is:
`all_done`, as transformers' synced_gpus.
"""
from __future__ import annotations

from typing import Callable

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


SETTINGS = ("strategy", "num_beams", "max_new_tokens", "min_new_tokens", "length_penalty", "no_repeat_ngram_size",
            "top_k", "top_p", "temperature")  # what generate takes besides the model, the source and the ids


def decoding_settings(config) -> dict:
    """The SETTINGS of a config (pretrain.generate's, a task's task.decoding), checked: ValueError on a bad one."""
    settings = {k: config[k] for k in SETTINGS}
    check_args(*(settings[k] for k in ("strategy", "top_k", "top_p", "temperature", "num_beams", "min_new_tokens",
                                       "no_repeat_ngram_size")))  # fmt: skip
    return settings


def _check_input(max_new_tokens: int, max_positions: int, enc_input_ids: torch.Tensor) -> None:
    if not 1 <= max_new_tokens <= max_positions:  # the decoder's last input is bos + max_new_tokens - 1 tokens
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be in [1, max_positions={max_positions}]")
    if enc_input_ids.dim() != 2:
        raise ValueError(f"enc_input_ids has shape {list(enc_input_ids.shape)}: must be [B, S]")


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


def row_generator(seed: int, index: int, device) -> torch.Generator:
    """The sampling generator of source `index` under `seed`: a function of the two (distinct for fewer than
    1,000,003 sources), so that a source's draws depend neither on its batch nor on the rank that decodes it."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + index)


def _constrain(logprobs: torch.Tensor, seqs: torch.Tensor, eos_id: int, min_new_tokens: int, no_repeat: int,
               vocab_tokens: int | None = None) -> torch.Tensor:  # fmt: skip
    """The next-token scores of each row of seqs ([n, 1 + tokens so far], bos first) with eos barred before
    min_new_tokens new tokens and, when no_repeat > 0, every token that would repeat an n-gram of the row (bos
    included) barred: transformers' MinNewTokensLength and NoRepeatNGram processors, so an export decodes alike.
    vocab_tokens: the ids from it on (the rows an embedding is padded with, which no token has) are barred too."""
    if vocab_tokens is not None and vocab_tokens < logprobs.shape[-1]:
        logprobs = logprobs.clone()
        logprobs[:, vocab_tokens:] = float("-inf")
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


def generate(
    model: Palm, enc_input_ids: torch.Tensor, *, bos_id: int, eos_id: int, max_new_tokens: int, strategy: str,
    top_k: int = 0, top_p: float = 1.0, temperature: float = 1.0, num_beams: int = 4, length_penalty: float = 1.0,
    generator: torch.Generator | None = None, use_cache: bool = True, min_new_tokens: int = 0,
    no_repeat_ngram_size: int = 0, vocab_tokens: int | None = None,
) -> list[int]:  # fmt: skip
    """The new tokens for the source enc_input_ids [1, S] (eos excluded), at most max_new_tokens of them; eos is
    barred before min_new_tokens, with no_repeat_ngram_size=n no n-gram occurs twice (bos counted), and with
    vocab_tokens no id from it on is chosen (the tokenizer's size: an embedding's padding rows)."""
    if enc_input_ids.dim() != 2 or enc_input_ids.shape[0] != 1:
        raise ValueError(f"enc_input_ids has shape {list(enc_input_ids.shape)}: must be [1, S], one source sequence")
    return generate_batch(
        model, enc_input_ids, torch.ones_like(enc_input_ids, dtype=torch.bool), bos_id=bos_id, eos_id=eos_id,
        max_new_tokens=max_new_tokens, strategy=strategy, top_k=top_k, top_p=top_p, temperature=temperature,
        num_beams=num_beams, length_penalty=length_penalty, generators=[generator], use_cache=use_cache,
        min_new_tokens=min_new_tokens, no_repeat_ngram_size=no_repeat_ngram_size, vocab_tokens=vocab_tokens,
    )[0]  # fmt: skip


@torch.no_grad()
def generate_batch(
    model: Palm, enc_input_ids: torch.Tensor, enc_attention_mask: torch.Tensor, *, bos_id: int, eos_id: int,
    max_new_tokens: int, strategy: str, top_k: int = 0, top_p: float = 1.0, temperature: float = 1.0,
    num_beams: int = 4, length_penalty: float = 1.0, generators: list[torch.Generator | None] | None = None,
    use_cache: bool = True, min_new_tokens: int = 0, no_repeat_ngram_size: int = 0, vocab_tokens: int | None = None,
    all_done: Callable[[bool], bool] = lambda done: done,
) -> list[list[int]]:  # fmt: skip
    """The new tokens of each source row of enc_input_ids [B, S], padded on the right (enc_attention_mask False
    there: positions count from the left), as `generate` gives them for that row alone. Sampling draws row i from
    generators[i] (None: torch's global one). all_done(this batch is done) -> whether to stop: every rank's batch
    is done, where ranks step together."""
    check_args(strategy, top_k, top_p, temperature, num_beams, min_new_tokens, no_repeat_ngram_size)
    _check_input(max_new_tokens, model.cfg.max_positions, enc_input_ids)
    generators = generators or [None] * enc_input_ids.shape[0]
    if len(generators) != enc_input_ids.shape[0] or enc_attention_mask.shape != enc_input_ids.shape:
        raise ValueError(f"{len(generators)} generators and a mask of {list(enc_attention_mask.shape)} for"
                         f" enc_input_ids of {list(enc_input_ids.shape)}")  # fmt: skip
    was_training = model.training
    model.eval()
    try:
        memory = model.encode(enc_input_ids, enc_attention_mask)
        cache = model.new_cache() if use_cache else None
        constrain = lambda lp, seqs: _constrain(lp, seqs, eos_id, min_new_tokens, no_repeat_ngram_size, vocab_tokens)  # noqa: E731
        if strategy == "beam":
            return _beam(model, enc_input_ids, enc_attention_mask, memory, cache, bos_id, eos_id, max_new_tokens,
                         num_beams, length_penalty, constrain, all_done)  # fmt: skip
        rows = enc_input_ids.shape[0]
        seqs = torch.full((rows, 1), bos_id, device=enc_input_ids.device)  # [B, 1 + tokens so far], bos first
        out: list[list[int]] = [[] for _ in range(rows)]
        done = [False] * rows
        for _ in range(max_new_tokens):
            if all_done(all(done)):
                break
            logprobs, cache = model.next_token_logprobs(seqs, memory, enc_attention_mask, enc_input_ids, cache)
            logprobs = constrain(logprobs, seqs)
            if strategy == "greedy":
                nxt = logprobs.argmax(-1).tolist()
            else:  # each row from its own generator, so that a row's draws do not depend on its batch
                nxt = [eos_id if done[r] else int(torch.multinomial(_filter(logprobs[r], temperature, top_k, top_p)
                                                                    .softmax(-1), 1, generator=generators[r]))
                       for r in range(rows)]  # fmt: skip
            for r in range(rows):
                if done[r] or nxt[r] == eos_id:
                    done[r], nxt[r] = True, eos_id  # a finished row is fed eos until the batch is done
                else:
                    out[r].append(nxt[r])
            seqs = torch.cat([seqs, torch.tensor(nxt, device=seqs.device)[:, None]], 1)
        return out
    finally:
        model.train(was_training)


def _beam(
    model: Palm, enc_input_ids: torch.Tensor, mask: torch.Tensor, memory: torch.Tensor, cache: DecoderCache | None,
    bos_id: int, eos_id: int, max_new_tokens: int, num_beams: int, length_penalty: float, constrain,
    all_done: Callable[[bool], bool],
) -> list[list[int]]:  # fmt: skip
    """Beam search of each row; a hypothesis' final score is its summed log-probability / len**length_penalty, len
    counting its new tokens (eos included). Each row starts from one beam (its other num_beams - 1 at -inf), which
    the first step expands to num_beams. A row is done once its best live beam, judged as if it ended now, can no
    longer enter its num_beams best finished ones."""
    rows, k, device = enc_input_ids.shape[0], num_beams, enc_input_ids.device
    per_beam = lambda t: t.repeat_interleave(k, 0)  # noqa: E731  (row r's beams are rows r*k .. r*k + k - 1)
    memory, mask, enc_input_ids = per_beam(memory), per_beam(mask), per_beam(enc_input_ids)
    seqs = torch.full((rows * k, 1), bos_id, device=device)  # [rows * beams, 1 + tokens so far]
    scores = torch.zeros(rows, k, device=device)  # summed log-probabilities of the live beams
    scores[:, 1:] = float("-inf")
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(rows)]
    best: list[list[int] | None] = [None] * rows  # a done row's answer
    for step in range(1, max_new_tokens + 1):  # step = the length of the hypotheses this step makes
        if all_done(all(b is not None for b in best)):
            break
        logprobs, cache = model.next_token_logprobs(seqs, memory, mask, enc_input_ids, cache)
        logprobs = constrain(logprobs, seqs)
        vocab = logprobs.shape[-1]
        # 2 * num_beams candidates a row: however many of them end in eos, num_beams live ones remain.
        cand_scores, cand = (scores.view(-1, 1) + logprobs).view(rows, k * vocab).topk(min(2 * k, k * vocab), dim=-1)
        beams, tokens, new_scores = [], [], []
        for r in range(rows):
            if best[r] is not None:  # done: its beams stay as they are, fed eos
                beams += range(r * k, (r + 1) * k)
                tokens += [eos_id] * k
                new_scores.append(scores[r])
                continue
            keep: list[int] = []
            for rank, (score, c) in enumerate(zip(cand_scores[r].tolist(), cand[r].tolist())):
                beam, token = divmod(c, vocab)
                if score == float("-inf"):
                    break
                if token == eos_id:
                    if rank < k:  # an eos below the top num_beams would not have been a beam either
                        finished[r].append((score / step**length_penalty, seqs[r * k + beam, 1:].tolist()))
                elif len(keep) < k:
                    keep.append(rank)
            dead = k - len(keep)  # fewer live candidates than beams (a tiny vocab, n-grams barred): dead beams, fed eos
            beams += [r * k + c // vocab for c in cand[r, keep].tolist()] + [r * k] * dead
            tokens += (cand[r, keep] % vocab).tolist() + [eos_id] * dead
            new_scores.append(torch.cat([cand_scores[r, keep], cand_scores.new_full((dead,), float("-inf"))]))
            finished[r].sort(key=lambda f: f[0], reverse=True)
            if not keep:  # no live beam left: the best finished hypothesis, or none
                best[r] = finished[r][0][1] if finished[r] else []
            elif len(finished[r]) >= k and finished[r][k - 1][0] >= float(new_scores[-1][0]) / step**length_penalty:
                best[r] = finished[r][0][1]
        index = torch.tensor(beams, device=device)
        seqs = torch.cat([seqs[index], torch.tensor(tokens, device=device)[:, None]], 1)
        scores = torch.stack(new_scores)
        if cache is not None:
            cache.reorder(index)
    return [b if b is not None else _best_at_the_end(finished[r], seqs[r * k : (r + 1) * k], scores[r],
                                                     max_new_tokens**length_penalty)
            for r, b in enumerate(best)]  # fmt: skip


def _best_at_the_end(finished: list[tuple[float, list[int]]], seqs: torch.Tensor, scores: torch.Tensor,
                     norm: float) -> list[int]:  # fmt: skip
    """A row not done within max_new_tokens: the best of its finished hypotheses and its live beams (seqs, scores:
    the row's beams; norm: max_new_tokens**length_penalty)."""
    live = [(float(s) / norm, seqs[i, 1:].tolist()) for i, s in enumerate(scores) if s > float("-inf")]
    return max(finished + live, key=lambda f: f[0])[1]
