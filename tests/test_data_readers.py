"""Readers: every format round-trips; every malformed record is named by file and line."""

import json

import datasets
import pytest

from rankwise.data import TASKS, DataError, load_dataset_spec, read_records
from rankwise.errors import RankwiseError

RECORDS = [
    {"text": "Some plain text."},
    {"prompt": "What is 2 + 2?", "completion": "4"},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
        ]
    },
]


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_round_trip_skips_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(r) for r in RECORDS] + ["", "  "])
    result = read_records(path)
    assert result.records == RECORDS
    assert (result.skipped, result.source, len(result)) == (0, str(path), 3)


def test_json_list_and_json_lines_with_json_suffix(tmp_path):
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(RECORDS, indent=2), encoding="utf-8")
    assert read_records(listed).records == RECORDS
    lines = write_jsonl(tmp_path / "lines.json", [json.dumps(r) for r in RECORDS])
    assert read_records(lines).records == RECORDS


def test_text_file_is_one_record(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("line one\nline two\n", encoding="utf-8")
    assert read_records(path).records == [{"text": "line one\nline two\n"}]


@pytest.mark.parametrize("kind", ["parquet", "csv", "saved"])
def test_tabular_round_trip(tmp_path, kind):
    rows = [
        {"prompt": "What is 40 + 2?", "completion": "42"},  # a numeric answer stays a string
        {"prompt": "a, b\nc", "completion": 'say "hi"'},
    ]
    dataset = datasets.Dataset.from_list(rows)
    path = tmp_path / {"parquet": "d.parquet", "csv": "d.csv", "saved": "d"}[kind]
    {"parquet": dataset.to_parquet, "csv": dataset.to_csv, "saved": dataset.save_to_disk}[kind](
        str(path)
    )
    assert read_records(path).records == rows


def test_tabular_missing_cells_mean_absent_keys(tmp_path):
    dataset = datasets.Dataset.from_list(
        [{"text": "plain", "prompt": None, "completion": None}, {"prompt": "p", "completion": "c"}]
    )
    dataset.to_parquet(str(tmp_path / "mixed.parquet"))
    assert read_records(tmp_path / "mixed.parquet").records == [
        {"text": "plain"},
        {"prompt": "p", "completion": "c"},
    ]


@pytest.mark.parametrize(
    "line, problem",
    [
        ('{"prompt": "x", ', "not valid JSON"),
        ("[1, 2]", "expected an object, got list"),
        ('{"prompt": "x"}', "has 'prompt' but no 'completion'"),
        ('{"completion": "x"}', "has 'completion' but no 'prompt'"),
        ('{"prompt": "x", "completion": 3}', "'completion' must be a string, got int"),
        ('{"prompt": "x", "completion": ""}', "'completion' is empty"),
        ('{"text": null}', "'text' must be a string, got null"),
        ('{"text": "  "}', "'text' is empty"),
        ('{"body": "x"}', "found keys: body"),
        ('{"messages": []}', "'messages' must be a non-empty list"),
        ('{"messages": ["hi"]}', "message 1 must be an object with 'role' and 'content'"),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}',
            "message 2 has unknown role 'bot'",
        ),
        ('{"messages": [{"role": "assistant", "content": 5}]}', "message 1 content must be"),
        ('{"messages": [{"role": "user", "content": "a"}]}', "no assistant message"),
    ],
)
def test_malformed_line_names_file_line_and_problem(tmp_path, line, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [json.dumps(RECORDS[0]), "", line])
    with pytest.raises(DataError) as err:
        read_records(path)
    message = str(err.value)
    assert message.startswith(f"{path}, line 3: ")
    assert problem in message
    assert "\n" not in message


def test_malformed_rows_and_items_are_numbered(tmp_path):
    bad = {"prompt": "x", "completion": None}
    datasets.Dataset.from_list([RECORDS[1], bad]).to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(DataError, match=r"d\.parquet, row 2: has 'prompt' but no 'completion'"):
        read_records(tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps([RECORDS[0], {"x": 1}]), encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.json, item 2: "):
        read_records(tmp_path / "d.json")
    (tmp_path / "broken.json").write_text('[\n{"text": "a"},\n{"text" "b"}\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.json, line 3: not valid JSON"):
        read_records(tmp_path / "broken.json")


def test_invalid_utf8_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl, line 2: not valid UTF-8"):
        read_records(path)


def test_skip_bad_lines_counts_and_logs(tmp_path, caplog):
    lines = [json.dumps(RECORDS[0]), "{oops", json.dumps(RECORDS[1]), '{"text": 1}']
    result = read_records(write_jsonl(tmp_path / "d.jsonl", lines), skip_bad_lines=True)
    assert result.records == RECORDS[:2]
    assert result.skipped == 2
    assert "Skipped 2 malformed records" in caplog.text
    assert "line 2" in caplog.text


def test_all_lines_bad_is_an_error_even_when_skipping(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["{oops", "[]"])
    with pytest.raises(DataError, match=r"no valid records: all 2 are malformed \(first: .*line 1"):
        read_records(path, skip_bad_lines=True)


def test_missing_empty_and_unknown_sources(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_records(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="is empty"):
        read_records(tmp_path / "empty.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="holds no records"):
        read_records(tmp_path / "blank.jsonl")
    (tmp_path / "header.csv").write_text("prompt,completion\n", encoding="utf-8")
    with pytest.raises(DataError, match="holds no records"):
        read_records(tmp_path / "header.csv")
    (tmp_path / "d.xml").write_text("<a/>", encoding="utf-8")
    with pytest.raises(DataError, match="expected one of .jsonl"):
        read_records(tmp_path / "d.xml")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="not one written by datasets' save_to_disk"):
        read_records(tmp_path / "folder")
    (tmp_path / "junk.parquet").write_bytes(b"junk")
    with pytest.raises(DataError, match="Cannot read .*junk.parquet"):
        read_records(tmp_path / "junk.parquet")


def test_dataset_dict_folder_points_at_a_split(tmp_path):
    rows = [RECORDS[1], {"prompt": "p", "completion": "c"}]
    datasets.DatasetDict(train=datasets.Dataset.from_list(rows)).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"several splits \(train\).*dd/train"):
        read_records(tmp_path / "dd")
    assert read_records(tmp_path / "dd" / "train").records == rows


def test_data_error_is_a_rankwise_error():
    assert issubclass(DataError, RankwiseError)


def test_dataset_specs(tmp_path):
    tasks = load_dataset_spec("task:reverse_words,add_numbers", split="test", n=5)
    assert len(tasks) == 10
    assert {r["task"] for r in tasks.records} == {"reverse_words", "add_numbers"}
    assert len(load_dataset_spec("task:all", n=2)) == 2 * len(TASKS)
    docs = load_dataset_spec("corpus:python-docs", split="validation")
    assert docs.records and all(set(r) == {"text"} for r in docs.records)
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(RECORDS[1])])
    assert load_dataset_spec(str(path)).records == [RECORDS[1]]
    with pytest.raises(RankwiseError, match="Unknown task 'nope'; available: reverse_words"):
        load_dataset_spec("task:nope")
    with pytest.raises(RankwiseError, match="Unknown corpus"):
        load_dataset_spec("corpus:wiki")
    with pytest.raises(RankwiseError, match="Unknown split"):
        load_dataset_spec("task:all", split="dev")
