#!/bin/sh
# A Warren exec handler in shell: answers with a line of text.
#
# The task arrives on stdin as one JSON object
#   {"id": "...", "type": "...", "attempt": 1, "args": {...}}
# and stdout is the result (text here, as it is not JSON). Exit 0: success;
# exit 75: retry later; other codes: permanent failure, with the last lines
# of stderr as the message.
set -eu

input=$(cat)
# The "name" argument, if any, without a JSON parser: fine for a plain name.
name=$(printf '%s' "$input" | sed -n 's/.*"name": *"\([A-Za-z0-9 _-]*\)".*/\1/p')
if [ -z "$name" ]; then
    echo "args.name is missing or not a plain name" >&2
    exit 2
fi
echo "warren:progress 1 1" >&2
printf 'hello, %s (%s bytes of input)\n' "$name" "$(printf '%s' "$input" | wc -c | tr -d ' ')"
