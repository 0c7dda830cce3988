#!/usr/bin/env bash
# Table 7: three networks on CIFAR-100, MobileNet, WRN-16-2 and WRN-16-10: Vanilla (each
# alone), DML and KDCL (all three as one cohort), SwitOKD 1T2S (teacher WRN-16-10,
# students WRN-16-2 and MobileNet) and 2T1S (teachers WRN-16-10 and WRN-16-2, student
# MobileNet).  Options: --help.
DEFAULT_SEEDS="0 1 2"
source "$(dirname "$0")/common.sh"
setup "$@"

experiment table7
cohort=(--models mobilenet wrn_16_2 wrn_16_10 --roles student1 student2 teacher)
for seed in $SEEDS; do
  run "$seed" cifar100-wrn_16_10 train_vanilla.py --dataset cifar100 --model wrn_16_10 --role teacher
  run "$seed" cifar100-wrn_16_2 train_vanilla.py --dataset cifar100 --model wrn_16_2
  run "$seed" cifar100-mobilenet train_vanilla.py --dataset cifar100 --model mobilenet
  run "$seed" cifar100-mobilenet-wrn_16_2-wrn_16_10 train_dml.py --dataset cifar100 "${cohort[@]}"
  run "$seed" cifar100-mobilenet-wrn_16_2-wrn_16_10 train_kdcl.py --dataset cifar100 "${cohort[@]}"
  run "$seed" cifar100-1T2S train_multi.py --dataset cifar100 --teachers wrn_16_10 --students wrn_16_2 mobilenet
  run "$seed" cifar100-2T1S train_multi.py --dataset cifar100 --teachers wrn_16_10 wrn_16_2 --students mobilenet
done
launch
