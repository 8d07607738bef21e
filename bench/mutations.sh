#!/usr/bin/env bash
# Mutation testing of the modules that decide reuse, caching, drawing, splitting, filtering and rejecting
# ([tool.mutmut] in pyproject.toml names them and the tests that guard them). Too slow for CI: run it by hand.
#
#   bash bench/mutations.sh            # prints the score, the surviving mutants, and the goal line
#   bash bench/mutations.sh 'core.stage.*' 'stages.build.examples.*'   # only those mutants (mutmut's names, globs)
#
# Survivors listed in bench/mutations-equivalent.md change nothing observable (each with its reason): a new
# survivor not there is a gap in the tests, or belongs there with a reason.
#
# mutmut 3 copies the tree into mutants/ and runs, for each mutant, the tests that cover its function. It runs
# here in a scratch copy of the tracked files, so the checkout stays clean. OMP_NUM_THREADS=1: torch's thread
# pool does not survive mutmut's fork (the children segfault and count as neither killed nor survived).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PY:-$REPO/.venv/bin/python}
"$PY" -m pip show mutmut >/dev/null 2>&1 || "$PY" -m pip install -q "mutmut>=3.3,<4"
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
git ls-files -z | xargs -0 tar -cf - | tar -xf - -C "$SCRATCH"
ln -s "$REPO/.venv" "$SCRATCH/.venv"
cd "$SCRATCH"
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
"$PY" -m mutmut run --max-children "${MUTMUT_CHILDREN:-2}" "$@" >mutmut.log 2>&1 || true
"$PY" -m mutmut results --all true >results.txt 2>/dev/null || "$PY" -m mutmut results >results.txt 2>/dev/null || true
if [ "$#" -gt 0 ]; then  # results lists every mutant mutmut knows; keep the ones asked for
  "$PY" - "$@" <<'PY'
import fnmatch, sys
rows = [l for l in open("results.txt") if ": " in l]
keep = [l for l in rows if any(fnmatch.fnmatch(l.split(":")[0].strip(), p) for p in sys.argv[1:])]
open("results.txt", "w").writelines(keep)
PY
fi
"$PY" - "$start" <<'PY'
import collections, re, sys, time
rows = [l.strip() for l in open("results.txt") if ": " in l]
status = collections.Counter(l.rsplit(": ", 1)[1] for l in rows)
killed, survived = status["killed"], status["survived"] + status["no tests"]  # untested code counts as surviving
judged = killed + survived + status["timeout"] + status["suspicious"]
print(f"mutants: {sum(status.values())} ({', '.join(f'{k} {v}' for k, v in sorted(status.items()))}); "
      f"{(time.time() - float(sys.argv[1])) / 60:.1f} min")
by_module = collections.Counter(l.split(".x")[0] for l in rows if l.endswith((": survived", ": no tests")))
print("survivors by module:", dict(by_module))
print("surviving mutants (mutmut show NAME in a copy to see each):")
for l in rows:
    if l.endswith((": survived", ": no tests")):
        print("  ", l.rsplit(":", 1)[0])
score = (killed + status["timeout"]) / judged if judged else 0.0
print(f"goal mutation_score: {100 * score:.1f}% of {judged} judged mutants killed (target 93%) "
      f"{'met' if score >= 0.93 else 'not met'}")
PY
# each survivor's diff, for review (the scratch copy goes when this script ends)
mkdir -p "$REPO/work"
grep -E ': (survived|no tests)$' results.txt | cut -d: -f1 | while read -r name; do
  echo "=== $name"; "$PY" -m mutmut show "$name" 2>&1 | head -40
done >"$REPO/work/mutation-survivors.txt" || true
echo "survivors' diffs: $REPO/work/mutation-survivors.txt"
