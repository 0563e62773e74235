"""Corpora as they ship (issue 28, 7 and 8): compressed .txt and .jsonl read as they lie, .parquet in row batches,
the text's field named by text_key=; each gives the plain file's prepared output, and each bad input is one line
naming the file and what is wrong."""
import bz2
import gzip
import json
import lzma
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from synthetic import synthetic_documents

from pretrain.data.corpus import iter_input_files, read_documents
from pretrain.errors import UserError
from pretrain.prepare import PrepareConfig, prepare

COMPRESS = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress,
            ".zst": lambda data: zstandard.ZstdCompressor().compress(data)}  # fmt: skip


@pytest.fixture(scope="module")
def documents():
    return [["".join(p) for p in doc] for doc in synthetic_documents(120)]


def as_txt(documents) -> bytes:
    return "\n\n".join("\n".join(doc) for doc in documents).encode() + b"\n"


def as_jsonl(documents, key="text") -> bytes:
    return "".join(json.dumps({"id": i, key: "\n".join(doc)}, ensure_ascii=False) + "\n"
                   for i, doc in enumerate(documents)).encode()  # fmt: skip


def prepared_files(out) -> dict[str, bytes]:
    """What prepare wrote, meta.json without its list of input files."""
    files = {name: open(os.path.join(out, name), "rb").read() for name in sorted(os.listdir(out))}
    meta = json.loads(files.pop("meta.json"))
    del meta["inputs"]
    return {**files, "meta": meta}


@pytest.mark.parametrize("fmt", [".txt", ".jsonl"])
@pytest.mark.parametrize("compression", sorted(COMPRESS))
def test_a_compressed_file_reads_as_the_plain_one(tmp_path, documents, fmt, compression):
    data = (as_txt if fmt == ".txt" else as_jsonl)(documents)
    (tmp_path / f"plain{fmt}").write_bytes(data)
    (tmp_path / f"packed{fmt}{compression}").write_bytes(COMPRESS[compression](data))
    plain = read_documents([str(tmp_path / f"plain{fmt}")])
    assert plain[0] == documents
    assert read_documents([str(tmp_path / f"packed{fmt}{compression}")]) == plain


def test_a_directory_of_compressed_files_prepares_as_the_plain_ones(tmp_path, documents):
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    plain.mkdir(), packed.mkdir()
    for i, part in enumerate((documents[:50], documents[50:90], documents[90:])):
        (plain / f"part{i}.txt" if i != 1 else plain / "part1.jsonl").write_bytes(as_txt(part) if i != 1 else as_jsonl(part))
        compression = sorted(COMPRESS)[i]
        name = f"part{i}.txt{compression}" if i != 1 else f"part1.jsonl{compression}"
        (packed / name).write_bytes(COMPRESS[compression](as_txt(part) if i != 1 else as_jsonl(part)))
    (packed / "notes.csv").write_text("not a corpus")  # passed over
    assert [os.path.basename(p) for p in iter_input_files(str(packed))] == ["part0.txt.bz2", "part1.jsonl.gz", "part2.txt.xz"]
    for d in (plain, packed):
        prepare(PrepareConfig(input=str(d), out=str(tmp_path / f"{d.name}-out"), vocab_size=400))
    assert prepared_files(tmp_path / "packed-out") == prepared_files(tmp_path / "plain-out")


def test_parquet_and_text_key_prepare_as_jsonl(tmp_path, documents):
    (tmp_path / "docs.jsonl").write_bytes(as_jsonl(documents))
    (tmp_path / "docs_content.jsonl").write_bytes(as_jsonl(documents, key="content"))
    table = pa.table({"id": list(range(len(documents))), "content": ["\n".join(d) for d in documents]})
    pq.write_table(table, tmp_path / "docs.parquet", row_group_size=37)  # several row groups and batches
    outs = {}
    for name, key in (("docs.jsonl", "text"), ("docs_content.jsonl", "content"), ("docs.parquet", "content")):
        prepare(PrepareConfig(input=str(tmp_path / name), out=str(tmp_path / f"out-{name}"), vocab_size=400, text_key=key))
        outs[name] = prepared_files(tmp_path / f"out-{name}")
    assert outs["docs.parquet"] == outs["docs.jsonl"] == outs["docs_content.jsonl"]


def test_null_rows_are_bad_lines(tmp_path):
    pq.write_table(pa.table({"text": ["第一篇。", None, "第三篇。"]}), tmp_path / "nulls.parquet")
    with pytest.raises(UserError, match=r'nulls.parquet: row 2: "text" is null$'):
        read_documents([str(tmp_path / "nulls.parquet")])
    docs, stats = read_documents([str(tmp_path / "nulls.parquet")], on_error="skip")
    assert docs == [["第一篇。"], ["第三篇。"]] and stats["skipped_lines"] == {"no_text": 1}


def one_line(call) -> str:
    with pytest.raises(UserError) as refused:
        call()
    message = str(refused.value)
    assert "\n" not in message
    return message


def test_bad_inputs_are_one_line_naming_the_file(tmp_path, documents):
    (tmp_path / "c.jsonl").write_bytes(as_jsonl(documents[:3], key="content"))
    assert one_line(lambda: read_documents([str(tmp_path / "c.jsonl")])) == (
        f'{tmp_path}/c.jsonl:1: no "text" field (its fields: id, content); name the text\'s with text_key=')
    pq.write_table(pa.table({"id": [1], "body": ["正文。"]}), tmp_path / "p.parquet")
    assert one_line(lambda: read_documents([str(tmp_path / "p.parquet")])) == (
        f'{tmp_path}/p.parquet: no column "text" (its columns: id, body); name it with text_key=')
    assert one_line(lambda: read_documents([str(tmp_path / "p.parquet")], text_key="id")) == (
        f'{tmp_path}/p.parquet: column "id" holds int64, not text')
    (tmp_path / "fake.parquet").write_bytes(b"not parquet at all")
    assert one_line(lambda: read_documents([str(tmp_path / "fake.parquet")])).startswith(
        f"{tmp_path}/fake.parquet: not a readable parquet file (")
    whole = COMPRESS[".gz"](as_txt(documents))
    (tmp_path / "cut.txt.gz").write_bytes(whole[: len(whole) // 2])  # truncated in the middle
    assert one_line(lambda: read_documents([str(tmp_path / "cut.txt.gz")])).startswith(f"{tmp_path}/cut.txt.gz: cannot read as gz (")
    for compression in (".bz2", ".xz", ".zst", ".gz"):
        (tmp_path / f"garbled.txt{compression}").write_bytes(b"\x00garbage, not compressed" * 10)
        message = one_line(lambda: read_documents([str(tmp_path / f"garbled.txt{compression}")]))
        assert message.startswith(f"{tmp_path}/garbled.txt{compression}: cannot read as {compression[1:]} ("), message
    (tmp_path / "latin.txt.gz").write_bytes(COMPRESS[".gz"]("第一行\n".encode() + "caf\xe9\n".encode("latin-1")))
    assert one_line(lambda: read_documents([str(tmp_path / "latin.txt.gz")])) == (
        f"{tmp_path}/latin.txt.gz (decompressed): invalid UTF-8 at byte offset 13 (line 2)")


def test_a_missing_path_and_a_directory_without_corpus_files_say_different_things(tmp_path):
    assert one_line(lambda: iter_input_files(str(tmp_path / "nope"))) == f"input={tmp_path}/nope: no such file or directory"
    assert one_line(lambda: iter_input_files(str(tmp_path / "*.txt"))) == f"input={tmp_path}/*.txt: matches no file"
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.csv").write_text("x")
    (tmp_path / "d" / "b.parquet.gz").write_bytes(b"x")
    assert one_line(lambda: iter_input_files(str(tmp_path / "d"))) == (
        f"input={tmp_path}/d: no .txt, .jsonl, .parquet files, plain or .gz/.bz2/.xz/.zst, found (found a.csv, b.parquet.gz)")
    (tmp_path / "e").mkdir()
    assert one_line(lambda: iter_input_files(str(tmp_path / "e"))).endswith("(found nothing)")


def test_prepare_of_a_bad_input_writes_nothing(tmp_path, documents):
    whole = COMPRESS[".zst"](as_txt(documents))
    (tmp_path / "cut.txt.zst").write_bytes(whole[:-20])
    out = tmp_path / "out"
    assert one_line(lambda: prepare(PrepareConfig(input=str(tmp_path / "cut.txt.zst"), out=str(out), vocab_size=400))).startswith(
        f"{tmp_path}/cut.txt.zst: cannot read as zst (")
    assert sorted(os.listdir(tmp_path)) == ["cut.txt.zst"]


@pytest.mark.e2e  # two workers: two processes
def test_to_simplified_prepares_traditional_text_as_its_simplified_form(tmp_path, documents):
    """Issue 28, 9: to_simplified=true converts with OpenCC's t2s before segmentation (in the workers too); off by
    default, recorded in meta.json."""
    import opencc

    traditional = [["漢字簡化與繁體，臺灣的鐵路。", "我們說話。"], ["這個東西很貴。", "他們來過這裏。"]] * 20
    convert = opencc.OpenCC("t2s").convert
    (tmp_path / "t.txt").write_bytes(as_txt(documents[:30] + traditional))
    (tmp_path / "s.txt").write_bytes(as_txt(documents[:30] + [[convert(p) for p in d] for d in traditional]))
    for name, workers, simplify in (("t", 2, True), ("s", 1, False), ("kept", 1, False)):
        source = "s" if name == "s" else "t"
        prepare(PrepareConfig(input=str(tmp_path / f"{source}.txt"), out=str(tmp_path / f"out-{name}"), vocab_size=3000,
                              workers=workers, to_simplified=simplify))  # fmt: skip
    converted, simplified = prepared_files(tmp_path / "out-t"), prepared_files(tmp_path / "out-s")
    assert converted["meta"].pop("to_simplified") is True and simplified["meta"].pop("to_simplified") is False
    assert converted == simplified
    kept = open(tmp_path / "out-kept" / "vocab.txt", encoding="utf-8").read().split("\n")
    assert "鐵" in kept and "铁" not in kept and "铁" in open(tmp_path / "out-t" / "vocab.txt", encoding="utf-8").read()


def test_the_segmenter_setting_decides_the_word_starts_only(tmp_path):
    """Issue 28, 10: segmenter=rjieba (jieba-rs) gives the same tokens; word starts where it cuts, which is jieba's
    almost everywhere but not at "COVID-19" (jieba cuts at the hyphen, rjieba keeps it whole). meta.json names it."""
    from pretrain.data.indexed import IndexedCorpus

    text = "COVID-19疫情期间，世界卫生组织建议保持距离。\n我们在北京天安门广场上看见了他。\n"
    (tmp_path / "c.txt").write_text(text * 4, encoding="utf-8")
    corpora = {}
    for name in ("jieba", "rjieba"):
        meta = prepare(PrepareConfig(input=str(tmp_path / "c.txt"), out=str(tmp_path / name), vocab_size=200,
                                     valid_fraction=0.0, segmenter=name))  # fmt: skip
        assert meta["segmenter"].split()[0] == name
        corpora[name] = IndexedCorpus.open(str(tmp_path / name / "train"))
    a, b = corpora["jieba"], corpora["rjieba"]
    assert (a.tokens[:] == b.tokens[:]).all()
    differ = [a.tokens[i] for i in range(len(a.tokens)) if a.word_start[i] != b.word_start[i]]
    vocab = open(tmp_path / "jieba" / "vocab.txt", encoding="utf-8").read().split("\n")
    assert {vocab[i] for i in differ} == {"-", "19"}, [vocab[i] for i in differ]  # jieba: COVID | - | 19
    with pytest.raises(UserError, match=r"^segmenter=thulac: must be jieba or rjieba$"):
        prepare(PrepareConfig(input=str(tmp_path / "c.txt"), out=str(tmp_path / "x"), segmenter="thulac"))
