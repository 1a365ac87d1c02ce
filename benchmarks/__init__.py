"""Benchmarks (`qa-bench`): scripts that print a table and write JSON, with a baseline measured in the same run."""
