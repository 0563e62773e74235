import json
import os
import re
from collections import Counter

import pytest

from pretrain.data.corpus import iter_input_files, iter_paragraphs, read_documents, sentence_spans, split_sentences
from pretrain.errors import UserError


@pytest.mark.parametrize("paragraph, sentences", [
    ("他说：“你好。”我们走吧！好", ["他说：“你好。”", "我们走吧！", "好"]),
    ("真的吗？！是的。", ["真的吗？！", "是的。"]),
    ("第一；第二；", ["第一；", "第二；"]),
    ("他走了……又回来了…好", ["他走了……", "又回来了…", "好"]),
    ("「去哪？」『不知道。』（笑）", ["「去哪？」", "『不知道。』", "（笑）"]),
    ("书名是《你好！》。Yes! ok? \"fine.\"", ["书名是《你好！》。", "Yes!", "ok?", "\"fine.\""]),
    ("  前面有空格。  后面也有。 ", ["前面有空格。", "后面也有。"]),
    ("没有标点", ["没有标点"]),
    ("   ", []),
])
def test_split_sentences(paragraph, sentences):
    assert split_sentences(paragraph) == sentences


def test_sentence_spans_locate_the_sentences():
    paragraph = "  “好。” 他说……然后？！\u3000走吧；  再见!（完）end "
    spans = sentence_spans(paragraph)
    expected = ["“好。”", "他说……", "然后？！", "走吧；", "再见!", "（完）end"]
    assert [paragraph[b:e] for b, e in spans] == split_sentences(paragraph) == expected
    assert all(not paragraph[e:b].strip() for (_, e), (b, _) in zip(spans, spans[1:]))


def test_split_sentences_loses_nothing_but_whitespace():
    paragraph = "  “好。” 他说……然后？！走吧；  再见!（完）end"
    pieces = split_sentences(paragraph)
    assert "".join(pieces) == re.sub(r"\s", "", paragraph)
    assert all(p == p.strip() and p for p in pieces)


def write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_txt_blank_lines_separate_documents(tmp_path):
    path = write(tmp_path / "a.txt", "\ufeff第一段。\r\n第二段。\n \n\u3000\n\n第三段。\n\n\n第四段\n".encode())
    docs, stats = read_documents([path])
    assert docs == [["第一段。", "第二段。"], ["第三段。"], ["第四段"]]
    assert stats["skipped_lines"] == {}


def test_iter_paragraphs_marks_document_starts_lazily(tmp_path):
    txt = write(tmp_path / "a.txt", "一\n二\n\n\n三\n".encode() + b"\xff\n" + "四\n".encode())
    jsonl = write(tmp_path / "b.jsonl", json.dumps({"text": "五\n六"}, ensure_ascii=False).encode() + b"\n{\n"
                  + json.dumps({"text": "七"}, ensure_ascii=False).encode())
    skipped = Counter()
    paragraphs = iter_paragraphs([txt, jsonl, txt], on_error="skip", skipped=skipped)
    assert next(paragraphs) == (True, "一") and not skipped  # nothing read ahead
    assert list(paragraphs) == [(False, "二"), (True, "三"), (False, "四"), (True, "五"), (False, "六"), (True, "七"),
                                (True, "一"), (False, "二"), (True, "三"), (False, "四")]  # a bad line ends nothing
    assert skipped == {"invalid_utf8": 2, "invalid_json": 1}


def test_jsonl_documents(tmp_path):
    lines = [json.dumps({"text": "一。\n\n二！\r\n  三", "id": 1}, ensure_ascii=False), "",
             json.dumps({"text": "  \n "}), json.dumps({"text": "四"}, ensure_ascii=False)]
    path = write(tmp_path / "a.jsonl", "\n".join(lines).encode())
    docs, _ = read_documents([path])
    assert docs == [["一。", "二！", "三"], ["四"]]


@pytest.mark.parametrize("line, problem, reason", [
    (b"{not json", "invalid JSON", "invalid_json"),
    (b'{"body": "x"}', '"text" field', "no_text"),
    (b'["text"]', '"text" field', "no_text"),
    (b'{"text": 5}', '"text" is int', "no_text"),
])
def test_jsonl_bad_lines(tmp_path, line, problem, reason):
    path = write(tmp_path / "a.jsonl", b'{"text": "ok"}\n' + line + b"\n")
    with pytest.raises(UserError, match=re.escape(f"{path}:2: ") + ".*" + re.escape(problem)):
        read_documents([path])
    docs, stats = read_documents([path], on_error="skip")
    assert docs == [["ok"]] and stats["skipped_lines"] == {reason: 1}


def test_invalid_utf8_names_file_and_byte_offset(tmp_path):
    good = "第一行。\n".encode()
    path = write(tmp_path / "bad.txt", good + b"ab\xffcd\n" + good)
    with pytest.raises(UserError) as e:
        read_documents([path])
    assert str(e.value) == f"{path}: invalid UTF-8 at byte offset {len(good) + 2} (line 2)"

    docs, stats = read_documents([path], on_error="skip")
    assert docs == [["第一行。", "第一行。"]]
    assert stats["skipped_lines"] == {"invalid_utf8": 1}


def test_invalid_utf8_offset_counts_a_bom(tmp_path):
    path = write(tmp_path / "bom.txt", b"\xef\xbb\xbfab\xff\n")
    with pytest.raises(UserError, match="byte offset 5 "):
        read_documents([path])


def test_ten_megabyte_line(tmp_path):
    path = tmp_path / "long.txt"
    with open(path, "wb") as f:
        f.write("短句。\n".encode())
        f.write(b"x" * 10_000_000 + b"\r\n")
        f.write("又一句。\n".encode())
    with pytest.raises(UserError) as e:
        read_documents([str(path)])
    assert str(e.value) == (f"{path}:2: line of 10000000 bytes exceeds max_line_bytes=1000000 "
                            "(raise max_line_bytes= or split the input)")
    docs, stats = read_documents([str(path)], on_error="skip")
    assert docs == [["短句。", "又一句。"]]
    assert stats["skipped_lines"] == {"too_long": 1}
    docs, _ = read_documents([str(path)], max_line_bytes=10_000_000)
    assert len(docs[0][1]) == 10_000_000


def test_line_of_exactly_max_line_bytes_is_kept(tmp_path):
    path = write(tmp_path / "a.txt", b"abcd\r\nabcde\nabc")
    docs, stats = read_documents([path], on_error="skip", max_line_bytes=4)
    assert docs == [["abcd", "abc"]] and stats["skipped_lines"] == {"too_long": 1}


def test_directory_and_glob_inputs(tmp_path):
    for name in ["b/2.txt", "a.jsonl", "b/c/1.txt", "notes.md", "b/skip.csv"]:
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        (tmp_path / name).write_text("x\n")
    expect = [str(tmp_path / n) for n in ["a.jsonl", "b/2.txt", "b/c/1.txt"]]
    assert iter_input_files(str(tmp_path)) == expect
    assert iter_input_files(str(tmp_path / "**" / "*.txt")) == expect[1:]
    assert iter_input_files(str(tmp_path / "b")) == expect[1:]
    assert iter_input_files(str(tmp_path / "notes.md")) == [str(tmp_path / "notes.md")]  # named explicitly
    with pytest.raises(UserError, match=re.escape(f"input={tmp_path}/*.xml: matches no file")):
        iter_input_files(f"{tmp_path}/*.xml")
    with pytest.raises(UserError, match=re.escape(f"input={tmp_path}/*.md: no .txt, .jsonl, .parquet files")):
        iter_input_files(f"{tmp_path}/*.md")  # matched, but not a corpus file
