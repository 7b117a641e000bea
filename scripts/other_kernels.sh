#!/usr/bin/env bash
# Rerun the kernel-sensitive unit tests (those that train or compute in reduced precision: the `kernels`
# marker, given by a rule in tests/conftest.py) under a CPU kernel path and a thread count other than this
# machine's defaults, so a test that pins a figure only this machine computes fails here, not on the next
# machine.
#   AVX-512 machine: torch's and oneDNN's AVX2 kernels (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2);
#   otherwise:       their scalar / SSE4.1 kernels (ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41);
# both with one thread (OMP_NUM_THREADS=1), which changes how reductions are split; two test processes
# (pytest-xdist) of one thread each.
# Extra arguments go to pytest. Run it after the install (scripts/install.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if grep -qw avx512f /proc/cpuinfo 2>/dev/null; then
  capability=avx2 onednn=AVX2
else
  capability=default onednn=SSE41
fi
echo "other kernels: ATEN_CPU_CAPABILITY=$capability ONEDNN_MAX_CPU_ISA=$onednn OMP_NUM_THREADS=1"
ATEN_CPU_CAPABILITY=$capability ONEDNN_MAX_CPU_ISA=$onednn OMP_NUM_THREADS=1 \
  "$PYTHON" -m pytest -q -n 2 --dist loadfile -m kernels tests/unit "$@"
status=$?
[ "$status" -eq 5 ] && { echo "other kernels: no test carries the kernels marker (tests/conftest.py's rule)"; exit 1; }
exit "$status"
