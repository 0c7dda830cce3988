#!/usr/bin/env bash
# Table 6: Vanilla, DML, KDCL and SwitOKD on ImageNet: ResNet-18 (student) / ResNet-34
# (teacher) and 0.5MobileNetV2 (student) / ResNet-18 (teacher). One seed by default;
# each run uses every GPU under torchrun (batch 512 split across them): --gpus-per-run 1
# runs one per GPU instead. The Vanilla ResNet-18 serves both rows.  Options: --help.
set -euo pipefail
DEFAULT_SEEDS="0"
DEFAULT_GPUS_PER_RUN=all
source "$(dirname "$0")/common.sh"
setup "$@"

experiment table6
for seed in $SEEDS; do
  for model in resnet34 resnet18 mobilenetv2_0.5; do
    run "$seed" "imagenet-$model" train_vanilla.py --dataset imagenet --model "$model"
  done
  for pair in "resnet18 resnet34" "mobilenetv2_0.5 resnet18"; do
    read -r student teacher <<<"$pair"
    run "$seed" "imagenet-$student-$teacher" train_dml.py --dataset imagenet --models "$student" "$teacher"
    run "$seed" "imagenet-$student-$teacher" train_kdcl.py --dataset imagenet --models "$student" "$teacher"
    run "$seed" "imagenet-$student-$teacher" train_switokd.py --dataset imagenet \
      --student "$student" --teacher "$teacher"
  done
done
launch
