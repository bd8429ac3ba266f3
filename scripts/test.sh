#!/usr/bin/env bash
# The test command: set up (idempotent) and run the whole suite offline; then the tests that compare against
# numbers stored by other machines (goldens, PiSSA/OLoRA factorisations, the tolerance model) again under other
# CPU kernel sets, so that one machine tests several CPUs' arithmetic. With arguments: pytest with those only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PYTEST=(.venv/bin/python -m pytest -q)
if [ "$#" -gt 0 ]; then
  exec "${PYTEST[@]}" "$@"
fi
"${PYTEST[@]}"
STORED=(tests/test_golden.py tests/test_golden_peft.py tests/test_pissa_rebuild.py tests/test_tolerance.py
        tests/conventions tests/test_compare_experts.py)  # files the real libraries wrote; the experts check
for kernels in ATEN_CPU_CAPABILITY=avx2 ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=AVX2; do
  echo "== $kernels: ${STORED[*]}"
  env "$kernels" "${PYTEST[@]}" -p no:cacheprovider "${STORED[@]}"
done
