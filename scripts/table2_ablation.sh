#!/usr/bin/env bash
# Table 2: is each component of SwitOKD essential? ResNet-32 (student) and WRN-16-2
# (teacher) on CIFAR-100, student accuracy. A: no switching; B: fixed threshold delta;
# C: independent teacher loss, Eqn. (5); D: SwitOKD. The paper reports one number per
# case; here every case runs for each seed.  Options: --help.
DEFAULT_SEEDS="0 1 2"
source "$(dirname "$0")/common.sh"
setup "$@"

experiment table2
pair=(--dataset cifar100 --student resnet32 --teacher wrn_16_2)
for seed in $SEEDS; do
  run "$seed" cifar100-resnet32-wrn_16_2-A-no-switching train_switokd.py "${pair[@]}" --no-switching
  for delta in 0.2 0.6 0.8; do
    run "$seed" "cifar100-resnet32-wrn_16_2-B-delta$delta" train_switokd.py "${pair[@]}" --fixed-delta "$delta"
  done
  run "$seed" cifar100-resnet32-wrn_16_2-C-eqn5 train_switokd.py "${pair[@]}" --teacher-loss independent
  run "$seed" cifar100-resnet32-wrn_16_2-D-switokd train_switokd.py "${pair[@]}"
done
launch
