"""``python -m models --num-classes N [--image-size S] [--variant V]``: parameter count of every canonical model.

Then, at CIFAR sizes, every multi-branch and multi-network model of the OKDDip release
(OKDDip, ONE, CL-ILR, individual branches; m = 4); at ImageNet sizes also its ResNets.
"""
import argparse

from . import VARIANTS, NoOfficialArchitecture, build, build_okddip, count_parameters, names, okddip_names

parser = argparse.ArgumentParser(prog="python -m models", description=__doc__)
parser.add_argument("--num-classes", type=int, required=True)
parser.add_argument("--image-size", type=int, default=32)
parser.add_argument("--variant", choices=VARIANTS, default="paper")
args = parser.parse_args()

rows = []
for name in names():
    try:
        rows.append((name, count_parameters(build(name, args.num_classes, args.image_size, args.variant))))
    except NoOfficialArchitecture:
        rows.append((name, None))
if args.image_size in (32, 224):
    imagenet = args.image_size == 224
    rows += [(f"{label} (m=4)" if ":" in label and not label.startswith("baseline") else label,
              count_parameters(build_okddip(args.num_classes, **kwargs)))
             for label, kwargs in okddip_names(imagenet) if imagenet or kwargs["backbone"] not in ("resnet18", "resnet34")]
width = max(len(name) for name, _ in rows)
print(f"{'model':<{width}}  {'params (M)':>10}  {'params':>11}   ({args.variant}, {args.image_size} px)")
for name, n in rows:
    if n is None:
        print(f"{name:<{width}}  {'-':>10}  {'-':>11}   no {args.variant} architecture")
    else:
        print(f"{name:<{width}}  {n / 1e6:>10.3f}  {n:>11,d}")
