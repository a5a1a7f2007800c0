#!/bin/sh
# Used as a vllm_command prefix: leave N orphans behind (double fork), then exec the rest.
n=$1; shift
i=0
while [ "$i" -lt "$n" ]; do
  ( sleep 0.2 & )
  i=$((i + 1))
done
exec "$@"
