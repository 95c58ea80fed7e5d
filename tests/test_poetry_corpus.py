"""Poetry corpus reader: the Poetry Foundation CSV layout (as on Kaggle), plain text, and bad files."""

from __future__ import annotations

import csv

import pytest

from engine.data import DataFormatError
from tasks.poetry_corpus import clean_poem, read_documents, read_poems

# The Kaggle file's shape: a leading unnamed index column, poems and titles with \r\r\n line
# ends and stray indentation, a comma and doubled quotes inside a quoted poem, an empty Tags field.
KAGGLE = (
    ',Title,Poem,Poet,Tags\n'
    '0,"\r\r\n                    Objects Used to Prop Open a Window\r\r\n                ",'
    '"\r\r\nDog bone, stapler,\r\r\ncribbage board, garlic press\r\r\n     because this window is loose\r\r\n",'
    'Michelle Menting,\n'
    '1,The Wise Men,"\r\r\nWe saw \u201cthe star\u201d, and said ""go"".\r\r\n\r\r\n\r\r\n\r\r\nSecond stanza.\r\r\n",'
    'Ken Chen,"Religion,Christianity"\n'
)


def write(tmp_path, name: str, text: str, encoding: str = "utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def test_reads_the_kaggle_layout(tmp_path):
    poems = read_poems(write(tmp_path, "PoetryFoundationData.csv", KAGGLE))
    assert len(poems) == 2
    a, b = poems
    assert a.title == "Objects Used to Prop Open a Window" and a.poet == "Michelle Menting" and a.tags == ""
    assert a.text == "Dog bone, stapler,\ncribbage board, garlic press\nbecause this window is loose"
    assert b.text == 'We saw \u201cthe star\u201d, and said "go".\n\nSecond stanza.'  # stanza break kept once
    assert b.tags == "Religion,Christianity"
    assert (a.line, b.line) == (2, 9)  # where each record starts, counting \n: the first spans seven lines


def test_column_order_case_and_only_poem_required(tmp_path):
    path = write(tmp_path, "p.csv", ' poem ,AUTHOR\n"one\ntwo",x\nthree,y\n')
    poems = read_poems(path)
    assert [p.text for p in poems] == ["one\ntwo", "three"] and poems[0].title == ""
    crlf = read_poems(write(tmp_path, "crlf.csv", 'Title,Poem\r\na,"x\r\ny"\r\nb,z\r\n'))
    assert [(p.text, p.line) for p in crlf] == [("x\ny", 2), ("z", 4)]


def test_documents_from_csv_and_plain_text(tmp_path):
    csv_path = write(tmp_path, "poems.csv", KAGGLE)
    docs = read_documents(csv_path)
    assert len(docs) == 2 and docs[1].startswith("We saw")
    titled = read_documents(csv_path, with_title=True, limit=1)
    assert titled == ["Objects Used to Prop Open a Window\n\n" + docs[0]]
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    assert read_documents(write(tmp_path, "plays.txt", text)) == [text]
    # a forced format wins over the suffix
    assert read_documents(write(tmp_path, "poems.dat", KAGGLE), fmt="csv") == docs
    assert read_documents(csv_path, fmt="text") == [KAGGLE]
    with pytest.raises(ValueError, match="format"):
        read_documents(csv_path, fmt="json")


def test_empty_poems_skipped_and_counted(tmp_path, capsys):
    path = write(tmp_path, "p.csv", "Title,Poem\na,\"  \r\r\n \"\nb,real\n")
    assert [p.text for p in read_poems(path, verbose=True)] == ["real"]
    assert "skipped 1 record(s) with an empty poem" in capsys.readouterr().out


def test_long_poem_beyond_the_default_csv_field_limit(tmp_path):
    long = "la " * 100_000  # 300 kB, above csv's default 128 KiB field limit
    path = write(tmp_path, "p.csv", f"Title,Poem\nsong,\"{long}\"\n")
    assert len(read_poems(path)[0].text) == len(long.strip())
    assert csv.field_size_limit() == 131072  # the module-wide limit is restored


@pytest.mark.parametrize("name, content, where, problem", [
    ("empty.csv", "", "empty.csv:1", "empty"),
    ("blank.txt", "\n  \n", "blank.txt:1", "empty"),
    ("nopoem.csv", "Title,Text,Poet\na,b,c\n", "nopoem.csv:1", "no Poem column"),
    ("fields.csv", "Title,Poem\na,b\nc,d,e\n", "fields.csv:3", "3 fields, the header has 2"),
    ("quote.csv", 'Title,Poem\na,b\nc,"never closed\nmore\n', "quote.csv:3", "malformed CSV record"),
    ("allempty.csv", "Title,Poem\na,\nb, \n", "allempty.csv", "no poem found"),
])
def test_malformed_files_name_file_and_line(tmp_path, name, content, where, problem):
    path = write(tmp_path, name, content)
    with pytest.raises(DataFormatError) as e:
        read_documents(path)
    msg = str(e.value)
    assert msg.startswith(str(tmp_path / where) + ":") and problem in msg


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(DataFormatError, match="does not exist"):
        read_documents(tmp_path / "nope.csv")
    path = write(tmp_path, "latin.csv", "Title,Poem\na,ok\nb,caf\u00e9\n", encoding="latin-1")
    with pytest.raises(DataFormatError, match=r"latin\.csv:3: not UTF-8"):
        read_poems(path)


def test_clean_poem():
    assert clean_poem("\r\n  a  \r\r\n\r\n\r\n\u00a0b\u00a0\r") == "a\n\nb"
    assert clean_poem(" \r\r\n ") == ""


def test_error_reaches_the_command_line_as_one_line(tmp_path, capsys):
    from cli.common import run_main

    path = write(tmp_path, "nopoem.csv", "Title,Text\na,b\n")
    with pytest.raises(SystemExit) as e:
        run_main(lambda: read_documents(path))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}:1: ") and "\n" not in err
