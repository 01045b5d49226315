# Sourced by the bench/*.sh scripts: run from the repository root, results in $RESULTS (default logs/bench/).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RESULTS=${RESULTS:-logs/bench}
mkdir -p "$RESULTS"
