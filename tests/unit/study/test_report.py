import math

from ftflow.study.report import leaderboard_rows, markdown_table, plot_leaderboard


def scores(ppl, bpb):
    return {"corpus_ppl": ppl, "mean_sentence_ppl": ppl + 1, "bits_per_byte": bpb, "n_truncated": 0}


CANDIDATES = [
    {"name": "a", "kind": "baseline", "family": "f", "parameters": 10, "precision": "fp32",
     "test": scores(10.0, 1.5), "selection": scores(11.0, 1.6)},
    {"name": "a+lora", "kind": "teacher+lora", "family": "f", "base": "a", "parameters": 10, "precision": "fp32",
     "test": scores(8.0, 1.2), "selection": scores(9.0, 1.3)},
    {"name": "broken", "kind": "baseline", "family": "g", "error": "OutOfMemoryError: CUDA out of memory"},
    {"name": "b", "kind": "baseline", "family": "g", "parameters": 20, "precision": "bf16",
     "test": scores(30.0, 1.4), "selection": scores(31.0, 1.4)},
]


def test_ranked_by_bits_per_byte_with_failures_last_and_deltas():
    frame = leaderboard_rows(CANDIDATES)
    assert list(frame["name"]) == ["a+lora", "b", "a", "broken"]
    assert list(frame["rank"]) == [1, 2, 3, 4]
    assert frame.loc[0, "delta_ppl_vs_base"] == -2.0
    assert math.isnan(frame.loc[2, "delta_ppl_vs_base"])


def test_markdown_table_shows_errors_and_escapes_pipes(tmp_path):
    table = markdown_table(leaderboard_rows(CANDIDATES))
    lines = table.splitlines()
    assert lines[0].startswith("| rank | model | kind")
    assert "OutOfMemoryError: CUDA out of memory" in lines[-1]
    assert "| 8.0000 |" in lines[2]
    plot_leaderboard(leaderboard_rows(CANDIDATES), tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_the_leaderboard_plot_draws_an_interval_that_leaves_out_its_point(tmp_path):
    """A percentile bootstrap interval need not contain the corpus estimate (a ratio over few, skewed sentences; or
    a degenerate interval a rounding off it): the plot draws the interval as it is instead of failing evaluate."""
    frame = leaderboard_rows(CANDIDATES)
    frame["test_bpb_low"] = frame["test_bits_per_byte"] + 1e-12
    frame["test_bpb_high"] = frame["test_bits_per_byte"] + 0.1
    plot_leaderboard(frame, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_the_final_summary_lists_every_model_without_a_result():
    from ftflow.study.report import failure_summary

    evaluation = {"leaderboard": [
        {"name": "small", "kind": "baseline", "error": None},
        {"name": "ghost", "kind": "baseline", "error": "ModelLoadError: cannot load /x/ghost-model:\n(1) no\n(2) no"},
        {"name": "full[big]", "kind": "full", "error": "not trained: predicted 30 GB > 20 GB"},
    ]}
    assert failure_summary(evaluation) == ["ghost (baseline): ModelLoadError: cannot load /x/ghost-model: (1) no (2) no",
                                           "full[big] (full): not trained: predicted 30 GB > 20 GB"]
