#!/usr/bin/env bash
# Run timm's own benchmark.py on adaperceiver's models (registered by `import adaperceiver.timm`).
# benchmark.py is not in timm's wheel or sdist: see scripts/timm_benchmark.py for where it is
# found (TIMM_BENCHMARK_PY, the cache, the sdist, GitHub at tag v<timm version>).
#
#   scripts/timm_benchmark.sh --model adaperceiver_v1_in1k --bench inference -b 4 --img-size 224 \
#       --device cpu --num-warm-iter 2 --num-bench-iter 4 \
#       --model-kwargs num_tokens=128 mat_dim=624 exit_depth=14
#   scripts/timm_benchmark.sh --where          # print the benchmark.py path (fetching it if needed)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$here/../.venv/bin/python" ]; then python="$here/../.venv/bin/python"; else python=python3; fi
fi
exec "$python" "$here/timm_benchmark.py" "$@"
