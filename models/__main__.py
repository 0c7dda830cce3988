"""``python -m models --num-classes N [--image-size S] [--variant V]``: parameter count of every canonical model."""
import argparse

from . import VARIANTS, NoOfficialArchitecture, build, count_parameters, names

parser = argparse.ArgumentParser(prog="python -m models", description=__doc__)
parser.add_argument("--num-classes", type=int, required=True)
parser.add_argument("--image-size", type=int, default=32)
parser.add_argument("--variant", choices=VARIANTS, default="paper")
args = parser.parse_args()

width = max(map(len, names()))
print(f"{'model':<{width}}  {'params (M)':>10}  {'params':>11}   ({args.variant}, {args.image_size} px)")
for name in names():
    try:
        n = count_parameters(build(name, args.num_classes, args.image_size, args.variant))
    except NoOfficialArchitecture:
        print(f"{name:<{width}}  {'-':>10}  {'-':>11}   no official architecture")
        continue
    print(f"{name:<{width}}  {n / 1e6:>10.3f}  {n:>11,d}")
