#!/bin/sh
# The VM test guest's runner: started by tests/vm/init, chrooted into the host's root file
# system (read-only 9p under a tmpfs overlay), as root, on the kernel under test.
#
# It follows the plan `cargo xtask vm-test` wrote to /ctout/plan, one command a line, its fields
# separated by tabs (paths may hold spaces; the test names by spaces):
#   env NAME VALUE                      export a variable (CONNTRACE_BIN, CONNTRACE_ATTACH)
#   probe SECONDS NAME                  run conntrace for 1 s and keep its `ready` line
#   test NAME PATH SECONDS TESTS...     run these tests (exact names) of a libtest executable
# and leaves its results in /ctout (a writable 9p share) for xtask to read: NAME.json (libtest's
# JSON events) or NAME.jsonl (the probe's output), NAME.stderr, NAME.rc, NAME.seconds, dmesg.
# The console only gets progress lines.

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8
# libtest's JSON output is an unstable option; this lets a stable-built test binary use it.
export RUSTC_BOOTSTRAP=1
out=/ctout

ip link set lo up
echo "guest: kernel $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) MiB"
uname -r >"$out/kernel"

tab=$(printf '\t')
while IFS=$tab read -r kind name path secs args; do
    case $kind in
    env)
        export "$name=$path"
        ;;
    probe)
        echo "guest: conntrace probe ${CONNTRACE_ATTACH:+--attach $CONNTRACE_ATTACH} (attach plan)"
        start=$(date +%s)
        timeout -k 5 "$name" "$CONNTRACE_BIN" --json --duration 1s --port 9 \
            ${CONNTRACE_ATTACH:+--attach "$CONNTRACE_ATTACH"} \
            </dev/null >"$out/$path.jsonl" 2>"$out/$path.stderr"
        echo $? >"$out/$path.rc"
        echo $(($(date +%s) - start)) >"$out/$path.seconds"
        ;;
    test)
        echo "guest: $name ($(echo $args | wc -w) tests, at most $secs s)"
        start=$(date +%s)
        {
            # shellcheck disable=SC2086 # test names, split on purpose
            timeout -k 10 "$secs" "$path" --test-threads 1 -Z unstable-options \
                --format json --show-output --exact $args </dev/null 2>"$out/$name.stderr"
            echo $? >"$out/$name.rc"
        } | tee "$out/$name.json" |
            sed -un -e 's/^{ "type": "test", "event": "started", "name": "\([^"]*\)" }$/  run    \1/p' \
                -e 's/^{ "type": "test", "name": "\([^"]*\)", "event": "\([a-z]*\)".*/  \2 \1/p'
        echo $(($(date +%s) - start)) >"$out/$name.seconds"
        echo "guest: $name exit $(cat "$out/$name.rc") after $(cat "$out/$name.seconds") s"
        ;;
    esac
done <"$out/plan"

dmesg >"$out/dmesg" 2>&1
echo "guest: plan complete"
