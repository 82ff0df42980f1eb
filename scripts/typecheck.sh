#!/usr/bin/env bash
# Type-check the package as it is installed: runtime/, patches/, cli/ and benchmarks/ live at the top
# of the repo but import as blockstore.runtime, ... (pyproject's package-dir), a mapping mypy cannot
# read. So build the installed layout from symlinks in .typecheck/ and check that.
set -euo pipefail
cd "$(dirname "$0")/.."
root=.typecheck/blockstore
rm -rf .typecheck && mkdir -p "$root"
for entry in blockstore/*; do
    ln -s "../../$entry" "$root/$(basename "$entry")"
done
for folder in runtime patches cli benchmarks; do
    ln -s "../../$folder" "$root/$folder"
done
exec "${MYPY:-mypy}" --config-file pyproject.toml "$root"
