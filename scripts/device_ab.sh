#!/usr/bin/env bash
# A/B of a kernel change on the GPU machine, in one call: this tree is B; A is this tree with
# PATCH applied (e.g. `git diff HEAD HEAD~1 -- csrc > ab.patch` here: the change undone), built
# beside B's build at the same time. Then the bench runs A, B, A, B, each into $OUT.
#   bash scripts/device_ab.sh ab.patch metaplastic --impl cram --shape 8,4096,8,64,128
# B's build is device_check.sh's (so the tree is ready for its other stages afterwards); A's logs are
# .txt because device_check.sh packs the *.log of $OUT when it ends.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
patch_file=$(realpath "$1") bench=$2; shift 2
OUT=${OUT:-$PWD/device_out}; mkdir -p "$OUT"
A=/tmp/ab_baseline
rm -rf "$A" && mkdir -p "$A"
tar --exclude=./build --exclude='*.so' --exclude=./.whl -cf - . | tar -xf - -C "$A"
(cd "$A" && (patch -p1 < "$patch_file" || git apply "$patch_file")) > "$OUT/ab_patch.txt" 2>&1 \
  || { echo "the patch does not apply: $OUT/ab_patch.txt"; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_ab .whl/*.whl
(cd "$A" && CC=/usr/bin/gcc CXX=/usr/bin/g++ LDSHARED="/usr/bin/g++ -shared" PYTHONPATH=/tmp/site_ab MAX_JOBS=8 \
  python3 setup.py build_ext --inplace > "$OUT/ab_build_a.txt" 2>&1; echo "build A rc=$?" >> "$OUT/ab_build_a.txt") &
MAX_JOBS=8 bash scripts/device_check.sh build
wait
tail -1 "$OUT/ab_build_a.txt"
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
for r in 1 2; do
  (cd "$A" && PYTHONPATH=/tmp/site_ab python3 -m bench."$bench" --device cuda --no-check "$@" --out "$OUT/ab_a$r.json" \
     > "$OUT/ab_a$r.log" 2>&1)
  python3 -m bench."$bench" --device cuda --no-check "$@" --out "$OUT/ab_b$r.json" > "$OUT/ab_b$r.log" 2>&1
  grep -h " ms" "$OUT/ab_a$r.log" | sed 's/^/A /'; grep -h " ms" "$OUT/ab_b$r.log" | sed 's/^/B /'
done
