"""``python -m models --num-classes N [--image-size S]``: parameter count of every canonical model."""
import argparse

from . import build, count_parameters, names

parser = argparse.ArgumentParser(prog="python -m models", description=__doc__)
parser.add_argument("--num-classes", type=int, required=True)
parser.add_argument("--image-size", type=int, default=32)
args = parser.parse_args()

width = max(map(len, names()))
print(f"{'model':<{width}}  {'params (M)':>10}  {'params':>11}")
for name in names():
    n = count_parameters(build(name, args.num_classes, args.image_size))
    print(f"{name:<{width}}  {n / 1e6:>10.3f}  {n:>11,d}")
