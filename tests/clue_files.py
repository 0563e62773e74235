"""Small CLUE task directories written in CLUE's released format, for tests (the data cannot be downloaded here).

The format, per CLUEbenchmark/CLUE's README and its baselines' readers (baselines/models/classifier_utils.py), and
the first lines of the real files as PaddleNLP's dataset tests quote them: train.json (OCNLI: train.50k.json),
dev.json and test.json, one JSON object a line; labels as strings; test lines without a label and with an integer
"id"; TNEWS and IFLYTEK with labels.json ({"label", "label_desc"} and {"label", "label_des"} a line); TNEWS lines
{"label", "label_desc", "sentence", "keywords"}; IFLYTEK {"label", "label_des", "sentence"}; OCNLI lines with
"level", "label0".."label4", "genre", "prem_id" and "id", and "-" where the annotators had no majority; WSC
{"target": {"span1_index", "span1_text", "span2_index", "span2_text"}, "idx", "label", "text"} ("id" in test);
CSL {"id", "abst", "keyword": [...], "label"}. The text is the synthetic corpus's (tests/synthetic.py).
"""
import json
import random

from synthetic import CITIES, NAMES, synthetic_documents

SIZES = {"train": 48, "dev": 13, "test": 11}
TNEWS_LABELS = [("100", "news_story"), ("102", "news_entertainment"), ("108", "news_edu")]
IFLYTEK_LABELS = [("0", "打车"), ("1", "地图导航"), ("110", "社区超市")]
NLI = ["entailment", "neutral", "contradiction"]


def _sentences(seed: int) -> list[str]:
    return [s for doc in synthetic_documents(120, seed=seed) for p in doc for s in p]


def _wsc_line(rng: random.Random, sentences: list[str]) -> dict:
    """A text with a name (the candidate) and a pronoun 他 after it or before it."""
    name = rng.choice(NAMES)
    s = next(x for x in rng.sample(sentences, len(sentences)) if name in x)
    text = s + "后来他回家了。" if rng.random() < 0.5 else "他说：" + s
    pronoun = text.index("他") if text.startswith("他") else text.rindex("他")
    return {"target": {"span1_index": text.index(name), "span1_text": name, "span2_index": pronoun, "span2_text": "他"},
            "label": rng.choice(["true", "false"]), "text": text}  # fmt: skip


def _line(task: str, rng: random.Random, sentences: list[str]) -> dict:
    a, b = rng.sample(sentences, 2)
    if task == "afqmc":
        return {"sentence1": a, "sentence2": b, "label": rng.choice("01")}
    if task == "tnews":
        label, desc = rng.choice(TNEWS_LABELS)
        return {"label": label, "label_desc": desc, "sentence": a, "keywords": ",".join(c for c in CITIES if c in a)}
    if task == "iflytek":
        label, desc = rng.choice(IFLYTEK_LABELS)
        return {"label": label, "label_des": desc, "sentence": a}
    if task in ("ocnli", "cmnli"):
        label = rng.choice(NLI + ["-"])  # "-": no majority among the annotators
        line = {"sentence1": a, "sentence2": b, "label": label}
        if task == "ocnli":
            line = {"level": "medium", **line, **{f"label{k}": rng.choice(NLI) for k in range(5)}, "genre": "lit",
                    "prem_id": f"lit_{rng.randrange(1000)}"}  # fmt: skip
        return line
    if task == "cluewsc2020":
        return _wsc_line(rng, sentences)
    if task == "csl":
        return {"abst": a + b, "keyword": [w for w in NAMES + CITIES if w in a][:4] or [NAMES[0]], "label": rng.choice("01")}
    raise ValueError(task)


def write_clue_task(root, task: str, seed: int = 0) -> str:
    """A directory holding `task`'s files as CLUE releases them; its path."""
    rng, sentences = random.Random(seed), _sentences(seed)
    d = root / task
    d.mkdir(parents=True)
    for split, n in SIZES.items():
        lines = [_line(task, rng, sentences) for _ in range(n)]
        for i, line in enumerate(lines):
            if split == "test":  # no label; an integer id (CSL's do not follow the line numbers)
                line.pop("label")
                for k in ("label_desc", "label_des", "level", "genre", "prem_id", *(f"label{j}" for j in range(5))):
                    line.pop(k, None)
                lines[i] = {"id": 2415 + 3 * i if task == "csl" else i, **line}
            elif task == "ocnli" or task == "csl":
                line["id"] = i
            elif task == "cluewsc2020":
                line["idx"] = 100 + i
        name = "train.50k.json" if (task, split) == ("ocnli", "train") else f"{split}.json"
        with open(d / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    labels = {"tnews": [{"label": k, "label_desc": v} for k, v in TNEWS_LABELS],
              "iflytek": [{"label": k, "label_des": v} for k, v in IFLYTEK_LABELS]}.get(task)  # fmt: skip
    if labels:
        (d / "labels.json").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in labels), encoding="utf-8")
    return str(d)
