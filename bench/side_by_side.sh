#!/usr/bin/env bash
# Side by side, in one sitting: clickagg's dataflow bench (embedded log and store, 2
# workers; once with every view, once without ad_hourly_users, which the peers' jobs do
# not compute), Flink 2.3 (batch and streaming, parallelism 2) and Pathway 0.33 (2 threads) on
# the same 5M-click file, each checked against the DuckDB truth; prints wall times and
# ratios. The machine is shared and noisy: only the ratios of one run mean anything.
#
#   bench/side_by_side.sh            # from the repository root
#
# The peers' scripts come from ../shared/peers (CLICKAGG_PEERS_SRC) and are copied to
# ~/.cache/clickagg/peers at run time, where the venvs and data live (created when missing,
# with the installs of the peers' README; Flink needs Java 17).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
src=${CLICKAGG_PEERS_SRC:-$repo/../shared/peers}
peers=$HOME/.cache/clickagg/peers
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/clickagg/target}
mkdir -p "$peers/data"
cp "$src"/*.py "$src"/*.sh "$peers"/
cd "$peers"

venv() { # name, pip packages...
  local name=$1; shift
  if [ ! -x "$name/bin/python" ]; then
    echo "[side-by-side] creating $name: pip install $*" >&2
    python3 -m venv "$name"
    "$name/bin/pip" install -q "$@"
  fi
}
venv venv-base duckdb numpy pyarrow
venv venv-flink "apache-flink>=2,<3"
venv venv-pathway pathway

if [ ! -f data/clicks.csv ]; then
  venv-base/bin/python gen_clicks.py --n 5000000 --seed 42 --out data/clicks --no-jsonl
fi
[ -f data/truth.csv ] || venv-base/bin/python truth_duckdb.py data/clicks.csv data/truth.csv 2
if [ ! -d data/flink_csv ]; then
  mkdir -p data/flink_csv
  awk -F, 'NR>1 {print > ("data/flink_csv/part-" (NR%2) ".csv")}' data/clicks.csv
fi
echo "[side-by-side] $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%FT%TZ)"

# clickagg: the dataflow bench (imports the file into a cached log once, outside the timing).
(cd "$repo" && DATAFLOW_STORES=sqlite DATAFLOW_WORKERS=2 cargo bench --bench dataflow --quiet 2>/dev/null \
  | tee "$peers/logs-clickagg.txt" || true) >&2
mkdir -p logs
ck_line=$(grep -E '^  sqlite 2w: [0-9.]+s' "$peers/logs-clickagg.txt" | tail -1 || true)
ck_time=$(echo "$ck_line" | sed -E 's/^  sqlite 2w: ([0-9.]+)s.*/\1/')
ck_match=$(grep -q 'sqlite 2w: MATCH' "$peers/logs-clickagg.txt" && echo MATCH || echo MISMATCH)
ck_rss=$(echo "$ck_line" | sed -E 's/.*peak RSS ([0-9]+) MiB.*/\1/')
# The same without the distinct-users view, which the peers' jobs do not compute either.
(cd "$repo" && DATAFLOW_DISABLED_VIEWS=ad_hourly_users DATAFLOW_STORES=sqlite DATAFLOW_WORKERS=2 \
  cargo bench --bench dataflow --quiet 2>/dev/null | tee "$peers/logs-clickagg-peers-views.txt" || true) >&2
cv_line=$(grep -E '^  sqlite 2w: [0-9.]+s' "$peers/logs-clickagg-peers-views.txt" | tail -1 || true)
cv_time=$(echo "$cv_line" | sed -E 's/^  sqlite 2w: ([0-9.]+)s.*/\1/')
cv_match=$(grep -q 'sqlite 2w: MATCH' "$peers/logs-clickagg-peers-views.txt" && echo MATCH || echo MISMATCH)
cv_rss=$(echo "$cv_line" | sed -E 's/.*peak RSS ([0-9]+) MiB.*/\1/')

run_peer() { # label, command...; prints "seconds match rss"
  local label=$1; shift
  local out
  out=$("$@" 2>&1 || true)
  echo "$out" | sed "s/^/[$label] /" >&2
  local secs match rss
  secs=$(echo "$out" | grep -oE '(job \(submit->finish\)|pw\.run) [0-9.]+s' | grep -oE '[0-9.]+' | tail -1)
  match=$(echo "$out" | grep -oE 'MATCH|MISMATCH' | tail -1)
  # The job's own peak (Flink: the JVM's, not the Python driver's that time(1) sees).
  rss=$(echo "$out" | grep -oE 'VmHWM\) MB: \[?[0-9]+' | grep -oE '[0-9]+$' | sort -n | tail -1)
  if [ -z "$rss" ]; then
    rss=$(( $(echo "$out" | grep -E 'Maximum resident' | grep -oE '[0-9]+' | tail -1) / 1024 ))
  fi
  echo "${secs:-nan} ${match:-NO_OUTPUT} ${rss:-0}"
}
read -r fb_time fb_match fb_rss < <(run_peer flink-batch ./run_flink.sh 1 --mode batch)
read -r fs_time fs_match fs_rss < <(run_peer flink-streaming ./run_flink.sh 1 --mode streaming)
read -r pw_time pw_match pw_rss < <(PATHWAY_THREADS=2 run_peer pathway ./run_pathway.sh 1)

echo
echo "side by side, 5,000,000 clicks, $(date -u +%FT%TZ), load now $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-34s %9s %12s %10s %9s %12s %12s\n' engine "time s" "clicks/s" "peak MiB" answer "vs clickagg" "vs peers' v."
row() {
  local name=$1 t=$2 match=$3 rss=$4
  awk -v n="$name" -v t="$t" -v m="$match" -v r="$rss" -v c="$ck_time" -v v="$cv_time" 'BEGIN {
    if (t + 0 > 0) printf "%-34s %9.1f %12.0f %10s %9s %11.1fx %11.1fx\n", n, t, 5000000 / t, r, m, t / c, (v + 0 > 0 ? t / v : 0);
    else printf "%-34s %9s %12s %10s %9s %12s %12s\n", n, "-", "-", r, m, "-", "-" }'
}
row "clickagg dataflow (SQLite, 2 w)" "$ck_time" "$ck_match" "$ck_rss"
row "clickagg, peers' views (no a_h_u)" "$cv_time" "$cv_match" "$cv_rss"
row "Flink 2.3 batch (p=2, job time)" "$fb_time" "$fb_match" "$fb_rss"
row "Flink 2.3 streaming (p=2, job)" "$fs_time" "$fs_match" "$fs_rss"
row "Pathway 0.33 (2 threads, pw.run)" "$pw_time" "$pw_match" "$pw_rss"
echo "(clickagg reads a pre-filled log, imported once by clickagg import; the peers read the CSV."
echo " 'vs clickagg' is the peer's time over clickagg's: above 1x, clickagg is faster. 'vs peers' v.'"
echo " compares with clickagg without ad_hourly_users, the distinct users per ad and hour that"
echo " the peers' jobs do not compute; clickagg still computes rollups, late clicks and fraud.)"
