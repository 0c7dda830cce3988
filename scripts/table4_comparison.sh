#!/usr/bin/env bash
# Table 4: Vanilla (each network alone), DML, KDCL and SwitOKD on Tiny-ImageNet
# (1.4MobileNetV2/ResNet-34, ResNet-20/WRN-16-2), CIFAR-10 (WRN-16-1/WRN-16-8) and
# CIFAR-100 (0.5MobileNetV2/WRN-16-2); mean and std over 3 seeds.  Options: --help.
DEFAULT_SEEDS="0 1 2"
source "$(dirname "$0")/common.sh"
setup "$@"

# compare DATASET STUDENT TEACHER: the four columns of one pair.
compare() {
  local dataset="$1" student="$2" teacher="$3" seed="$4"
  run "$seed" "$dataset-$student" train_vanilla.py --dataset "$dataset" --model "$student" --role student
  run "$seed" "$dataset-$teacher" train_vanilla.py --dataset "$dataset" --model "$teacher" --role teacher
  run "$seed" "$dataset-$student-$teacher" train_dml.py --dataset "$dataset" --models "$student" "$teacher"
  run "$seed" "$dataset-$student-$teacher" train_kdcl.py --dataset "$dataset" --models "$student" "$teacher"
  run "$seed" "$dataset-$student-$teacher" train_switokd.py --dataset "$dataset" \
    --student "$student" --teacher "$teacher"
}

experiment table4
for seed in $SEEDS; do  # longest runs first
  compare tinyimagenet mobilenetv2_1.4 resnet34 "$seed"
  compare tinyimagenet resnet20 wrn_16_2 "$seed"
  compare cifar10 wrn_16_1 wrn_16_8 "$seed"
  compare cifar100 mobilenetv2_0.5 wrn_16_2 "$seed"
done
launch
