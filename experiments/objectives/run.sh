#!/usr/bin/env bash
# Regenerates experiments/objectives: results/*.json, results/results.png and the README's results section.
# Extra arguments go to the runner, e.g. --scale reduced --seeds 0,1,2 (see its --help).
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python -m ul2lab.experiments objectives "$@"
