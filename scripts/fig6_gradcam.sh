#!/usr/bin/env bash
# Fig. 6: where teacher (ResNet-34) and student (ResNet-18) look, Grad-CAM of the true class
# at their last convolutional stage (Sec. 3.6), for SwitOKD against DML, KDCL and the two
# networks trained alone. It reads the ImageNet runs of Table 6 (scripts/table6_imagenet.sh,
# the same runs and options: those finished are skipped, any missing are trained first),
# then draws OUT/fig6/fig6.png and writes the teacher-student agreement of every method
# (correlation and IoU of the maps, mean over 100 validation images) to OUT/fig6/fig6.json.
# The paper's caption says CIFAR-100, but ResNet-34/ResNet-18 is its ImageNet pair (Table 6).
# Other images or methods: python scripts/plot_fig6.py --help.  Options: --help.
DEFAULT_SEEDS="0"
DEFAULT_GPUS_PER_RUN=all
source "$(dirname "$0")/common.sh"
setup "$@"

experiment table6
read -r seed _ <<<"$SEEDS"
table6_runs "$seed" resnet18 resnet34
launch

pair="imagenet-resnet18-resnet34-seed$seed"
images=(--images 100 --show 3)
if [[ "$SMOKE" == 1 ]]; then  # tiny networks: one thread is faster, as for the smoke runs
  images=(--images 8 --show 2)
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
after_runs "${PYTHON:-python}" "$SCRIPTS_DIR/plot_fig6.py" \
  "$(rundir switokd "$pair")" "$(rundir dml "$pair")" "$(rundir kdcl "$pair")" \
  --vanilla "$(rundir vanilla "imagenet-resnet18-seed$seed")" "$(rundir vanilla "imagenet-resnet34-seed$seed")" \
  ${DATA_ROOT:+--data-root "$DATA_ROOT"} "${images[@]}" --output "$OUT/fig6/fig6.png"
