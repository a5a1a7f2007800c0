#!/usr/bin/env bash
# Install Debian sid's CRIU (4.2 or newer) into a private prefix.
#
# Usage: packaging/install-criu.sh [PREFIX]        (default PREFIX: /opt/llmux-criu)
#
# Why: on Debian 12 with a recent kernel, bookworm's criu 3.17 fails `criu check`
# ("Unexpected rt vDSO area bounds") and trixie's 4.1 cannot dump TCP sockets on
# kernels >= 6.16 (SO_PASSSEC). sid's 4.2.x works, but needs a newer glibc than
# bookworm's, so it is unpacked together with sid's own dynamic loader and shared
# libraries into PREFIX, and PREFIX/bin/criu is a wrapper that runs the binary
# through that loader (`ld.so --library-path`, so programs that criu itself starts
# keep using the system's libraries).
#
# How:
#   * the Debian mirror is read from the machine's apt configuration (deb822
#     *.sources files, or one-line sources.list entries; LLMUX_APT_ETC names
#     another directory to read them from, default /etc/apt); LLMUX_CRIU_MIRROR
#     overrides it, LLMUX_CRIU_SUITE overrides the suite (default: sid);
#   * apt-get update / apt-cache / apt-get download run with a private sources
#     list, lists directory, cache and (empty) dpkg status, all in a temporary
#     directory: the system's apt configuration and state are never touched;
#   * the library packages that criu needs are found by walking the Depends /
#     Pre-Depends graph from `criu`, following library packages only; the result
#     is then checked by asking sid's loader to resolve every shared object the
#     binary needs, all of which must come from PREFIX;
#   * every package is unpacked with `dpkg -x` into a staging directory that
#     replaces PREFIX only once the new criu runs.
#
# Idempotent: exits at once when PREFIX/bin/criu already reports 4.2 or newer.
# Nothing is installed system-wide, except ca-certificates / debian-archive-keyring
# when the download itself needs them and they are missing.
set -euo pipefail

PREFIX=${1:-/opt/llmux-criu}
SUITE=${LLMUX_CRIU_SUITE:-sid}
APT_ETC=${LLMUX_APT_ETC:-/etc/apt}
MIN_MAJOR=4
MIN_MINOR=2
START=$SECONDS

log() { printf 'install-criu: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

case $PREFIX in
    /*) ;;
    *) PREFIX=$(pwd)/$PREFIX ;;
esac
PREFIX=${PREFIX%/}
[[ -n $PREFIX && $PREFIX != / ]] || die "refusing to install into '/'"

# criu_version_ok WRAPPER: true when WRAPPER runs and reports >= MIN_MAJOR.MIN_MINOR
criu_version_ok() {
    local out
    out=$("$1" --version 2>/dev/null) || return 1
    awk -v maj="$MIN_MAJOR" -v min="$MIN_MINOR" '
        /^Version:/ { split($2, v, "."); if (v[1] + 0 > maj || (v[1] + 0 == maj && v[2] + 0 >= min)) ok = 1 }
        END { exit !ok }' <<<"$out"
}

if [[ -x $PREFIX/bin/criu ]] && criu_version_ok "$PREFIX/bin/criu"; then
    log "already installed: $("$PREFIX/bin/criu" --version 2>/dev/null | awk '/^Version:/ {print $2}') in $PREFIX"
    exit 0
fi

for tool in apt-get apt-cache dpkg dpkg-deb awk; do
    command -v "$tool" >/dev/null || die "'$tool' not found: this script needs a Debian system with apt"
done

ARCH=$(dpkg --print-architecture)

# --- find the Debian mirror in the machine's apt configuration -----------------------
# Prints candidate lines "URI<TAB>KEYRING" (KEYRING may be empty), best first.
# A source counts as a Debian archive when it is a `deb` source whose suite is the
# release's codename (or a Debian suite name) and whose components include `main`;
# this leaves out security, updates, backports and third-party repositories.
codename=""
if [[ -r /etc/os-release ]]; then
    # shellcheck disable=SC1091
    codename=$( . /etc/os-release && printf '%s' "${VERSION_CODENAME:-}")
fi

find_mirrors() {
    local f
    shopt -s nullglob
    for f in "$APT_ETC"/sources.list.d/*.sources; do
        awk -v codename="$codename" '
            function flush() {
                if (uris != "" && types ~ /(^| )deb( |$)/ && tolower(enabled) != "no" && comps ~ /(^| )main( |$)/) {
                    n = split(suites, s, " ")
                    good = 0
                    for (i = 1; i <= n; i++)
                        if (s[i] == codename || s[i] ~ /^(stable|testing|unstable|sid|oldstable|bookworm|trixie|forky|bullseye)$/) good = 1
                    if (good) {
                        m = split(uris, u, " ")
                        for (i = 1; i <= m; i++) print u[i] "\t" signedby
                    }
                }
                types = uris = suites = comps = signedby = ""; enabled = "yes"; field = ""
            }
            BEGIN { enabled = "yes" }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            /^[ \t]/ { if (field == "uris") uris = uris " " $0; next }   # continuation line
            {
                key = tolower($0); sub(/:.*/, "", key)
                val = $0; sub(/^[^:]*:[ \t]*/, "", val); gsub(/[ \t]+/, " ", val)
                field = key
                if (key == "types") types = val
                else if (key == "uris") uris = val
                else if (key == "suites") suites = val
                else if (key == "components") comps = val
                else if (key == "enabled") enabled = val
                else if (key == "signed-by" && val ~ /^\//) signedby = val
            }
            END { flush() }' "$f" | sed 's/^ *//'
    done
    for f in "$APT_ETC"/sources.list "$APT_ETC"/sources.list.d/*.list; do
        [[ -r $f ]] || continue
        awk -v codename="$codename" '
            $1 != "deb" { next }
            {
                i = 2; opts = ""
                if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) { opts = opts " " $i; i++ } opts = opts " " $i; i++ }
                uri = $i; suite = $(i + 1); main = 0
                for (j = i + 2; j <= NF; j++) if ($j == "main") main = 1
                if (!main) next
                if (suite != codename && suite !~ /^(stable|testing|unstable|sid|oldstable|bookworm|trixie|forky|bullseye)$/) next
                key = ""
                if (match(opts, /signed-by=[^ \]]+/)) key = substr(opts, RSTART + 10, RLENGTH - 10)
                print uri "\t" key
            }' "$f"
    done
}

if [[ -n ${LLMUX_CRIU_MIRROR:-} ]]; then
    MIRRORS=$(printf '%s\t\n' "$LLMUX_CRIU_MIRROR")
else
    MIRRORS=$(find_mirrors | awk -F'\t' '!seen[$1]++')
fi
[[ -n $MIRRORS ]] || die "no Debian archive found in $APT_ETC/sources.list{,.d} (set LLMUX_CRIU_MIRROR to a Debian mirror URI)"

# --- what the download itself needs -------------------------------------------------
need=()
if grep -q '^https:' <<<"$MIRRORS" && [[ ! -s /etc/ssl/certs/ca-certificates.crt ]]; then
    need+=(ca-certificates)
fi
if [[ ! -s /usr/share/keyrings/debian-archive-keyring.gpg ]]; then
    need+=(debian-archive-keyring)
fi
if ((${#need[@]})); then
    log "installing what the download needs: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# --- private apt ---------------------------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/install-criu.XXXXXX")
STAGE="$PREFIX.staging.$$"
cleanup() { rm -rf "$WORK" "$STAGE"; }
trap cleanup EXIT
chmod 755 "$WORK"
mkdir -p "$WORK/lists/partial" "$WORK/cache/archives/partial" "$WORK/sources.list.d" \
    "$WORK/preferences.d" "$WORK/debs"
: >"$WORK/status"
# apt fetches as the unprivileged _apt user when it exists
if id _apt >/dev/null 2>&1 && [[ $EUID -eq 0 ]]; then
    chown _apt "$WORK/lists/partial" "$WORK/cache/archives/partial" "$WORK/debs"
fi

APT_OPTS=(
    -o "Dir::Etc::SourceList=$WORK/sources.list"
    -o "Dir::Etc::SourceParts=$WORK/sources.list.d"
    -o "Dir::Etc::Preferences=$WORK/preferences"
    -o "Dir::Etc::PreferencesParts=$WORK/preferences.d"
    -o "Dir::State::Lists=$WORK/lists"
    -o "Dir::State::status=$WORK/status"
    -o "Dir::Cache=$WORK/cache"
    -o "Dir::Cache::archives=$WORK/cache/archives"
    -o "Dir::Cache::pkgcache=$WORK/cache/pkgcache.bin"
    -o "Dir::Cache::srcpkgcache=$WORK/cache/srcpkgcache.bin"
    -o "APT::Architectures=$ARCH"
    -o "Acquire::Languages=none"
    -o "APT::Get::List-Cleanup=false"
)

updated=""
while IFS=$'\t' read -r uri key; do
    [[ -n $uri ]] || continue
    [[ -n $key && -r $key ]] || key=/usr/share/keyrings/debian-archive-keyring.gpg
    printf 'deb [arch=%s signed-by=%s] %s %s main\n' "$ARCH" "$key" "$uri" "$SUITE" >"$WORK/sources.list"
    log "fetching the $SUITE package lists from $uri"
    if apt-get "${APT_OPTS[@]}" -qq update >"$WORK/update.log" 2>&1 \
        && ! grep -qE '^(W|E): ' "$WORK/update.log" \
        && apt-cache "${APT_OPTS[@]}" show criu >/dev/null 2>&1; then
        updated=$uri
        break
    fi
    log "  no usable $SUITE suite there:"
    sed 's/^/    /' "$WORK/update.log" >&2
done <<<"$MIRRORS"
[[ -n $updated ]] || die "could not read the $SUITE suite from any configured Debian mirror"

# --- resolve the library packages criu needs ------------------------------------------
# Breadth-first over Depends/Pre-Depends from criu, following only library packages
# (named lib*, or in section libs/oldlibs, such as zlib1g); a virtual package or an
# alternative is followed through any of its library candidates that exist.
declare -A seen=()
is_lib() { # is_lib NAME...: prints the names that are real library packages of SUITE
    apt-cache "${APT_OPTS[@]}" show --no-all-versions "$@" 2>/dev/null | awk '
        /^Package:/ { p = $2 }
        /^Section:/ { s = $2 }
        /^$/ { if (p != "" && (p ~ /^lib/ || s ~ /(^|\/)(old)?libs$/)) print p; p = s = "" }
        END { if (p != "" && (p ~ /^lib/ || s ~ /(^|\/)(old)?libs$/)) print p }'
}
PKGS=(criu)
seen[criu]=1
frontier=(criu)
while ((${#frontier[@]})); do
    mapfile -t deps < <(apt-cache "${APT_OPTS[@]}" depends --no-recommends --no-suggests \
        --no-conflicts --no-breaks --no-replaces --no-enhances "${frontier[@]}" 2>/dev/null \
        | awk '/^ +\|?(Pre)?Depends: / { d = $2; gsub(/[<>]/, "", d); sub(/:.*/, "", d); print d }
               /^    [^ ]/ && prev_virtual { print $1 }
               { prev_virtual = ($0 ~ /^ +\|?(Pre)?Depends: </) || (prev_virtual && /^    [^ ]/) }' \
        | sort -u)
    new=()
    for d in "${deps[@]}"; do
        [[ -z ${seen[$d]:-} ]] || continue
        seen[$d]=1
        new+=("$d")
    done
    frontier=()
    if ((${#new[@]})); then
        mapfile -t frontier < <(is_lib "${new[@]}" | sort -u)
        PKGS+=("${frontier[@]}")
    fi
done
# The loader comes from libc6; make sure it is there even if criu's metadata changes.
[[ -n ${seen[libc6]:-} ]] || PKGS+=(libc6)
log "packages: ${PKGS[*]}"

# --- download and unpack ----------------------------------------------------------------
(cd "$WORK/debs" && apt-get "${APT_OPTS[@]}" -qq download "${PKGS[@]}") >"$WORK/download.log" 2>&1 || {
    cat "$WORK/download.log" >&2
    die "apt-get download failed"
}
rm -rf "$STAGE"
mkdir -p "$STAGE"
for deb in "$WORK"/debs/*.deb; do
    dpkg-deb -x "$deb" "$STAGE"
done
[[ -x $STAGE/usr/sbin/criu ]] || die "criu package has no /usr/sbin/criu"

# The multiarch library directory is where libc6 put libc.so.6.
libc=$(find "$STAGE/usr/lib" "$STAGE/lib" -name libc.so.6 2>/dev/null | head -n 1 || true)
[[ -n $libc ]] || die "libc6 unpacked no libc.so.6"
LIBDIR_ABS=$(dirname "$libc")
LIBDIR=${LIBDIR_ABS#"$STAGE"/}            # e.g. usr/lib/x86_64-linux-gnu
TRIPLET=$(basename "$LIBDIR")
LOADER_ABS=$(find "$LIBDIR_ABS" -maxdepth 1 -name 'ld-linux*.so.*' | head -n 1 || true)
[[ -n $LOADER_ABS ]] || LOADER_ABS=$(find "$LIBDIR_ABS" -maxdepth 1 -name 'ld*.so.[0-9]*' ! -name 'ld-*.so.*.*' | head -n 1 || true)
[[ -n $LOADER_ABS ]] || die "no dynamic loader found in $LIBDIR"
LOADER=${LOADER_ABS#"$STAGE"/}
libpath_rel=("$LIBDIR")
# a non-merged-/usr libc6 would also have lib/<triplet>
if [[ -d $STAGE/lib/$TRIPLET && lib/$TRIPLET != "$LIBDIR" ]]; then
    libpath_rel+=("lib/$TRIPLET")
fi

mkdir -p "$STAGE/bin"
# shellcheck disable=SC2016  # $here and $@ are for the wrapper, not expanded here
{
    printf '#!/bin/sh\n'
    printf '# Generated by packaging/install-criu.sh: runs Debian %s criu through its own\n' "$SUITE"
    printf '# dynamic loader and libraries, found relative to this script.\n'
    printf 'here=$(dirname "$(readlink -f "$0")")/..\n'
    lp=""
    for d in "${libpath_rel[@]}"; do lp+="${lp:+:}\$here/$d"; done
    printf 'exec "$here/%s" --library-path "%s" "$here/usr/sbin/criu" "$@"\n' "$LOADER" "$lp"
} >"$STAGE/bin/criu"
chmod 755 "$STAGE/bin/criu"

# Every shared object criu needs must resolve inside the prefix.
lp_abs=""
for d in "${libpath_rel[@]}"; do lp_abs+="${lp_abs:+:}$STAGE/$d"; done
resolved=$("$LOADER_ABS" --library-path "$lp_abs" --list "$STAGE/usr/sbin/criu" 2>&1) \
    || die "the $SUITE loader cannot load criu:"$'\n'"$resolved"
outside=$(awk -v stage="$STAGE/" '
    /=>/ { if ($3 == "not" || index($3, stage) != 1) print "  " $0 }' <<<"$resolved")
[[ -z $outside ]] || die "libraries missing from the prefix (add their packages):"$'\n'"$outside"
criu_version_ok "$STAGE/bin/criu" || die "the unpacked criu does not run or is older than $MIN_MAJOR.$MIN_MINOR"

# --- swap in ---------------------------------------------------------------------------
mkdir -p "$(dirname "$PREFIX")"
if [[ -e $PREFIX ]]; then
    rm -rf "$PREFIX.old.$$"
    mv "$PREFIX" "$PREFIX.old.$$"
    mv "$STAGE" "$PREFIX"
    rm -rf "$PREFIX.old.$$"
else
    mv "$STAGE" "$PREFIX"
fi

log "installed into $PREFIX ($(du -sh "$PREFIX" | cut -f1), ${#PKGS[@]} packages, $((SECONDS - START)) s)"
"$PREFIX/bin/criu" --version
if check=$("$PREFIX/bin/criu" check 2>&1); then
    log "criu check: ok"
else
    log "criu check reported problems (the binary runs; see below)"
fi
printf '%s\n' "$check"
