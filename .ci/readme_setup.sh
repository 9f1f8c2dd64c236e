#!/usr/bin/env bash
# Run README's set-up commands literally: every command line of the first
# ```bash block under "## Set up" in README.md, in order, each with bash -e in
# the current environment. CI runs this first (in a fresh venv), so it fails
# whenever a new user following README would.
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t cmds < <(python3 - <<'PY'
import re
text = open("README.md").read()
sec = text.split("\n## Set up", 1)[1]
block = re.search(r"```bash\n(.*?)```", sec, re.S).group(1)
for line in block.splitlines():
    line = line.strip()
    if line and not line.startswith("#"):
        print(line)
PY
)
if [ "${#cmds[@]}" -lt 2 ]; then
    echo "README's Set up block has fewer than two commands" >&2
    exit 1
fi
for c in "${cmds[@]}"; do
    echo "+ $c (from README)"
    bash -e -c "$c"
done
