"""The metrics of the fine-tuning tasks, all in percent: a perfect prediction scores 100.

- classification: accuracy and macro-F1 (the unweighted mean of the per-label F1 over the labels that occur
  in the references or the predictions).
- token classification: entity-level precision, recall and F1 over BIO tags, as conlleval counts them: an
  entity is a maximal (type, start, end) run; it is correct only when the type and both ends match; an I-X
  that does not continue an X entity starts one.
- generation: corpus BLEU-4 from sacrebleu's defaults but for tokenize="zh" (each CJK character is a token;
  runs of other characters are split as by sacrebleu's 13a tokenizer: words and punctuation): one reference per
  example, case kept, exponential smoothing; the signature `nrefs:1|case:mixed|eff:no|tok:zh|smooth:exp|version:..`
  (BLEU_SIGNATURE, written into results.json) is the setting WMT reports Chinese BLEU with. ROUGE-L: the mean over
  examples of the F1 (beta 1) of the longest common subsequence of characters, whitespace removed.
"""
from __future__ import annotations

BLEU_TOKENIZE = "zh"


def _pct(x: float) -> float:
    return 100.0 * x


def accuracy_and_macro_f1(gold: list[str], pred: list[str]) -> dict[str, float]:
    if len(gold) != len(pred) or not gold:
        raise ValueError(f"{len(gold)} references and {len(pred)} predictions: need the same, non-zero number")
    correct = sum(g == p for g, p in zip(gold, pred))
    f1s = []
    for label in sorted(set(gold) | set(pred)):
        tp = sum(g == p == label for g, p in zip(gold, pred))
        n_gold, n_pred = gold.count(label), pred.count(label)
        f1s.append(2 * tp / (n_gold + n_pred))  # n_gold + n_pred > 0: the label occurs in one of them
    return {"accuracy": _pct(correct / len(gold)), "macro_f1": _pct(sum(f1s) / len(f1s))}


def entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """(type, first, last) of each entity of a BIO sequence, conlleval's way (see the module docstring)."""
    out, current = set(), None  # current: [type, first, last]
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, kind = tag.partition("-")
        continues = prefix == "I" and current is not None and current[0] == kind
        if current is not None and not continues:
            out.add(tuple(current))
            current = None
        if prefix == "B" or (prefix == "I" and not continues):
            current = [kind, i, i]
        elif continues:
            current[2] = i
    return out


def entity_f1(gold: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} references and {len(pred)} predictions: need the same number")
    tp = n_gold = n_pred = 0
    for g, p in zip(gold, pred):
        if len(g) != len(p):
            raise ValueError(f"a prediction of {len(p)} tags for {len(g)} tokens")
        ge, pe = entities(g), entities(p)
        tp, n_gold, n_pred = tp + len(ge & pe), n_gold + len(ge), n_pred + len(pe)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": _pct(precision), "recall": _pct(recall), "f1": _pct(f1)}


def lcs_length(a: str, b: str) -> int:
    prev = [0] * (len(b) + 1)
    for ca in a:
        cur = [0]
        for j, cb in enumerate(b):
            cur.append(prev[j] + 1 if ca == cb else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(reference: str, prediction: str) -> float:
    ref, hyp = "".join(reference.split()), "".join(prediction.split())
    lcs = lcs_length(ref, hyp)
    if lcs == 0:
        return 0.0
    recall, precision = lcs / len(ref), lcs / len(hyp)
    return 2 * precision * recall / (precision + recall)


def generation_scores(gold: list[str], pred: list[str]) -> dict[str, float]:
    import sacrebleu  # sacrebleu: only the generation tasks score BLEU

    if len(gold) != len(pred) or not gold:
        raise ValueError(f"{len(gold)} references and {len(pred)} predictions: need the same, non-zero number")
    bleu = sacrebleu.corpus_bleu(pred, [gold], tokenize=BLEU_TOKENIZE)
    return {"bleu4": float(bleu.score), "rouge_l": _pct(sum(map(rouge_l, gold, pred)) / len(gold))}


def bleu_signature() -> str:
    """sacrebleu's own description of the BLEU computed here (its version included), for results.json."""
    import sacrebleu  # sacrebleu: only the generation tasks score BLEU

    scorer = sacrebleu.BLEU(tokenize=BLEU_TOKENIZE)
    scorer.corpus_score(["x"], [["x"]])  # the signature needs the number of references
    return str(scorer.get_signature())

