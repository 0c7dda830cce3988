#!/usr/bin/env bash
# Table 5: SwitOKD against offline KD on CIFAR-100, student WRN-16-2, teacher WRN-40-2.
# Every column: the Vanilla WRN-40-2 teacher of each seed (its training route kept: 4
# checkpoints at equal epoch intervals, RCO's anchors), the Vanilla WRN-16-2 student and
# SwitOKD first; then KD, FitNet, AT, CRD and RCO (train_kd.py --distill ...) from that
# teacher. All under the paper's recipe (Sec. 3.1); `-- --recipe crd` runs everything under
# the CRD benchmark's instead, and then, as RepDistiller (its ckpt_epoch_240.pth), the methods
# distil from the teacher's last epoch (last.pt), not its best (best_teacher.pt; RCO reads the
# route either way). Options: --help.
DEFAULT_SEEDS="0 1 2"
source "$(dirname "$0")/common.sh"
setup "$@"

experiment table5
for seed in $SEEDS; do
  run "$seed" cifar100-wrn_40_2 train_vanilla.py --dataset cifar100 --model wrn_40_2 --role teacher --keep-route 4
  run "$seed" cifar100-wrn_16_2 train_vanilla.py --dataset cifar100 --model wrn_16_2 --role student
  run "$seed" cifar100-wrn_16_2-wrn_40_2 train_switokd.py --dataset cifar100 --student wrn_16_2 --teacher wrn_40_2
done
barrier  # the offline methods need their pretrained teacher
weights=""
[[ "$(extra_flag --recipe)" == crd ]] && weights=/last.pt
for seed in $SEEDS; do
  teacher="$(rundir vanilla "cifar100-wrn_40_2-seed$seed")"
  for method in kd fitnet at crd rco; do
    ckpt="$teacher"
    [[ "$method" == rco ]] || ckpt+="$weights"
    run "$seed" cifar100-wrn_16_2-wrn_40_2 train_kd.py --distill "$method" --dataset cifar100 --student wrn_16_2 \
      --teacher-ckpt "$ckpt"
  done
done
launch
