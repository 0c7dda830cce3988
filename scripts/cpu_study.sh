#!/usr/bin/env bash
# CPU study (no table of the paper; docs/CPU_STUDY.md): Table 4's comparison on real data that
# does not saturate, for a machine without a GPU: Fashion-MNIST, student WRN-10-1, teacher
# WRN-16-2; Vanilla (each network alone), KD (from the Vanilla teacher of the same seed), DML,
# KDCL (MinLogit) and SwitOKD, every method with its defaults and the paper's CIFAR recipe
# (Adam, LR 0.01, milestones scaled to the shorter schedule). The budget that makes it fit in
# 90 minutes on 2 CPU cores: a fixed class-balanced subset of 20,000 training images, 5 epochs,
# bf16 autocast and channels_last, the full 10,000-image test split. Needs the Debian package
# dataset-fashion-mnist or the idx files in DATA_ROOT/FashionMNIST/raw/. At the end it prints
# the table (python scripts/summarize.py OUT; scripts/published.json names the pair) and draws
# the switching figure of the first seed's SwitOKD run beside KDCL (OUT/cpu_study/fig4.png,
# scripts/plot_fig4.py).  Options: --help.
DEFAULT_SEEDS="0 1 2"
source "$(dirname "$0")/common.sh"
setup "$@"

student=wrn_10_1 teacher=wrn_16_2
budget=(--dataset fashionmnist --train-subset 20000 --epochs 5 --amp bf16 --channels-last --device cpu)

experiment cpu_study
for seed in $SEEDS; do
  run "$seed" "fashionmnist-$teacher" train_vanilla.py "${budget[@]}" --model "$teacher" --role teacher
  run "$seed" "fashionmnist-$student" train_vanilla.py "${budget[@]}" --model "$student" --role student
  run "$seed" "fashionmnist-$student-$teacher" train_dml.py "${budget[@]}" --models "$student" "$teacher"
  run "$seed" "fashionmnist-$student-$teacher" train_kdcl.py "${budget[@]}" --models "$student" "$teacher"
  run "$seed" "fashionmnist-$student-$teacher" train_switokd.py "${budget[@]}" \
    --student "$student" --teacher "$teacher"
done
barrier  # KD needs its pretrained teacher
for seed in $SEEDS; do
  run "$seed" "fashionmnist-$student-$teacher" train_kd.py "${budget[@]}" --student "$student" \
    --teacher-ckpt "$(rundir vanilla "fashionmnist-$teacher-seed$seed")"
done
launch

read -r seed _ <<<"$SEEDS"
pair="fashionmnist-$student-$teacher-seed$seed"
after_runs "${PYTHON:-python}" "$SCRIPTS_DIR/plot_fig4.py" "$(rundir switokd "$pair")" --compare "$(rundir kdcl "$pair")" \
  --output "$OUT/cpu_study/fig4.png"
after_runs "${PYTHON:-python}" "$SCRIPTS_DIR/summarize.py" "$OUT"
