#!/usr/bin/env bash
# Figs. 1 (left) and 5: the student ResNet-20 against teachers of growing capacity
# (WRN-16-2, WRN-16-4, WRN-16-8) with KD, DML, KDCL and SwitOKD; Fig. 1 on CIFAR-100
# (experiment fig1), Fig. 5 on CIFAR-10 (experiment fig5). KD's teachers are Vanilla
# WRN-16-k of the same seed, trained first; the Vanilla ResNet-20 is the reference line.
# Plot: python scripts/plot_fig5.py OUT.  Options: --help.
DEFAULT_SEEDS="0"
source "$(dirname "$0")/common.sh"
setup "$@"

teachers=(wrn_16_2 wrn_16_4 wrn_16_8)
for figure in "fig1 cifar100" "fig5 cifar10"; do
  read -r name dataset <<<"$figure"
  experiment "$name"
  for seed in $SEEDS; do
    run "$seed" "$dataset-resnet20" train_vanilla.py --dataset "$dataset" --model resnet20
    for teacher in "${teachers[@]}"; do
      run "$seed" "$dataset-$teacher" train_vanilla.py --dataset "$dataset" --model "$teacher" --role teacher
      run "$seed" "$dataset-resnet20-$teacher" train_dml.py --dataset "$dataset" --models resnet20 "$teacher"
      run "$seed" "$dataset-resnet20-$teacher" train_kdcl.py --dataset "$dataset" --models resnet20 "$teacher"
      run "$seed" "$dataset-resnet20-$teacher" train_switokd.py --dataset "$dataset" \
        --student resnet20 --teacher "$teacher"
    done
  done
done
barrier  # KD needs its pretrained teachers
for figure in "fig1 cifar100" "fig5 cifar10"; do
  read -r name dataset <<<"$figure"
  experiment "$name"
  for seed in $SEEDS; do
    for teacher in "${teachers[@]}"; do
      run "$seed" "$dataset-resnet20-$teacher" train_kd.py --dataset "$dataset" --student resnet20 \
        --teacher-ckpt "$(rundir vanilla "$dataset-$teacher-seed$seed")"
    done
  done
done
launch
