#!/usr/bin/env bash
# Table 6: Vanilla, DML, KDCL and SwitOKD on ImageNet: ResNet-18 (student) / ResNet-34
# (teacher) and 0.5MobileNetV2 (student) / ResNet-18 (teacher). One seed by default;
# each run uses every GPU under torchrun (batch 512 split across them): --gpus-per-run 1
# runs one per GPU instead. The Vanilla ResNet-18 serves both rows.  Options: --help.
DEFAULT_SEEDS="0"
DEFAULT_GPUS_PER_RUN=all
source "$(dirname "$0")/common.sh"
setup "$@"

experiment table6
for seed in $SEEDS; do
  table6_runs "$seed" resnet18 resnet34
  table6_runs "$seed" mobilenetv2_0.5 resnet18
done
launch
