#!/usr/bin/env bash
# Every experiment script in smoke mode (tiny runs on the same code path: CPU, digits
# data, small networks, one seed, one short epoch), then summarize.py and the figure
# scripts over the results. Fails (non-zero) if anything fails. CI runs it through
# tests/test_scripts.py.
#
# The scripts write their plans into one file (PLAN_SINK) that scripts/launch.py then
# runs in a single process, so Python and torch start once, not once per script.
#
# usage: scripts/smoke_all.sh [OUT]    (default: a new temporary folder, removed on success)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
if (($#)); then
  OUT="$1" keep=1
  mkdir -p "$OUT"
else
  OUT="$(mktemp -d "${TMPDIR:-/tmp}/switokd-smoke.XXXXXX")" keep=0
fi
export OUT SMOKE=1 MPLBACKEND=Agg
start=$SECONDS
fail() { echo "smoke_all.sh: $*" >&2; exit 1; }

plan="$OUT/smoke-plan.txt"
: >"$plan"
scripts=(table2_ablation table3_temperature table4_comparison table5_offline_kd table6_imagenet
         table7_three_networks fig1_fig5_capacity fig4_switching fig6_gradcam fig7_time okddip_cifar cpu_study)
for script in "${scripts[@]}"; do
  PLAN_SINK="$plan" "scripts/$script.sh" || fail "scripts/$script.sh failed"
done
echo "== $(sort -u "$plan" | grep -c '^run ') runs from ${#scripts[@]} scripts"  # fig6 reads table6's runs
"$PYTHON" scripts/launch.py "$plan" --out "$OUT" --smoke --in-process || fail "some runs failed (logs above)"

echo "== summary and figures"
"$PYTHON" scripts/summarize.py "$OUT" >"$OUT/summary.md" || fail "summarize.py failed"
"$PYTHON" scripts/summarize.py "$OUT" --csv >"$OUT/summary.csv" || fail "summarize.py --csv failed"
! grep -q "^## In progress" "$OUT/summary.md" || fail "summarize.py lists runs in progress: $OUT/summary.md"
"$PYTHON" scripts/plot_fig4.py "$OUT/fig4/switokd/cifar100-resnet32-wrn_16_2-seed0" \
  --compare "$OUT/fig4/kdcl/cifar100-resnet32-wrn_16_2-seed0" --output "$OUT/fig4.png" || fail "plot_fig4.py failed"
"$PYTHON" scripts/plot_fig4.py "$OUT/fig4/switokd/cifar100-resnet32-wrn_16_2-r-ratio-seed0" \
  --output "$OUT/fig4e.png" || fail "plot_fig4.py (r ratio) failed"
"$PYTHON" scripts/plot_fig5.py "$OUT" --output "$OUT/fig5.png" || fail "plot_fig5.py failed"
"$PYTHON" scripts/plot_fig7.py "$OUT/fig7" --output "$OUT/fig7.png" || fail "plot_fig7.py failed"
scripts/fig6_gradcam.sh || fail "scripts/fig6_gradcam.sh failed"  # its runs are done: the plot only
for f in summary.md summary.csv fig4.png fig4e.png fig5.png fig7.png fig6/fig6.png fig6/fig6.json; do
  [[ -s "$OUT/$f" ]] || fail "$OUT/$f is missing or empty"
done
echo "smoke_all.sh: everything passed in $((SECONDS - start)) s; output in $OUT"
((keep)) || rm -rf "$OUT"
