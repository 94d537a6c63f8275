#!/usr/bin/env bash
# Download, here, the wheels that the lent GPU machine lacks (it has torch, numpy, pandas,
# scikit-image, tqdm, matplotlib, pyyaml, attrs and pytest, and no registry) into .whl/
# (git-ignored through .git/info/exclude), for `bench/gpu.sh` there: CPython 3.12, x86-64
# manylinux, the versions this project's venv resolves today. Pillow and tifffile travel too,
# so the overlay's sized legend font (pillow>=10.1) and the TIFF writer are the tested ones;
# py-spy (a static binary in its wheel) profiles the inference pipeline there.
# About 50 MB of the 64 MB a device call may carry.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
mkdir -p .whl
for spec in \
    zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 \
    openslide-python==1.4.7 openslide-bin==4.0.1.2 imagecodecs==2026.3.6 \
    jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 \
    rpds-py==2026.9.1 pillow==13.0.0 tifffile==2026.3.3 py-spy==0.4.3; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d .whl "$spec"
done
ls .whl
