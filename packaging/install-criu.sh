#!/usr/bin/env bash
# Install Debian sid's CRIU (4.2 or newer) into a private prefix, together with
# CRIU's CUDA plugin (cuda_plugin.so) built from the same CRIU source.
#
# Usage: packaging/install-criu.sh [PREFIX]        (default PREFIX: /opt/llmux-criu)
#        packaging/install-criu.sh --print-mirrors  (the Debian mirrors found in the
#                                                    machine's apt configuration, best
#                                                    first, one "URI<TAB>KEYRING" a line;
#                                                    packaging/container/smoke.sh uses it)
#
# Result:  PREFIX/bin/criu                 wrapper to run criu (see below)
#          PREFIX/lib/criu/cuda_plugin.so  CRIU's CUDA plugin: criu -L PREFIX/lib/criu
#                                          (llmuxd: cuda_plugin_dir = "PREFIX/lib/criu")
#
# Why: on Debian 12 with a recent kernel, bookworm's criu 3.17 fails `criu check`
# ("Unexpected rt vDSO area bounds") and trixie's 4.1 cannot dump TCP sockets on
# kernels >= 6.16 (SO_PASSSEC). sid's 4.2.x works, but needs a newer glibc than
# bookworm's, so it is unpacked together with sid's own dynamic loader and shared
# libraries into PREFIX, and PREFIX/bin/criu is a wrapper that runs the binary
# through that loader (`ld.so --library-path`, so programs that criu itself starts
# keep using the system's libraries). Debian ships no CUDA plugin, so it is built
# here from Debian's source package of the very criu version that was unpacked.
#
# How:
#   * the Debian mirror is read from the machine's apt configuration (deb822
#     *.sources files, or one-line sources.list entries; LLMUX_APT_ETC names
#     another directory to read them from, default /etc/apt); LLMUX_CRIU_MIRROR
#     overrides it, LLMUX_CRIU_SUITE overrides the suite (default: sid);
#   * apt-get update / apt-cache / apt-get download / apt-get source run with a
#     private sources list (deb and deb-src lines for that mirror and suite), lists
#     directory, cache and (empty) dpkg status, all in a temporary directory: the
#     system's apt configuration and state are never touched;
#   * the library packages that criu needs are found by walking the Depends /
#     Pre-Depends graph from `criu`, following library packages only; the result
#     is then checked by asking sid's loader to resolve every shared object the
#     binary needs, all of which must come from PREFIX;
#   * every package is unpacked with `dpkg -x` into a staging directory that
#     replaces PREFIX only once the new criu runs (and the plugin, when wanted,
#     has been built and checked);
#   * the plugin: `apt-get source --download-only criu=<version of the unpacked
#     criu>`, unpacked with dpkg-source when it is there and every file came
#     (Debian's patches applied), else the upstream tarball alone with tar. Only
#     what plugins/cuda needs is built: compel's host tool and generated headers
#     (`make compel/compel-host-bin`), then `make -C plugins/cuda`, i.e. upstream's
#     `cuda_plugin` target without its dependency on the whole criu build (no
#     protobuf, libnl, libnet). <sys/capability.h> comes from sid's libcap-dev,
#     downloaded and unpacked into the temporary directory, when the system has
#     none. The plugin must need nothing but libc and must resolve every other
#     symbol against the criu binary; when root, a `criu dump -L` of a `sleep`
#     process then checks that criu loads it.
#
# Environment: LLMUX_CRIU_PLUGIN=0 skips the CUDA plugin (criu alone is installed,
# or kept as is). Otherwise a plugin that cannot be built or loaded is an error
# (exit status 1, "install-criu: error: ..."): criu itself is still installed
# (a prefix without the plugin works: llmuxd then suspends CUDA itself), so a
# second run retries just the plugin.
#
# Idempotent: exits at once when PREFIX/bin/criu already reports 4.2 or newer and
# PREFIX/lib/criu/cuda_plugin.so exists (or LLMUX_CRIU_PLUGIN=0). When only the
# plugin is missing, only the plugin is built (for the installed criu version; if
# the suite no longer has that version's source, criu and the plugin are both
# reinstalled from the suite's current version).
# Nothing is installed system-wide, except ca-certificates / debian-archive-keyring
# when the download itself needs them, and a C compiler and make (gcc, make,
# libc6-dev, xz-utils, from the machine's own apt sources) when the plugin is
# wanted and they are missing; they are needed only while this script runs.
set -euo pipefail

PRINT_MIRRORS=0
if [[ ${1:-} == --print-mirrors ]]; then
    PRINT_MIRRORS=1
    shift
fi
PREFIX=${1:-/opt/llmux-criu}
SUITE=${LLMUX_CRIU_SUITE:-sid}
APT_ETC=${LLMUX_APT_ETC:-/etc/apt}
MIN_MAJOR=4
MIN_MINOR=2
START=$SECONDS
case ${LLMUX_CRIU_PLUGIN:-1} in
    0 | no | false | off) WANT_PLUGIN=0 ;;
    *) WANT_PLUGIN=1 ;;
esac
PLUGIN_REL=lib/criu/cuda_plugin.so

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

# installed_source_version PREFIX: the Debian source version of the criu unpacked
# there (first line of its changelog.Debian.gz, "criu (4.2.1-1) unstable; ...")
installed_source_version() {
    local f=$1/usr/share/doc/criu/changelog.Debian.gz
    [[ -r $f ]] || return 1
    gzip -dc "$f" 2>/dev/null | awk 'NR == 1 { v = $2; gsub(/[()]/, "", v); print v; exit }'
}

# MODE: full (download and unpack criu, then the plugin) or plugin (criu is there)
MODE=full
if ((!PRINT_MIRRORS)) && [[ -x $PREFIX/bin/criu ]] && criu_version_ok "$PREFIX/bin/criu"; then
    version=$("$PREFIX/bin/criu" --version 2>/dev/null | awk '/^Version:/ {print $2}')
    if ((!WANT_PLUGIN)) || [[ -s $PREFIX/$PLUGIN_REL ]]; then
        log "already installed: criu $version in $PREFIX$( ((WANT_PLUGIN)) && printf ', with %s' "$PLUGIN_REL")"
        exit 0
    fi
    INSTALLED_SRC_VER=$(installed_source_version "$PREFIX" || true)
    if [[ -n $INSTALLED_SRC_VER ]]; then
        MODE=plugin
        log "criu $version ($INSTALLED_SRC_VER) is installed in $PREFIX; building only $PLUGIN_REL"
    else
        log "criu $version in $PREFIX has no Debian changelog (unknown source version): reinstalling it"
    fi
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
if ((PRINT_MIRRORS)); then
    printf '%s\n' "$MIRRORS"
    exit 0
fi

# --- what the download itself needs -------------------------------------------------
need=()
if grep -q '^https:' <<<"$MIRRORS" && [[ ! -s /etc/ssl/certs/ca-certificates.crt ]]; then
    need+=(ca-certificates)
fi
if [[ ! -s /usr/share/keyrings/debian-archive-keyring.gpg ]]; then
    need+=(debian-archive-keyring)
fi
if ((WANT_PLUGIN)); then
    # only at install time, to build the plugin
    command -v gcc >/dev/null || need+=(gcc)
    command -v make >/dev/null || need+=(make)
    [[ -e /usr/include/stdio.h && -e /usr/include/linux/capability.h ]] || need+=(libc6-dev)
    command -v xz >/dev/null || need+=(xz-utils)
fi
if ((${#need[@]})); then
    log "installing what the download and the build need: ${need[*]}"
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
    "$WORK/preferences.d" "$WORK/debs" "$WORK/src"
: >"$WORK/status"
# apt fetches as the unprivileged _apt user when it exists
if id _apt >/dev/null 2>&1 && [[ $EUID -eq 0 ]]; then
    chown _apt "$WORK/lists/partial" "$WORK/cache/archives/partial" "$WORK/debs" "$WORK/src"
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
    if ((WANT_PLUGIN)); then
        printf 'deb-src [signed-by=%s] %s %s main\n' "$key" "$uri" "$SUITE" >>"$WORK/sources.list"
    fi
    log "fetching the $SUITE package lists from $uri"
    if apt-get "${APT_OPTS[@]}" -qq update >"$WORK/update.log" 2>&1 \
        && ! grep -qE '^(W|E): ' "$WORK/update.log" \
        && apt-cache "${APT_OPTS[@]}" show criu >/dev/null 2>&1 \
        && { ((!WANT_PLUGIN)) || apt-cache "${APT_OPTS[@]}" showsrc criu >/dev/null 2>&1; }; then
        updated=$uri
        break
    fi
    log "  no usable $SUITE suite there$( ((WANT_PLUGIN)) && printf ' (with the criu source package: deb-src)'):"
    sed 's/^/    /' "$WORK/update.log" >&2
done <<<"$MIRRORS"
[[ -n $updated ]] || die "could not read the $SUITE suite from any configured Debian mirror"

# --- the CUDA plugin -------------------------------------------------------------------
# build_plugin SRC_VERSION CRIU_BINARY OUTDIR: builds CRIU's plugins/cuda from the
# suite's source package SRC_VERSION into OUTDIR/cuda_plugin.so and checks it against
# CRIU_BINARY (the unpacked usr/sbin/criu). Run it in a subshell with `set -e`: every
# failure (die included) ends only that subshell.
build_plugin() {
    local ver=$1 criu_bin=$2 out=$3
    local nover=${ver#*:}                  # no epoch: file names
    local upver=${nover%-*}                # upstream version
    local src=$WORK/build/criu-$upver so nproc_
    log "building the CUDA plugin from the source of criu $ver"
    # The source package's files. A mirror may lack one of them (the Debian diff, say):
    # the upstream tarball alone is enough; apt has checked every file it did fetch
    # against the suite's signed index.
    local complete=1
    if ! (cd "$WORK/src" && apt-get "${APT_OPTS[@]}" -qq source --download-only "criu=$ver") \
        >"$WORK/source.log" 2>&1; then
        complete=0
    fi
    local orig
    orig=$(find "$WORK/src" -maxdepth 1 -name "criu_$upver.orig.tar.*" ! -name '*.asc' | head -n 1)
    if [[ -z $orig ]]; then
        sed 's/^/    /' "$WORK/source.log" >&2
        die "could not download the source of criu $ver"
    fi
    rm -rf "$WORK/build"
    mkdir -p "$WORK/build"
    if ((complete)) && command -v dpkg-source >/dev/null \
        && dpkg-source --no-check -x "$WORK/src/criu_$nover.dsc" "$src" >"$WORK/unpack.log" 2>&1; then
        log "  unpacked criu_$nover.dsc with dpkg-source (Debian's patches applied)"
    else
        if ((!complete)); then
            log "  not every file of the source package could be downloaded; using the upstream tarball alone:"
            grep -E '^(E|W): ' "$WORK/source.log" | sed 's/^/    /' >&2 || true
        fi
        rm -rf "$src"
        mkdir -p "$src"
        tar -xf "$orig" -C "$src" --strip-components=1
        log "  unpacked $(basename "$orig")"
    fi
    [[ -f $src/plugins/cuda/cuda_plugin.c ]] || die "the criu $ver source has no plugins/cuda/cuda_plugin.c"

    # criu's options header includes <sys/capability.h> (libcap-dev); take it from
    # the suite's libcap-dev, unpacked here, when the system has none.
    if [[ ! -e /usr/include/sys/capability.h ]]; then
        rm -f "$WORK"/src/libcap-dev_*.deb
        (cd "$WORK/src" && apt-get "${APT_OPTS[@]}" -qq download libcap-dev) >"$WORK/libcap.log" 2>&1 \
            || { sed 's/^/    /' "$WORK/libcap.log" >&2; die "could not download libcap-dev (for <sys/capability.h>)"; }
        dpkg-deb -x "$WORK"/src/libcap-dev_*.deb "$WORK/libcap-dev"
        export C_INCLUDE_PATH=$WORK/libcap-dev/usr/include${C_INCLUDE_PATH:+:$C_INCLUDE_PATH}
    fi

    # Upstream's `cuda_plugin` target depends on the whole criu build; the plugin
    # needs only compel's host tool (for `compel includes`) and the generated headers
    # that `compel/compel-host-bin` brings (common/config.h, the asm links, syscall
    # codes). The top Makefile computes ARCH and the rest.
    cat >"$WORK/build/llmux-plugin.mk" <<'MK'
# Generated by packaging/install-criu.sh: upstream's cuda_plugin target without its
# dependency on the criu binary.
llmux-cuda-plugin: compel/compel-host-bin
	$(Q) $(MAKE) -C plugins/cuda all
.PHONY: llmux-cuda-plugin
MK
    nproc_=$(nproc 2>/dev/null || echo 2)
    if ! env -u MAKEFLAGS -u MFLAGS -u CFLAGS -u LDFLAGS \
        make -C "$src" -f Makefile -f "$WORK/build/llmux-plugin.mk" -j"$nproc_" llmux-cuda-plugin \
        >"$WORK/build.log" 2>&1; then
        tail -n 30 "$WORK/build.log" | sed 's/^/    /' >&2
        die "building plugins/cuda failed (last lines of the build log above)"
    fi
    so=$src/plugins/cuda/cuda_plugin.so
    [[ -s $so ]] || die "the build made no plugins/cuda/cuda_plugin.so"

    # It is dlopen()ed by sid's criu through sid's loader: it may need only libc
    # (libdl / libpthread are part of it), and every symbol it takes from criu must be
    # one that this criu binary exports.
    local needed extra missing
    needed=$(readelf -d "$so" | awk '/\(NEEDED\)/ { gsub(/[][]/, "", $NF); print $NF }')
    extra=$(grep -vxE 'libc\.so\.6|libdl\.so\.2|libpthread\.so\.0' <<<"$needed" || true)
    [[ -z $extra ]] || die "cuda_plugin.so needs libraries besides libc: $(paste -sd ' ' <<<"$extra")"
    missing=$(LC_ALL=C comm -23 \
        <(nm -D --undefined-only "$so" | awk '$NF !~ /@/ { print $NF }' | LC_ALL=C sort -u) \
        <(nm -D --defined-only "$criu_bin" | awk '{ sub(/@.*/, "", $NF); print $NF }' | LC_ALL=C sort -u))
    [[ -z $missing ]] || die "criu does not export symbols that cuda_plugin.so needs: $(paste -sd ' ' <<<"$missing")"

    mkdir -p "$out"
    install -m 755 "$so" "$out/cuda_plugin.so.new"
    mv -f "$out/cuda_plugin.so.new" "$out/cuda_plugin.so"
    log "  built cuda_plugin.so ($(du -k "$out/cuda_plugin.so" | cut -f1) kB, needs: $(paste -sd ' ' <<<"$needed"))"
}

# plugin_loads CRIU_WRAPPER PLUGIN_DIR: as root, dumps a `sleep` process with
# `criu dump -L PLUGIN_DIR` and checks in the log that criu loaded cuda_plugin.so.
# Fails only when criu reports that it could not load or initialise the plugin; when
# the dump cannot run here at all (not root, no ptrace in a container build), says so.
plugin_loads() {
    local criu=$1 dir=$2 rc=0 lines
    if [[ $EUID -ne 0 ]]; then
        log "  not root: the plugin's load test (criu dump -L) is skipped"
        return 0
    fi
    rm -rf "$WORK/dump"
    mkdir -p "$WORK/dump"
    # in a subshell whose stderr is /dev/null: bash's "Killed" notice for the sleep
    # (which the dump kills) goes there; criu writes to its log file
    (
        setsid sleep 120 </dev/null >/dev/null 2>&1 &
        pid=$!
        rc=0
        "$criu" dump -t "$pid" -D "$WORK/dump" -L "$dir" -v4 --log-file "$WORK/dump.log" \
            >/dev/null 2>&1 || rc=$?
        kill -9 "$pid" || true
        wait "$pid" || true
        exit "$rc"
    ) 2>/dev/null || rc=$?
    if grep -qE "Unable to load .*cuda_plugin|Can't load plugin|Corrupted plugin|Failed in init\(.*cuda_plugin" \
        "$WORK/dump.log" 2>/dev/null; then
        grep -E 'plugin|cuda' "$WORK/dump.log" | sed 's/^/    /' >&2
        log "  criu could not load the plugin (criu dump log above)"
        return 1
    fi
    lines=$(grep -E 'Plugin "cuda_plugin"|cuda_plugin: ' "$WORK/dump.log" 2>/dev/null || true)
    if ! grep -q 'Plugin "cuda_plugin"' <<<"$lines"; then
        log "  the plugin's load test could not run here (criu dump exit status $rc, before loading plugins):"
        grep -E 'Error|error' "$WORK/dump.log" 2>/dev/null | tail -n 3 | sed 's/^/    /' >&2 || true
        return 0
    fi
    log "  criu dump -L loads it:"
    sed 's/^([0-9. ]*) /    /' <<<"$lines" >&2
    ((rc == 0)) || log "  (the test dump itself then failed, exit status $rc; see 'criu check' below)"
    return 0
}

# report_check: criu's version and `criu check` (problems are reported, not fatal:
# an unprivileged container build cannot pass it, yet the binary must run)
report_check() {
    local check
    "$PREFIX/bin/criu" --version
    if check=$("$PREFIX/bin/criu" check 2>&1); then
        log "criu check: ok"
    else
        log "criu check reported problems (the binary runs; see below)"
    fi
    printf '%s\n' "$check"
}

PLUGIN_ERROR=""
# try_plugin SRC_VERSION CRIU_BINARY CRIU_WRAPPER OUTDIR: build_plugin, then
# plugin_loads; on failure OUTDIR has no cuda_plugin.so and PLUGIN_ERROR says why.
try_plugin() {
    local rc=0
    set +e
    (
        set -e
        build_plugin "$1" "$2" "$WORK/plugin"
        plugin_loads "$3" "$WORK/plugin"
    )
    rc=$?
    set -e
    if ((rc == 0)); then
        mkdir -p "$4"
        install -m 755 "$WORK/plugin/cuda_plugin.so" "$4/.cuda_plugin.so.new"
        mv -f "$4/.cuda_plugin.so.new" "$4/cuda_plugin.so"
    else
        PLUGIN_ERROR="could not build a working CUDA plugin for criu $1 (messages above); criu itself is installed; run again to retry, or set LLMUX_CRIU_PLUGIN=0 to do without it"
    fi
}

# --- only the plugin: criu is installed ------------------------------------------------
if [[ $MODE == plugin ]]; then
    src_versions=$(apt-cache "${APT_OPTS[@]}" showsrc --only-source criu 2>/dev/null | awk '/^Version:/ { print $2 }')
    if grep -qxF "$INSTALLED_SRC_VER" <<<"$src_versions"; then
        try_plugin "$INSTALLED_SRC_VER" "$PREFIX/usr/sbin/criu" "$PREFIX/bin/criu" "$PREFIX/lib/criu"
        [[ -z $PLUGIN_ERROR ]] || die "$PLUGIN_ERROR"
        log "installed $PREFIX/$PLUGIN_REL ($((SECONDS - START)) s)"
        report_check
        exit 0
    fi
    log "the $SUITE suite no longer has the source of the installed criu $INSTALLED_SRC_VER: reinstalling criu and the plugin"
    MODE=full
fi

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

# --- the CUDA plugin, for the criu just unpacked ------------------------------------------
if ((WANT_PLUGIN)); then
    SRC_VER=$(installed_source_version "$STAGE" || true)
    if [[ -z $SRC_VER ]]; then
        PLUGIN_ERROR="the unpacked criu has no usr/share/doc/criu/changelog.Debian.gz: its source version is unknown, so no CUDA plugin was built (set LLMUX_CRIU_PLUGIN=0 to do without it)"
    else
        try_plugin "$SRC_VER" "$STAGE/usr/sbin/criu" "$STAGE/bin/criu" "$STAGE/lib/criu"
    fi
fi

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

plugin_note=""
if [[ -s $PREFIX/$PLUGIN_REL ]]; then
    plugin_note=", $PLUGIN_REL"
elif ((!WANT_PLUGIN)); then
    plugin_note=", no CUDA plugin (LLMUX_CRIU_PLUGIN=0)"
fi
log "installed into $PREFIX ($(du -sh "$PREFIX" | cut -f1), ${#PKGS[@]} packages$plugin_note, $((SECONDS - START)) s)"
report_check
[[ -z $PLUGIN_ERROR ]] || die "$PLUGIN_ERROR"
