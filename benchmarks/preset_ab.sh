#!/bin/bash
# Wall time and peak memory of `gaussad fit` + `gaussad evaluate` for one preset, an older revision of
# gaussad against the working tree, one after the other on the same machine (the A/B of issue 11).
#
#   benchmarks/preset_ab.sh DATA CATEGORY [REVISION] [PRESET] [-- EXTRA FIT FLAGS FOR THE NEW SIDE]
#   benchmarks/preset_ab.sh /tmp/elpv poly e58ff72 lite0      # the lite0 of e58ff72 against today's
#
# The old side runs the revision's src/ (git archive into a temporary folder, first on PYTHONPATH)
# in the same virtualenv. Prints one line per side: fit and evaluate seconds and peak RSS (MB, from
# /usr/bin/time), image / pixel AUROC and AUPRO (%), and the model folder's size.
set -euo pipefail
data=$1; category=$2; revision=${3:-e58ff72}; preset=${4:-lite0}
shift $(( $# < 4 ? $# : 4 )); [ "${1:-}" = "--" ] && shift
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/gaussad-ab-XXXX); trap 'rm -rf "$work"' EXIT
git -C "$repo" archive "$revision" src | tar -x -C "$work"

side() {  # NAME PYTHONPATH FIT-FLAGS...
  local name=$1 path=$2; shift 2
  PYTHONPATH=$path /usr/bin/time -f "%e %M" -o "$work/fit.t" "$repo/.venv/bin/python" -m gaussad.cli fit \
    "$data" -c "$category" -o "$work/$name-model" --quiet --preset "$preset" "$@" > /dev/null
  PYTHONPATH=$path /usr/bin/time -f "%e %M" -o "$work/eval.t" "$repo/.venv/bin/python" -m gaussad.cli evaluate \
    "$work/$name-model" "$data" -c "$category" -o "$work/$name-eval" --quiet > "$work/$name.txt"
  read -r fit_s fit_kb < "$work/fit.t"; read -r eval_s eval_kb < "$work/eval.t"
  metrics=$(grep -A1 "image AUROC" "$work/$name.txt" | tail -1 | awk '{print $2, $3, $4}')
  printf '%s %s: fit %s s (%d MB), evaluate %s s (%d MB), total %.1f s | AUROC/pixel/AUPRO %s | folder %s MB\n' \
    "$category" "$name" "$fit_s" $((fit_kb / 1024)) "$eval_s" $((eval_kb / 1024)) \
    "$(awk "BEGIN {print $fit_s + $eval_s}")" "$metrics" "$(du -sm "$work/$name-model" | cut -f1)"
}
side "$revision" "$work/src"
side today "" "$@"
