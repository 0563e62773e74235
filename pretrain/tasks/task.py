"""A task binds a labelled data set to a fine-tuning model and its metric, as a stage binds a corpus to the
pre-training objectives. It reads and encodes its files when built (so that bad input fails before any rank
starts), and the fine-tuning loop (pretrain/finetune.py) sees only: `kind`, `objectives`, `weights`,
`model_cfg`, `select`, `make_model()`, `train_loader()`, `eval_loader()`, `forward()`, `token_counts()`,
`decode()`, `predict()` and `score()`.

Predictions: on valid, from the partitioned engine (every rank runs the same number of batches; padding slots
have index -1); on test, once, from the selected checkpoint consolidated into a plain model on each rank, each
rank taking every world-th example (generation decodes one example at a time, which ranks could not do in step).
"""
from __future__ import annotations

import os
import sys
from functools import partial

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from pretrain.data.palm import collate_palm
from pretrain.data.sampling import StepSampler, pad_side
from pretrain.data.spans import EpochOrder
from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import UserError
from pretrain.labels import IGNORE
from pretrain.models.classifiers import SequenceClassifier, TokenClassifier
from pretrain.models.decoding import decoding_settings, generate, row_generator
from pretrain.objectives import CLS, LM, MLM, TAG
from pretrain.stages.palm import PalmStage
from pretrain.stages.structbert import StructBertStage
from pretrain.tasks import clue, data, metrics, qg
from pretrain.training.config import BatchGeometry, model_config
from pretrain.training.engine import to_device
from pretrain.training.run_dir import write_atomic

SPLITS = ("train", "valid", "test")


class Examples(Dataset):
    """Training: global sample index g -> an example of the epoch g // n, in a permutation drawn from (seed, epoch):
    a pure function of the index, so resume is exact. Evaluation (seed None): position p -> example p, padding
    positions (p >= n) -> example 0 with index -1."""

    def __init__(self, encoded: data.Encoded, seed: int | None, collate):
        self.samples, self.collate_fn = encoded.samples, collate
        self.order = None if seed is None else EpochOrder(seed, len(encoded))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, g: int) -> dict:
        if self.order is not None:
            i = self.order.locate(g)[1]
            return {**self.samples[i], "index": i}
        return {**self.samples[g if g < len(self.samples) else 0], "index": g if g < len(self.samples) else -1}


def _with_index(collate, samples: list[dict]) -> dict[str, torch.Tensor]:
    index = torch.tensor([s["index"] for s in samples])
    return {**collate([{k: v for k, v in s.items() if k != "index"} for s in samples]), "index": index}


def collate_encoder(samples: list[dict], pad_id: int, max_len: int) -> dict[str, torch.Tensor]:
    keys = {"input_ids": pad_id, "token_type_ids": 0} if "token_type_ids" in samples[0] else {"input_ids": pad_id}
    if "labels" in samples[0]:
        keys["labels"] = IGNORE
    out, mask = pad_side(samples, keys, max_len)
    if "label" in samples[0]:
        out["labels"] = torch.tensor([s["label"] for s in samples])
    return {**out, "attention_mask": mask}


class _Task:
    kind: str
    skipped: dict[str, int] = {}  # examples of each split a task's format says are not examples (CLUE's "-")
    generates = False  # a decoder: picked on the valid loss, its test outputs decoded
    test_labelled = True  # False: the test split has no labels (a benchmark's hidden test set): predicted, not scored
    select: tuple[str, bool]  # the valid column that picks the checkpoint, and whether higher is better
    stage = StructBertStage.name  # the pre-training stage whose model (or encoder) the task's model starts from
    needs_stage_two = False  # init_from must hold a decoder
    keeps_stage_model = False  # the task trains the stage's model itself (no new head): export and generate read it

    def __init__(self, cfg: DictConfig, tok: Tokenizer):
        t = cfg.task
        self.name, self.tok, self.seed = str(t.name), tok, int(cfg.seed)
        data_dir = str(cfg.data.dir)
        if not os.path.isdir(data_dir):
            raise UserError(f"data.dir={data_dir}: no such directory (the task's {', '.join(SPLITS)} files)")
        raw = self._read(data_dir, t)
        self.labels = self._labels(raw["train"], t)
        self.splits = {s: self._encode(s, raw[s], t) for s in SPLITS}
        self.seq_len = self._longest(t)  # the longest sequence a batch holds: the memory check's activations
        self.model_cfg = model_config(cfg.model, tok.vocab_size, self.seq_len, bool(cfg.deepspeed.activation_checkpointing),
                                      seq_len_key=self._length_key)  # fmt: skip
        self.num_workers = int(cfg.data.num_workers)
        self.weights = {o.name: 1.0 for o in self.objectives}
        self.fresh = self._fresh(t)
        self.files_read = self.data_files()  # when read: results.json records the copy the run trained on

    def _read(self, data_dir: str, t: DictConfig) -> dict[str, list[dict]]:
        """Each split's examples; sets `fields` and `paths` (every file read, for the results' checksums)."""
        self.fields = {role: (None if name is None else str(name)) for role, name in t.fields.items()}
        self.paths = {s: os.path.join(data_dir, str(t.files[s])) for s in SPLITS}
        return {s: data.read_jsonl(self.paths[s], self.fields) for s in SPLITS}

    def data_files(self) -> dict[str, dict]:
        """Every data file the task read, with its size and sha256: which copy of a data set a result is of."""
        return {key: {"path": os.path.abspath(path), "bytes": os.path.getsize(path), "sha256": data.checksum(path)}
                for key, path in self.paths.items()}  # fmt: skip

    def write_outputs(self, run_dir: str, predictions: list) -> dict[str, str]:
        """Files the test predictions make besides predictions.jsonl ({what: path}): none by default."""
        return {}

    def _fresh(self, t: DictConfig) -> tuple[str, ...]:
        """Prefixes of parameters that keep their fresh init even where the checkpoint has them."""
        return ()

    def _labels(self, train: list[dict], t: DictConfig) -> list[str] | None:
        return None

    def truncation_report(self) -> dict[str, int]:
        return {split: e.truncated for split, e in self.splits.items()}

    def warn_truncated(self) -> None:
        for split, n in self.skipped.items():
            if n:
                print(f"pretrain.finetune: {self.splits[split].path}: {n} lines without a majority label skipped",
                      file=sys.stderr)  # fmt: skip
        for e in self.splits.values():
            if e.truncated:
                print(f"pretrain.finetune: warning: {e.path}: {e.truncated} of {len(e)} examples longer than "
                      f"{self._length_key}, truncated", file=sys.stderr)  # fmt: skip

    # ---- loaders
    def _loader(self, dataset: Examples, batches, workers: int = 0) -> DataLoader:
        return DataLoader(dataset, batch_sampler=batches, collate_fn=partial(_with_index, dataset.collate_fn),
                          num_workers=workers, persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
                          generator=torch.Generator())  # fmt: skip

    def train_loader(self, geometry: BatchGeometry, rank: int, start_step: int, max_steps: int) -> DataLoader:
        sampler = StepSampler(micro_batch=geometry.micro, grad_accum=geometry.accum, world_size=geometry.world,
                              rank=rank, start_step=start_step, max_steps=max_steps)  # fmt: skip
        return self._loader(Examples(self.splits["train"], self.seed, self.collate), sampler, self.num_workers)

    def eval_loader(self, split: str, micro: int, world: int, rank: int) -> DataLoader:
        """Every example once, in batches of `micro`, the same number of batches on every rank."""
        n, per_round = len(self.splits[split]), micro * world
        rounds = -(-n // per_round)
        batches = [list(range(k * per_round + rank * micro, k * per_round + (rank + 1) * micro)) for k in range(rounds)]
        return self._loader(Examples(self.splits[split], None, self.collate), batches)

    def shard_loader(self, split: str, micro: int, world: int, rank: int) -> DataLoader:
        """Examples rank, rank + world, ... of `split` (no padding: for a plain model, no collectives)."""
        mine = list(range(rank, len(self.splits[split]), world))
        return self._loader(Examples(self.splits[split], None, self.collate),
                            [mine[i : i + micro] for i in range(0, len(mine), micro)])  # fmt: skip

    # ---- the model's side
    def forward(self, model, batch: dict[str, torch.Tensor], predict: bool):
        """(loss, stats, predictions or None): `model` is the engine (train, valid) or a plain model (test)."""
        inputs = {k: v for k, v in batch.items() if k != "index"}
        if predict:
            return model(inputs, self.weights, predict=True)
        return (*model(inputs, self.weights), None)

    def token_counts(self, batch: dict) -> tuple[int, int]:
        return int(batch["attention_mask"].sum()), batch["attention_mask"].numel()

    def predict(self, model, split: str, micro: int, world: int, rank: int) -> list[tuple[int, object]]:
        """(example index, prediction) for this rank's share of `split`, from a plain (consolidated) model."""
        out, device = [], next(model.parameters()).device
        with torch.no_grad():
            for batch in self.shard_loader(split, micro, world, rank):
                inputs = to_device(batch, device)
                out += self.decode(split, batch, self.forward(model, inputs, True)[2].cpu())
        return out

    def decode(self, split: str, batch: dict, predictions: torch.Tensor) -> list[tuple[int, object]]:
        """(example index, prediction) of the real (not padding) examples of a batch of `split`."""
        raise NotImplementedError

    def score(self, split: str, predictions: list) -> dict[str, float]:
        raise NotImplementedError

    def records(self, split: str, predictions: list) -> list[dict]:
        """predictions.jsonl: each example's input, reference and prediction."""
        e = self.splits[split]
        return [{**src, "reference": ref, "prediction": p} for src, ref, p in zip(e.sources, e.references, predictions)]


class ClassificationTask(_Task):
    """Sentence or sentence-pair classification (CLUE's TNEWS / IFLYTEK, AFQMC / CMNLI / OCNLI formats)."""

    kind, objectives, select = "classification", (CLS,), ("accuracy", True)
    _length_key = "task.max_len"

    def _labels(self, train, t):
        return data.label_list(self.paths["train"], train, self.fields, None if t.labels is None else list(t.labels))

    def _encode(self, split, raw, t):
        self.max_len = int(t.max_len)
        return data.encode_classification(self.paths[split], raw, self.fields, self.tok, self.labels, self.max_len)

    def _longest(self, t) -> int:
        return int(t.max_len)

    def _fresh(self, t):
        return () if bool(t.pretrained_pooler) else ("pooler.",)

    @property
    def collate(self):
        return partial(collate_encoder, pad_id=self.tok.pad_id, max_len=self.max_len)

    def make_model(self):
        return SequenceClassifier(self.model_cfg, len(self.labels))

    def decode(self, split, batch, predictions):
        return [(int(i), self.labels[int(p)]) for i, p in zip(batch["index"], predictions) if i >= 0]

    def score(self, split, predictions):
        return metrics.accuracy_and_macro_f1(self.splits[split].references, predictions)


class ClueTask(ClassificationTask):
    """One of CLUE's classification tasks (task.clue: afqmc, tnews, iflytek, ocnli, cmnli, cluewsc2020, csl) from
    its released directory as it is (tasks/clue.py): train on train.json, pick the checkpoint on dev.json's accuracy,
    predict test.json's hidden labels into CLUE's submission file."""

    kind, test_labelled = "clue", False

    def _read(self, data_dir, t):
        self.spec = clue.spec(str(t.clue))
        clue.check_marks(self.spec, self.tok.encode, self.tok.unk_id, self.tok.vocab_path)
        self.fields = {"text_a": "(built from the line: tasks/clue.py)", "label": "label"}
        self.paths = {s: clue.split_path(data_dir, self.spec, s) for s in SPLITS}
        if self.spec.labels is None:
            self.paths["labels"] = os.path.join(data_dir, "labels.json")
        self.clue_labels = clue.read_labels(data_dir, self.spec)
        raw, self.skipped = {}, {}
        for s in SPLITS:
            raw[s], self.skipped[s] = clue.read_split(self.paths[s], self.spec, s, self.clue_labels)
        self.test_examples = raw["test"]
        return raw

    def _labels(self, train, t):
        if t.labels is not None:
            raise UserError(f"task.labels: CLUE's {self.spec.name} has its own ({', '.join(self.clue_labels)})")
        return self.clue_labels

    def write_outputs(self, run_dir, predictions):
        path = os.path.join(run_dir, self.spec.submission)
        write_atomic(path, clue.submission(self.test_examples, predictions))
        return {"submission": path}


class TaggingTask(ClassificationTask):
    """Token classification over BIO tags (NER): entity-level precision, recall and F1."""

    kind, objectives, select = "token_classification", (TAG,), ("f1", True)

    def _labels(self, train, t):
        return data.tag_list(self.paths["train"], train, self.fields, None if t.labels is None else list(t.labels))

    def _encode(self, split, raw, t):
        self.max_len = int(t.max_len)
        return data.encode_tagging(self.paths[split], raw, self.fields, self.tok, self.labels, self.max_len)

    def _fresh(self, t):
        return ()

    def make_model(self):
        return TokenClassifier(self.model_cfg, len(self.labels))

    def decode(self, split, batch, predictions):
        out = []
        for row, i in enumerate(batch["index"].tolist()):
            if i >= 0:  # each token's tag is its first piece's; a token without one (cut, or blank) gets "O"
                first = self.splits[split].samples[i]["first_piece"]
                out.append((i, [self.labels[int(predictions[row, p])] if p >= 0 else "O" for p in first]))
        return out

    def score(self, split, predictions):
        return metrics.entity_f1(self.splits[split].references, predictions)


class GenerationTask(_Task):
    """Sequence to sequence (question generation, summarisation, titles) with PALM, from a stage-two checkpoint:
    teacher-forced cross-entropy; the checkpoint is picked on the valid loss; test outputs are decoded."""

    kind, objectives, select, needs_stage_two = "generation", (LM,), ("lm_loss", False), True
    stage, keeps_stage_model, generates = PalmStage.name, True, True
    _length_key = "task.src_max_len"

    def _encode(self, split, raw, t):
        self.src_max_len, self.tgt_max_len = int(t.src_max_len), int(t.tgt_max_len)
        for key, value in (("src_max_len", self.src_max_len), ("tgt_max_len", self.tgt_max_len)):
            if value < 3:
                raise UserError(f"task.{key}={value}: must be >= 3")
        return data.encode_generation(self.paths[split], raw, self.fields, self.tok, self.src_max_len, self.tgt_max_len)

    def _longest(self, t) -> int:
        return max(int(t.src_max_len), int(t.tgt_max_len))

    @property
    def collate(self):
        return partial(collate_palm, pad_id=self.tok.pad_id, enc_max_len=self.src_max_len, dec_max_len=self.tgt_max_len)

    def set_decoding(self, d: DictConfig) -> None:
        try:
            self.decoding = decoding_settings(d)
        except ValueError as e:
            raise UserError(f"task.decoding: {e}") from None
        if not 1 <= int(d.max_new_tokens) <= self.model_cfg.max_positions:
            raise UserError(f"task.decoding.max_new_tokens={d.max_new_tokens}: must be in [1, model.max_positions]")

    def make_model(self):
        return PalmStage.model_class()(self.model_cfg)

    def forward(self, model, batch, predict):
        inputs = {k: v for k, v in batch.items() if k != "index"}
        loss, stats = model(inputs, {LM.name: 1.0, MLM.name: 0.0})  # the source is not masked: no MLM term
        return loss, {LM.name: stats[LM.name]}, None

    def token_counts(self, batch):
        enc, dec = batch["enc_attention_mask"], batch["dec_attention_mask"]
        return int(enc.sum() + dec.sum()), enc.numel() + dec.numel()

    def predict(self, model, split, micro, world, rank):
        e, out, device = self.splits[split], [], next(model.parameters()).device
        for i in range(rank, len(e), world):
            new = generate(model, torch.from_numpy(e.samples[i]["enc_input_ids"])[None].to(device), bos_id=self.tok.cls_id,
                           eos_id=self.tok.sep_id, generator=row_generator(self.seed, i, device),
                           vocab_tokens=self.tok.vocab_size, **self.decoding)  # fmt: skip
            out.append((i, self.tok.decode(new)))
        return out

    def reference(self, text: str) -> str:
        """A target as the tokenizer normalises it (lower case, no [UNK]): the best output the model can give."""
        return self.tok.decode(self.tok.encode(text))

    def score(self, split, predictions):
        return metrics.generation_scores([self.reference(t) for t in self.splits[split].references], predictions)

    def records(self, split, predictions):
        e = self.splits[split]
        return [{**src, "tgt": ref, "reference": self.reference(ref), "prediction": p}
                for src, ref, p in zip(e.sources, e.references, predictions)]  # fmt: skip


class QuestionGenerationTask(GenerationTask):
    """DuReaderQG or KBQG (task.format: dureader_qg | nlpcc_kbqa) from its released files (tasks/qg.py): every
    task.valid_every-th training item held out as valid, the evaluation file the test split."""

    kind = "question_generation"

    def _read(self, data_dir, t):
        fmt = str(t.format)
        if fmt not in qg.READERS:
            raise UserError(f"task.format={fmt}: unknown (known: {', '.join(qg.READERS)})")
        self.fields = {"src": f"(built from the file: tasks/qg.py, {fmt})", "tgt": "question"}
        train_path, test_path = os.path.join(data_dir, str(t.files.train)), os.path.join(data_dir, str(t.files.test))
        self.paths = {"train": train_path, "valid": train_path, "test": test_path}
        train, valid = qg.held_out(qg.READERS[fmt](train_path), int(t.valid_every), train_path)
        return {"train": train, "valid": valid, "test": qg.READERS[fmt](test_path)}

    def data_files(self):
        return {k: v for k, v in super().data_files().items() if k != "valid"}  # valid: held out of train's file


TASK_TYPES = {task.kind: task for task in (ClassificationTask, ClueTask, TaggingTask, GenerationTask,
                                           QuestionGenerationTask)}  # fmt: skip


def task_type(kind: str, key: str = "task.type") -> type:
    """The task class `kind` (the value of setting `key`) names; a one-line error for any other."""
    if kind not in TASK_TYPES:
        raise UserError(f"{key}={kind}: unknown (known: {', '.join(TASK_TYPES)})")
    return TASK_TYPES[kind]


def build_task(cfg: DictConfig, tok: Tokenizer):
    kind = str(cfg.task.type)
    task = task_type(kind)(cfg, tok)
    if isinstance(task, GenerationTask):
        task.set_decoding(cfg.task.decoding)
    return task
