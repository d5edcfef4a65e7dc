# shellcheck shell=sh
# shellcheck disable=SC2034 # the variables are read by the scripts that source this
# Sourced by setup.sh, demo.sh and test.sh: which kind of host this is.
#
# Sets `host` to `macos` (Apple silicon) or `debian` (any other host is
# treated as Debian); on macOS exports HOMEBREW_PREFIX and puts Homebrew's
# keg-only e2fsprogs on PATH. Stops with one line on an Intel Mac or a Mac
# without Homebrew.

case "$(uname -s)" in
Darwin)
    host=macos
    arch=$(uname -m)
    if [ "$arch" != arm64 ]; then
        echo "vmapple needs an Apple-silicon Mac: this one reports $arch (an Intel Mac, or a terminal running under Rosetta)" >&2
        exit 1
    fi
    if ! command -v brew >/dev/null 2>&1; then
        echo "Homebrew is missing: install it (https://brew.sh), open a new terminal and run this again" >&2
        exit 1
    fi
    # Homebrew's own variable (`brew shellenv` sets it); exported, it also
    # spares guest/firmware/Makefile from asking brew.
    HOMEBREW_PREFIX=${HOMEBREW_PREFIX:-$(brew --prefix)}
    # mkfs.ext4, debugfs and e2fsck, for the tests that make disk images.
    PATH="$HOMEBREW_PREFIX/opt/e2fsprogs/sbin:$HOMEBREW_PREFIX/opt/e2fsprogs/bin:$PATH"
    export HOMEBREW_PREFIX PATH
    ;;
*)
    host=debian
    ;;
esac
