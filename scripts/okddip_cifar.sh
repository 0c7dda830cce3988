#!/usr/bin/env bash
# The OKDDip paper's CIFAR comparison (Chen et al., AAAI 2020; docs/OKDDIP.md): Baseline, individual
# branches (Ind), DML (the release's form: 4 networks, T = 3, mean-logit targets), CL-ILR, ONE and
# OKDDip (branch-based), each as the authors' release runs it (--recipe okddip: its networks,
# Nesterov SGD 0.1, 300 epochs), on CIFAR-10 and CIFAR-100 for its five backbones; 3 seeds. Then
# classic KD as the release's README runs it: ResNet-32 from the ResNet-110 baseline.
# summarize.py prints the table "okddip_cifar" as top-1 ERROR, mean +- std. Options: --help.
# Smoke mode runs one backbone on one dataset (each training script and method once; launch.py then
# trains the release's ResNet-32 on digits).
DEFAULT_SEEDS="0 1 2"
source "$(dirname "$0")/common.sh"
setup "$@"

BACKBONES="wrn_20_8 resnet110 vgg16 densenet40_12 resnet32"  # longest runs first
DATASETS="cifar100 cifar10"
if [[ "$SMOKE" == 1 ]]; then
  BACKBONES="resnet32" DATASETS="cifar100"
fi

# compare DATASET BACKBONE SEED: the six methods of one column of the OKDDip paper's tables.
compare() {
  local dataset="$1" b="$2" seed="$3"
  local common=(--dataset "$dataset" --recipe okddip)
  run "$seed" "$dataset-$b" train_vanilla.py "${common[@]}" --model "$b"
  run "$seed" "$dataset-$b-ind" train_one.py "${common[@]}" --method ind --backbone "$b"
  run "$seed" "$dataset-$b-x4" train_dml.py "${common[@]}" --models "$b" "$b" "$b" "$b" \
    --tau 3 --peer-target mean-logits --live-targets --kl okddip
  run "$seed" "$dataset-$b-clilr" train_one.py "${common[@]}" --method clilr --backbone "$b"
  run "$seed" "$dataset-$b-one" train_one.py "${common[@]}" --method one --backbone "$b"
  run "$seed" "$dataset-$b" train_okddip.py "${common[@]}" --backbone "$b"
}

experiment okddip_cifar
for seed in $SEEDS; do
  for b in $BACKBONES; do
    for dataset in $DATASETS; do
      compare "$dataset" "$b" "$seed"
    done
  done
  for dataset in $DATASETS; do  # KD's teacher (one of the baselines above, unless --smoke)
    run "$seed" "$dataset-resnet110" train_vanilla.py --dataset "$dataset" --recipe okddip --model resnet110
  done
done
barrier
for seed in $SEEDS; do
  for dataset in $DATASETS; do
    run "$seed" "$dataset-resnet32-from-resnet110" train_kd.py --dataset "$dataset" --recipe okddip \
      --kd-form okddip --student resnet32 --teacher-ckpt "$(rundir vanilla "$dataset-resnet110-seed$seed")"
  done
done
launch
