"""Run-file formats and `dr convert`: detection, lossless round trips, tie order, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import command

convert = command("convert")
from dr.io.runs import Run, RunFormatError, format_for_suffix, read_run, synthetic_score, write_run

TEVATRON = (
    "q1\td3\t12.5\n"
    "q1\td1\t12.5\n"  # tie with d3: d3 sorts first (dr.ranking: docid descending, as trec_eval)
    "q1\td7\t0.30000000000000004\n"
    "q1\td2\t0.3\n"  # differs from the line above only in the last bit: must stay distinct
    "q2\td9\t-1.25e-3\n"
    "q2\td1\t-2.0\n"
)
EXPECTED = {"q1": ["d3", "d1", "d7", "d2"], "q2": ["d9", "d1"]}


def ranking(run: Run) -> dict[str, list[str]]:
    return {qid: [docid for docid, _ in hits] for qid, hits in run.rankings.items()}


def test_reads_tevatron_sorted_by_score_then_docid(tmp_path):
    path = tmp_path / "rank.txt"
    path.write_text(TEVATRON)
    run, fmt = read_run(path)
    assert fmt == "tevatron" and run.scored
    assert ranking(run) == EXPECTED
    assert run.rankings["q1"][2][1] == 0.30000000000000004


def test_whitespace_separated_tevatron_is_accepted(tmp_path):
    path = tmp_path / "rank.txt"
    path.write_text(TEVATRON.replace("\t", "  "))
    run, fmt = read_run(path)
    assert fmt == "tevatron" and ranking(run) == EXPECTED


def test_round_trip_tevatron_marco_trec_marco_via_cli(tmp_path):
    source = tmp_path / "rank.txt"
    source.write_text(TEVATRON)
    marco, trec, marco2, back = (tmp_path / n for n in ("run.marco", "run.trec", "again.marco", "back.tsv"))
    assert convert(["--input", str(source), "--output", str(marco)]) == 0
    assert convert(["--input", str(marco), "--output", str(trec), "--run_tag", "mine"]) == 0
    assert convert(["--input", str(trec), "--output", str(marco2)]) == 0
    assert convert(["--input", str(marco2), "--output", str(back), "--to", "tevatron"]) == 0

    assert marco.read_text().splitlines()[:4] == ["q1\td3\t1", "q1\td1\t2", "q1\td7\t3", "q1\td2\t4"]
    assert marco2.read_text() == marco.read_text()  # ids and ranks survive the TREC detour exactly
    trec_lines = trec.read_text().splitlines()
    assert trec_lines[0] == "q1 Q0 d3 1 1.0 mine"
    assert trec_lines[3] == f"q1 Q0 d2 4 {synthetic_score(4)!r} mine"
    for path, fmt in ((marco, "marco"), (trec, "trec"), (marco2, "marco"), (back, "tevatron")):
        run, detected = read_run(path)
        assert detected == fmt and ranking(run) == EXPECTED


def test_tevatron_to_trec_keeps_scores_exactly(tmp_path):
    source, trec = tmp_path / "rank.txt", tmp_path / "rank.trec"
    source.write_text(TEVATRON)
    assert convert(["--input", str(source), "--output", str(trec)]) == 0
    original, _ = read_run(source)
    converted, fmt = read_run(trec)
    assert fmt == "trec" and converted.rankings == original.rankings


def test_marco_order_comes_from_rank_column(tmp_path):
    path = tmp_path / "run.marco"
    path.write_text("7\t300\t2\n7\t100\t1\n7\t200\t3\n")
    run, fmt = read_run(path)
    assert fmt == "marco" and not run.scored
    assert run.rankings["7"] == [("100", 1.0), ("300", 0.5), ("200", 1 / 3)]


def test_trec_orders_by_score_not_rank_column(tmp_path):
    path = tmp_path / "run.trec"
    path.write_text("1 Q0 a 1 0.5 t\n1 Q0 b 2 0.9 t\n")
    run, _ = read_run(path)
    assert ranking(run) == {"1": ["b", "a"]}


def test_suffix_decides_default_target_format():
    assert format_for_suffix("x.trec") == "trec"
    assert format_for_suffix("rank.txt.marco") == "marco"
    assert format_for_suffix("run.dev.tsv") == "marco"
    assert format_for_suffix("out.tevatron") == "tevatron"
    assert format_for_suffix("rank.txt") == "marco"  # like Tevatron's convert_result_to_marco


def test_write_run_rejects_tag_with_space(tmp_path):
    run = Run({"q": [("d", 1.0)]})
    with pytest.raises(RunFormatError, match="run tag"):
        write_run(tmp_path / "x.trec", run, "trec", tag="two words")
    assert not (tmp_path / "x.trec").exists()


@pytest.mark.parametrize(
    "text,fmt,message",
    [
        ("q1\td1\t1.0\nq1\td2\n", "auto", "rank.txt:2: 2 columns, expected 3"),
        ("q1\td1\t1.0\nq1\td2\tabc\n", "auto", "rank.txt:2: score 'abc' is not a number"),
        (
            "q1\td1\t1.0\nq1\td1\t0.5\n",
            "auto",
            "rank.txt:2: docid 'd1' repeated for query 'q1' (first on line 1)",
        ),
        ("q1\td1\t1\nq1\td2\t0\n", "marco", "rank.txt:2: rank '0' is not a positive integer"),
        ("q1\td1\t1\nq1\td2\t1\n", "marco", "rank.txt:2: rank 1 repeated"),
        ("1 Q0 a x 0.5 t\n", "auto", "rank.txt:1: rank 'x' is not a positive integer"),
        ("q1 d1\n", "auto", "rank.txt:1: 2 columns"),
        ("q1\td1\tnan\n", "auto", "rank.txt:1: score is NaN"),
        ("\n\n", "auto", "rank.txt: the run file is empty"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, capsys, text, fmt, message):
    path = tmp_path / "rank.txt"
    path.write_text(text)
    with pytest.raises(RunFormatError) as err:
        read_run(path, fmt)
    assert message in str(err.value)
    out = tmp_path / "out.marco"
    assert (
        convert(["--input", str(path), "--output", str(out), "--from", fmt]) == 1
    )  # bad file content: exit status 1
    captured = capsys.readouterr().err
    assert message in captured and "Traceback" not in captured
    assert not out.exists() and not list(tmp_path.glob("out.marco*"))


def test_missing_input_file(tmp_path, capsys):
    assert convert(["--input", str(tmp_path / "nope.txt"), "--output", str(tmp_path / "o.marco")]) == 1
    assert "run file not found" in capsys.readouterr().err
    assert not Path(tmp_path / "o.marco").exists()
