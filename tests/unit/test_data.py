import json

import pytest

from ftflow.data import DataError, hold_out_validation, make_splits, read_records, read_sentences, read_split, write_split


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
    from ftflow.data import SentenceFile

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
