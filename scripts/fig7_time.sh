#!/usr/bin/env bash
# Fig. 7 (Sec. 3.7): training time of SwitOKD, DML and KDCL, MobileNetV2 (student; width
# 1.0, as the text names it) and ResNet-18 (teacher) on Tiny-ImageNet. The paper: 9.77 h,
# 13.43 h and 14.99 h on one GTX 1080 Ti. Timings compare only on the same kind of GPU
# with nothing else running on it: --gpus "0 1 2" gives each method its own GPU.
# Plot: python scripts/plot_fig7.py OUT/fig7.  Options: --help.
DEFAULT_SEEDS="0"
source "$(dirname "$0")/common.sh"
setup "$@"

experiment fig7
name=tinyimagenet-mobilenetv2-resnet18
for seed in $SEEDS; do
  run "$seed" $name train_switokd.py --dataset tinyimagenet --student mobilenetv2 --teacher resnet18
  run "$seed" $name train_dml.py --dataset tinyimagenet --models mobilenetv2 resnet18
  run "$seed" $name train_kdcl.py --dataset tinyimagenet --models mobilenetv2 resnet18
done
launch
