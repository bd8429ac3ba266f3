"""The numeric check that a migration kept the math: per-module verdicts and the report (report.py), the factored
ΔW comparison and probes (compare.py), exact power-of-two proofs (exact.py), and the check of the written file as the
target reads it (written.py)."""
