#!/usr/bin/env bash
# Table 5: SwitOKD against offline KD on CIFAR-100, student WRN-16-2, teacher WRN-40-2.
# The KD teacher is the Vanilla WRN-40-2 of the same seed, trained first. FitNet, AT,
# CRD and RCO are not reimplemented: summarize.py shows their published numbers only.
# Options: --help.
set -euo pipefail
DEFAULT_SEEDS="0 1 2"
source "$(dirname "$0")/common.sh"
setup "$@"

experiment table5
for seed in $SEEDS; do
  run "$seed" cifar100-wrn_40_2 train_vanilla.py --dataset cifar100 --model wrn_40_2 --role teacher
  run "$seed" cifar100-wrn_16_2 train_vanilla.py --dataset cifar100 --model wrn_16_2 --role student
  run "$seed" cifar100-wrn_16_2-wrn_40_2 train_switokd.py --dataset cifar100 --student wrn_16_2 --teacher wrn_40_2
done
barrier  # KD needs its pretrained teacher
for seed in $SEEDS; do
  run "$seed" cifar100-wrn_16_2-wrn_40_2 train_kd.py --dataset cifar100 --student wrn_16_2 \
    --teacher-ckpt "$(rundir vanilla "cifar100-wrn_40_2-seed$seed")"
done
launch
