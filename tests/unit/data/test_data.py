import json

import pytest

from ftflow.data.splits import (DataError, hold_out_validation, make_splits, read_records, read_sentences, read_split,
                                write_split)


def test_text_file_drops_and_counts_blank_lines(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("first one\n\n  \nsecond  one \n\n", encoding="utf-8")
    result = read_sentences(path)
    assert result.sentences == ("first one", "second  one")
    assert result.blank_dropped == 3


def test_jsonl_and_csv_with_named_column(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps({"sentence": s, "label": 1}) for s in ["x y", "", "z"]), encoding="utf-8")
    assert read_sentences(jsonl, "sentence").sentences == ("x y", "z")
    csv = tmp_path / "a.csv"
    csv.write_text('id,text\n1,"hello, world"\n2,\n3,bye\n', encoding="utf-8")
    result = read_sentences(csv)
    assert result.sentences == ("hello, world", "bye") and result.blank_dropped == 1
    with pytest.raises(DataError, match="no 'sentence' field.*text_column"):
        read_sentences(csv, "sentence")


@pytest.mark.parametrize("content, fragment", [
    (None, "does not exist"),
    (b"", "is empty"),
    (b"\n \n", "is empty"),
    (b"caf\xe9 au lait\n", "not UTF-8"),
])
def test_unusable_files_are_named_in_the_error(tmp_path, content, fragment):
    path = tmp_path / "train.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=fragment) as error:
        read_sentences(path)
    assert str(path) in str(error.value)


def test_unknown_extension(tmp_path):
    path = tmp_path / "train.parquet"
    path.write_text("x")
    with pytest.raises(DataError, match="unknown extension"):
        read_sentences(path)


def test_validation_split_is_seeded_and_disjoint():
    sentences = tuple(f"s{i}" for i in range(50))
    train, validation = hold_out_validation(sentences, 0.2, seed=3)
    assert len(validation) == 10 and len(train) == 40
    assert set(train).isdisjoint(validation) and set(train) | set(validation) == set(sentences)
    assert hold_out_validation(sentences, 0.2, seed=3) == (train, validation)
    assert hold_out_validation(sentences, 0.2, seed=4) != (train, validation)


def test_train_test_overlap_is_reported(tmp_path):
    from ftflow.data.splits import SentenceFile

    train = SentenceFile("train.txt", tuple(f"s{i}" for i in range(10)) + ("shared",), 2)
    test = SentenceFile("test.txt", ("shared", "t1"), 0)
    splits = make_splits(train, test, 0.2, 0)
    assert splits.stats["train_test_overlap"] == {"count": 1, "examples": ["shared"]}
    assert splits.stats["blank_dropped"] == {"train": 2, "test": 0}
    assert splits.test == ("shared", "t1")


def test_split_files_round_trip_with_provenance(tmp_path):
    path = tmp_path / "train.jsonl"
    write_split(path, ["a b", "c"], [{"method": "original"}, {"method": "random_swap"}])
    assert read_split(path) == ["a b", "c"]
    assert read_records(path)[1] == {"id": 1, "text": "c", "method": "random_swap"}


def test_bad_jsonl_line_is_reported_with_its_line_number_and_cause(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two" "x"}\n{"text": "three"}\n', encoding="utf-8")
    with pytest.raises(DataError) as error:
        read_sentences(path)
    assert str(error.value) == (
        f"data file {path}, line 3: not valid JSON (Expecting ',' delimiter, column 16); each line of a JSON "
        """Lines file must be one object, e.g. {"text": "a sentence"}: '{"text": "two" "x"}'"""
    )
    path.write_text('{"text": "one"}\n["two"]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2: expected a JSON object with a 'text' field, got list"):
        read_sentences(path)


def test_json_array_and_csv_row_errors(tmp_path):
    array = tmp_path / "train.json"
    array.write_text('[{"text": "a b"}, {"text": ""}, {"other": 1}]', encoding="utf-8")
    result = read_sentences(array)
    assert result.sentences == ("a b",) and result.blank_dropped == 2
    csv = tmp_path / "train.csv"
    csv.write_text("id,text\n1,fine\n2,hello, world\n", encoding="utf-8")
    with pytest.raises(DataError) as error:
        read_sentences(csv)
    assert str(error.value) == (f"data file {csv}, line 3: 3 field(s) where the header has 2 (['id', 'text']); "
                                "quote fields that contain commas")


def test_a_one_sentence_train_file_is_refused_naming_the_file(tmp_path):
    from ftflow.data.splits import SentenceFile

    train = SentenceFile(str(tmp_path / "train.txt"), ("only one",), 0)
    with pytest.raises(DataError) as error:
        make_splits(train, SentenceFile("test.txt", ("t",), 0), 0.1, 0)
    assert str(error.value) == (
        f"data file {tmp_path / 'train.txt'} has 1 training sentence(s); ftflow holds a validation split out of "
        "the training sentences, so it needs at least 2 (and warns below 100)"
    )


def test_a_small_train_file_gets_a_warning():
    from ftflow.data.splits import MIN_TRAIN_SENTENCES, SentenceFile

    assert MIN_TRAIN_SENTENCES == 100
    splits = make_splits(SentenceFile("two.txt", ("a b", "c d"), 0), SentenceFile("test.txt", ("t",), 0), 0.1, 0)
    assert len(splits.train) == 1 and len(splits.validation) == 1
    assert splits.stats["warnings"] == [
        "data file two.txt has only 2 training sentence(s) (fewer than 100): models train on 1 and every choice "
        "is made on 1 validation sentence(s), too few for the perplexities to mean much"
    ]
    many = make_splits(SentenceFile("many.txt", tuple(f"s{i}" for i in range(100)), 0),
                       SentenceFile("test.txt", ("t",), 0), 0.1, 0)
    assert many.stats["warnings"] == []


def test_reading_data_writes_no_cache_outside_the_artifacts_directory(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "a.txt").write_text("one\ntwo\n", encoding="utf-8")
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n', encoding="utf-8")
    (tmp_path / "a.csv").write_text("text\none\n", encoding="utf-8")
    home = tmp_path / "home"
    home.mkdir()
    code = ("import sys; from ftflow.data.splits import read_sentences\n"
            "for name in ('a.txt', 'a.jsonl', 'a.csv'): print(read_sentences(sys.argv[1] + '/' + name).sentences)")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("HF_", "XDG_"))}
    env.update(HOME=str(home), HF_HOME=str(home / "hf"), PYTHONPATH=str(Path(__file__).resolve().parents[3]))
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["('one', 'two')", "('one',)", "('one',)"]
    assert [str(p.relative_to(home)) for p in home.rglob("*")] == []
