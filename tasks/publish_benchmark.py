"""Show a benchmark in the Prefect UI: the memory plan and every candidate's perplexities as table artifacts."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact


def benchmark_rows(benchmarks: list[dict], failures: list[dict]) -> list[dict]:
    """One row per candidate, best validation bits per byte first; failed or skipped candidates last."""
    rows = [
        {
            "model": b["name"], "family": b["family"], "precision": b["precision"], "parameters": b["parameters"],
            "validation_ppl": b["validation"]["corpus_ppl"],
            "validation_bits_per_byte": b["validation"]["bits_per_byte"],
            "test_ppl": b["test"]["corpus_ppl"], "test_bits_per_byte": b["test"]["bits_per_byte"], "error": None,
        }
        for b in sorted(benchmarks, key=lambda b: b["validation"]["bits_per_byte"])
    ]
    rows += [
        {"model": f["name"], "family": f["family"], "precision": f["precision"], "parameters": None,
         "validation_ppl": None, "validation_bits_per_byte": None, "test_ppl": None, "test_bits_per_byte": None,
         "error": f["error"]}
        for f in failures
    ]
    return rows


@task(name="publish_benchmark", cache_policy=None, persist_result=False)
def publish_benchmark(benchmarks: list[dict], failures: list[dict], plan: dict) -> None:
    """Attach the memory plan and the benchmark table to this flow run."""
    create_table_artifact(
        table=[{"model": name, **decision} for name, decision in plan["decisions"].items()], key="memory-plan",
        description=f"Memory plan: precision and batch size per model against {plan['budget_gb']:g} GB ({plan['device']})",
    )
    create_table_artifact(table=benchmark_rows(benchmarks, failures), key="benchmark",
                          description="Benchmark: perplexity and bits per byte of every candidate "
                                      "(ranked by validation bits per byte)")
