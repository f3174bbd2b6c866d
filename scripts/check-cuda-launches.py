#!/usr/bin/env python3
"""Static check of the fused ops' CUDA launches, run by scripts/build-cuda.sh after the build.

Every `launch!(dev, MODULE, "kernel", cfg, args...)` in stages/src must name a kernel
that the PTX of the build defines, with as many arguments as the kernel's `.entry`
takes: a launch with one argument too few or too many would read garbage on the GPU
and fail only there. (Argument types are not checked: the PTX has only their sizes.)

    scripts/check-cuda-launches.py TARGET_DIR     # e.g. target-cuda; exit 1 on a mismatch
"""
import glob
import re
import sys

target = sys.argv[1] if len(sys.argv) > 1 else "target-cuda"
params = {}
for path in glob.glob(f"{target}/release/build/stages-*/out/*.ptx"):
    for m in re.finditer(r"\.entry (\w+)\(\s*(.*?)\)", open(path).read(), re.S):
        params[m.group(1)] = re.findall(r"\.param \.(\w+)", m.group(2))
if not params:
    sys.exit(f"check-cuda-launches: no PTX under {target}/release/build/stages-*/out")

# Launches whose kernel name is a `format!`ed variable: name -> kernel name prefix.
formatted = {
    "&softmax": "attention_softmax_fwd_",
    "&from_lse": "attention_softmax_from_lse_",
    "&softmax_bwd": "attention_softmax_bwd_",
}
problems, checked = [], 0
for path in sorted(glob.glob("stages/src/**/*.rs", recursive=True)):
    text = open(path).read()
    for m in re.finditer(r"launch!\((.*?)\);", text, re.S):
        args = [a.strip() for a in re.split(r",(?![^()]*\))", m.group(1)) if a.strip()]
        if len(args) < 5:
            continue  # the macro's own definition
        name, rest = args[2], args[4:]
        if name.startswith('"'):
            kernels = [name.strip('"')]
        elif name in formatted:
            kernels = [k for k in params if k.startswith(formatted[name])]
        else:
            problems.append(f"{path}: launch of {name}: unknown kernel-name variable (add it to `formatted`)")
            continue
        if not kernels:
            problems.append(f"{path}: {name}: no such kernel in the PTX")
        for k in kernels:
            checked += 1
            if k not in params:
                problems.append(f"{path}: kernel {k} is not in the PTX")
            elif len(params[k]) != len(rest):
                problems.append(f"{path}: {k} takes {len(params[k])} arguments, the launch passes {len(rest)}")
for p in problems:
    print("check-cuda-launches:", p, file=sys.stderr)
print(f"check-cuda-launches: {checked} launches against {len(params)} kernels, {len(problems)} problems")
sys.exit(1 if problems else 0)
