"""Engine backends. Each imports its runtime library lazily so CPU hosts never need GPU libraries."""
