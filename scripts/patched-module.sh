# Shared body of scripts/quic-go.sh and scripts/gvisor.sh: rebuilds
# third_party/NAME from a released module (fetched with `go mod download`,
# its hash checked against the pinned one), trimmed to the packages nlvpn
# builds, plus third_party/NAME-patches/*.patch applied in name order.
#
# The caller sets NAME, MODULE, VERSION, SUM, KEEP_DIRS (directories whose
# non-test .go and .s files are kept), KEEP_FILES, then sources this file
# with its own arguments:
#
#   (none)          regenerate third_party/NAME
#   --check         fail if the committed tree differs from what the script
#                   produces (make test runs this)
#   --pristine DIR  write the trimmed upstream tree, no patches, into DIR (the
#                   base to diff against when writing a new patch; see
#                   third_party/README.md)
#   --upstream-tests [GO TEST FLAGS]
#                   run the release's own tests of UPSTREAM_TEST_PKGS on the
#                   whole module plus the patches, after
#                   third_party/NAME-test-patches/*.patch (upstream tests
#                   adapted to the internal APIs the patches change). Needs
#                   the module's test dependencies from the module proxy.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
out="$root/third_party/$NAME"
patches="$root/third_party/$NAME-patches"
export PATH="$PATH:/usr/local/go/bin"

die() { echo "$NAME.sh: $*" >&2; exit 1; }

mode=write
target="$out"
case "${1:-}" in
"") ;;
--check) mode=check ;;
--pristine)
	mode=pristine
	target="${2:?--pristine needs a directory}"
	;;
--upstream-tests)
	mode=upstream-tests
	[ -n "${UPSTREAM_TEST_PKGS:-}" ] || die "no upstream tests are set up for $NAME"
	shift
	;;
*) die "unknown argument $1 (use --check, --pristine DIR or --upstream-tests)" ;;
esac

# Outside our module, so that our own replace does not apply to the download.
info="$(cd / && GO111MODULE=on GOFLAGS=-mod=mod go mod download -json "$MODULE@$VERSION")"
src="$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p' <<<"$info")"
sum="$(sed -n 's/^[[:space:]]*"Sum": "\(.*\)",$/\1/p' <<<"$info")"
[ -n "$src" ] && [ -d "$src" ] || die "go mod download gave no directory: $info"
[ "$sum" = "$SUM" ] || die "$MODULE@$VERSION has hash $sum, expected $SUM"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
tree="$tmp/$NAME"

if [ "$mode" = upstream-tests ]; then
	cp -r "$src" "$tree"
	chmod -R u+w,go-w "$tree"
	for p in "$patches"/*.patch "$root/third_party/$NAME-test-patches"/*.patch; do
		[ -e "$p" ] || continue
		(cd "$tree" && git apply --whitespace=nowarn "$p") || die "patch $(basename "$p") does not apply"
	done
	echo "$NAME.sh: $MODULE@$VERSION's own tests of ${UPSTREAM_TEST_PKGS[*]} on the patched module"
	# -mod=mod: the module's go.sum lists its test dependencies; our
	# GOFLAGS (-mod=vendor, say) are not for this tree.
	(cd "$tree" && GOFLAGS=-mod=mod go test -count=1 "$@" "${UPSTREAM_TEST_PKGS[@]}")
	exit
fi
mkdir -p "$tree"
for d in "${KEEP_DIRS[@]}"; do
	mkdir -p "$tree/$d"
	for f in "$src/$d"/*.go "$src/$d"/*.s; do
		[ -e "$f" ] || continue
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
	echo "third_party/$NAME: $MODULE@$VERSION with $(ls "$patches"/*.patch 2>/dev/null | wc -l) patches"
	;;
pristine)
	rm -rf "$target"
	cp -r "$tree" "$target"
	;;
check)
	if ! diff -r "$tree" "$out" >"$tmp/diff"; then
		head -50 "$tmp/diff" >&2
		die "third_party/$NAME is not what scripts/$NAME.sh produces: run it and commit the result"
	fi
	echo "third_party/$NAME matches $MODULE@$VERSION plus the patches"
	;;
esac
