# Helpers shared by the scripts that start local servers (sourced).

# A process that exists and is not a zombie: a server killed a moment ago
# can linger as one until it is reaped, and must count as stopped.
alive() {
    kill -0 "$1" 2>/dev/null || return 1
    if [ -r "/proc/$1/stat" ]; then
        local state
        state="$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)"
        [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
    fi
}
