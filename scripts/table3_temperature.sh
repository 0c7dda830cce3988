#!/usr/bin/env bash
# Table 3: SwitOKD at temperatures tau in {0.5, 1, 2, 5, 8, 10}; 0.5MobileNetV2 (student,
# "MobileNetV2" in the text; its tau = 1 entry is Table 4's 67.24) and WRN-16-2
# (teacher) on CIFAR-100.  Options: --help.
DEFAULT_SEEDS="0 1 2"
source "$(dirname "$0")/common.sh"
setup "$@"

experiment table3
for seed in $SEEDS; do
  for tau in 0.5 1 2 5 8 10; do
    run "$seed" "cifar100-mobilenetv2_0.5-wrn_16_2-tau$tau" train_switokd.py \
      --dataset cifar100 --student mobilenetv2_0.5 --teacher wrn_16_2 --tau "$tau"
  done
done
launch
