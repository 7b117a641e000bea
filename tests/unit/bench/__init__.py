"""Tests of bench/: the benchmarks' verdicts and bookkeeping, and their smoke runs on a CPU."""
