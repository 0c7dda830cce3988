#!/usr/bin/env bash
# Fig. 4: why SwitOKD works (Sec. 3.2), CIFAR-100, student ResNet-32. (a)-(d): SwitOKD
# against KDCL with the teachers WRN-16-2 and WRN-16-8; (e)-(f): r = d_t / d_s against
# the paper's r = d_t / (d_s + d_t), teacher WRN-16-2 (73.10/71.89 vs 74.14/73.47).
# Plot: python scripts/plot_fig4.py OUT/fig4/switokd/<run> [--compare OUT/fig4/kdcl/<run>].
# Options: --help.
DEFAULT_SEEDS="0"
source "$(dirname "$0")/common.sh"
setup "$@"

experiment fig4
for seed in $SEEDS; do
  for teacher in wrn_16_2 wrn_16_8; do
    run "$seed" "cifar100-resnet32-$teacher" train_switokd.py --dataset cifar100 --student resnet32 --teacher "$teacher"
    run "$seed" "cifar100-resnet32-$teacher" train_kdcl.py --dataset cifar100 --models resnet32 "$teacher"
  done
  run "$seed" cifar100-resnet32-wrn_16_2-r-ratio train_switokd.py --dataset cifar100 \
    --student resnet32 --teacher wrn_16_2 --r-form ratio
done
launch
