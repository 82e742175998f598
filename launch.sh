#!/usr/bin/env sh
# Double-click wrapper: start OneCard Studio.
cd "$(dirname "$0")" && exec python3 launch.py "$@"
