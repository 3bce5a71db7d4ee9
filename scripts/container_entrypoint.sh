#!/bin/sh
# Entrypoint of the fedpsg image. Starts as root, prepares what the service user needs, then runs
# the command as that user (FEDPSG_UID:FEDPSG_GID, default 1000:1000; 0 keeps root):
#   * /results and /state: a bind mount Docker created (owned by root) is handed to the user;
#     a folder owned by someone else is left alone (a warning says it may not be writable);
#   * /mnt/certificates/* (the host's TLS files and SuperNode keys, mounted read-only, typically
#     mode 0600 and owned by the host user) are copied to /certificates, owned by the user,
#     mode 0400 — the host's files keep their permissions.
# Run with `--user` (not root), it only runs the command.
set -eu
uid="${FEDPSG_UID:-1000}"
gid="${FEDPSG_GID:-$uid}"

if [ "$(id -u)" != 0 ]; then
  exec "$@"
fi

as_user() {
  if [ "$uid" = 0 ]; then "$@"; else setpriv --reuid="$uid" --regid="$gid" --clear-groups -- "$@"; fi
}

if [ -d /mnt/certificates ]; then
  mkdir -p /certificates
  for f in /mnt/certificates/*; do
    [ -f "$f" ] || continue
    install -o "$uid" -g "$gid" -m 0400 "$f" "/certificates/$(basename "$f")"
  done
fi

read_only() { awk -v d="$1" '$2 == d {split($4, o, ","); ro = (o[1] == "ro")} END {exit !ro}' /proc/mounts; }

for dir in /results /state "$HOME"; do
  [ -d "$dir" ] || continue
  as_user test -w "$dir" && continue
  read_only "$dir" && continue
  if [ "$(stat -c %u "$dir")" = 0 ]; then
    chown "$uid:$gid" "$dir"
  else
    echo "fedpsg-entrypoint: warning: $dir (owner uid $(stat -c %u "$dir")) is not writable by uid $uid" >&2
  fi
done

if [ "$uid" = 0 ]; then
  exec "$@"
fi
exec setpriv --reuid="$uid" --regid="$gid" --clear-groups -- "$@"
