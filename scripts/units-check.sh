#!/bin/sh
# make units-check: systemd-analyze verify on every unit in packaging/systemd,
# failing on any message (verify exits 0 on many warnings, e.g. an unknown
# setting), then the exposure score of each (systemd-analyze security), which
# must stay at or under UNITS_MAX_EXPOSURE. Template units are checked as an
# instance (nlvpn-client@check.service).
#
# verify insists that ExecStart's program exists: the units name
# /usr/local/bin/nlvpn, which a build machine need not have, so checked
# copies point at a stand-in (what nlvpn's flags are is cmd/nlvpn's
# TestUnitsUseRealFlags). No systemd needs to run: this reads files only.
# A drop-in is checked on a copy of its unit that has it (see below).
set -eu
cd "$(dirname "$0")/.."
max=${UNITS_MAX_EXPOSURE:-2.5}
if ! command -v systemd-analyze >/dev/null 2>&1; then
	echo "units-check: systemd-analyze not found (Debian: apt-get install --no-install-recommends systemd)" >&2
	exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf '#!/bin/sh\nexit 0\n' > "$tmp/nlvpn"
chmod 755 "$tmp/nlvpn"
units=
for f in packaging/systemd/*.service; do
	name=$(basename "$f")
	sed "s|/usr/local/bin/nlvpn|$tmp/nlvpn|g" "$f" > "$tmp/$name"
	case $name in
	*@.service) units="$units ${name%@.service}@check.service" ;;
	*) units="$units $name" ;;
	esac
done
# Drop-ins (packaging/systemd/UNIT.service.d/NAME.conf) are checked on a
# copy of their unit named UNIT-NAME.service, so the unit is checked both
# with and without each.
for d in packaging/systemd/*.service.d; do
	[ -d "$d" ] || continue
	base=$(basename "$d" .service.d)
	for f in "$d"/*.conf; do
		name=$base-$(basename "$f" .conf).service
		cp "$tmp/$base.service" "$tmp/$name"
		mkdir -p "$tmp/$name.d"
		sed "s|/usr/local/bin/nlvpn|$tmp/nlvpn|g" "$f" > "$tmp/$name.d/$(basename "$f")"
		units="$units $name"
	done
done
cd "$tmp"
# shellcheck disable=SC2086 # one word per unit
if ! out=$(systemd-analyze verify --man=no $units 2>&1) || [ -n "$out" ]; then
	printf '%s\n' "$out" >&2
	echo "units-check: systemd-analyze verify is not clean" >&2
	exit 1
fi
for u in $units; do
	# shellcheck disable=SC2086
	score=$(systemd-analyze security --offline=true --no-pager "$u" 2>&1 | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
	if [ -z "$score" ]; then
		systemd-analyze security --offline=true --no-pager "$u" >&2 || true
		echo "units-check: no exposure score for $u" >&2
		exit 1
	fi
	echo "units-check: $u: verify clean, exposure $score (at most $max)"
	if ! awk -v s="$score" -v m="$max" 'BEGIN { exit !(s <= m) }'; then
		systemd-analyze security --offline=true --no-pager "$u" >&2 || true
		echo "units-check: $u is exposed more than $max" >&2
		exit 1
	fi
done
