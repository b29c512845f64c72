#!/usr/bin/env bash
# Rebuilds third_party/quic-go: the released quic-go module (fetched with
# `go mod download`, its hash checked against the one pinned below), trimmed
# to the packages nlvpn builds, plus third_party/quic-go-patches/*.patch
# applied in name order. go.mod replaces github.com/quic-go/quic-go with that
# directory, so the tree is committed and a clone builds with plain `go build`.
#
#   scripts/quic-go.sh            regenerate third_party/quic-go
#   scripts/quic-go.sh --check    fail if the committed tree differs from what
#                                 the script produces (CI runs this)
#   scripts/quic-go.sh --pristine DIR
#                                 write the trimmed upstream tree, no patches,
#                                 into DIR (the base to diff against when
#                                 writing a new patch; see third_party/README.md)
set -euo pipefail

MODULE=github.com/quic-go/quic-go
VERSION=v0.65.0
# The module's h1 hash, as in go.sum before the replace: the download must be
# exactly the release everyone else gets.
SUM=h1:BJQSjdTvLPLmWtaCupUphRbgxgpZhdO/GMpr9Eoe3B4=

# What of the module we keep: the packages the quic-go package imports, and
# the license. Tests, http3, interop, integration tests, examples, mocks and
# tools are left out (nlvpn does not build them).
KEEP_DIRS=(
	.
	internal/ackhandler
	internal/congestion
	internal/handshake
	internal/monotime
	internal/protocol
	internal/qerr
	internal/utils
	internal/utils/linkedlist
	internal/utils/minheap
	internal/utils/ringbuffer
	internal/wire
	qlog
	qlogwriter
	qlogwriter/jsontext
	quicvarint
)
KEEP_FILES=(LICENSE go.mod)

root="$(cd "$(dirname "$0")/.." && pwd)"
out="$root/third_party/quic-go"
patches="$root/third_party/quic-go-patches"
export PATH="$PATH:/usr/local/go/bin"

die() { echo "quic-go.sh: $*" >&2; exit 1; }

mode=write
target="$out"
case "${1:-}" in
"") ;;
--check) mode=check ;;
--pristine)
	mode=pristine
	target="${2:?--pristine needs a directory}"
	;;
*) die "unknown argument $1 (use --check or --pristine DIR)" ;;
esac

# Outside our module, so that our own replace does not apply to the download.
info="$(cd / && GO111MODULE=on GOFLAGS=-mod=mod go mod download -json "$MODULE@$VERSION")"
src="$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p' <<<"$info")"
sum="$(sed -n 's/^[[:space:]]*"Sum": "\(.*\)",$/\1/p' <<<"$info")"
[ -n "$src" ] && [ -d "$src" ] || die "go mod download gave no directory: $info"
[ "$sum" = "$SUM" ] || die "$MODULE@$VERSION has hash $sum, expected $SUM"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
tree="$tmp/quic-go"
mkdir -p "$tree"
for d in "${KEEP_DIRS[@]}"; do
	mkdir -p "$tree/$d"
	for f in "$src/$d"/*.go; do
		case "$f" in *_test.go) continue ;; esac
		cp "$f" "$tree/$d/"
	done
done
for f in "${KEEP_FILES[@]}"; do
	cp "$src/$f" "$tree/$f"
done
chmod -R u+w,go-w "$tree"

if [ "$mode" != pristine ]; then
	for p in "$patches"/*.patch; do
		[ -e "$p" ] || continue
		(cd "$tree" && git apply --whitespace=nowarn "$p") || die "patch $(basename "$p") does not apply"
	done
fi

case "$mode" in
write)
	rm -rf "$out"
	mkdir -p "$(dirname "$out")"
	cp -r "$tree" "$out"
	echo "third_party/quic-go: $MODULE@$VERSION with $(ls "$patches"/*.patch 2>/dev/null | wc -l) patches"
	;;
pristine)
	rm -rf "$target"
	cp -r "$tree" "$target"
	;;
check)
	if ! diff -r "$tree" "$out" >"$tmp/diff"; then
		head -50 "$tmp/diff" >&2
		die "third_party/quic-go is not what scripts/quic-go.sh produces: run it and commit the result"
	fi
	echo "third_party/quic-go matches $MODULE@$VERSION plus the patches"
	;;
esac
