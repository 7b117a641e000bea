"""Benchmarks anyone can rerun (each file runs as a script); a package so that one can reuse another's helpers."""
