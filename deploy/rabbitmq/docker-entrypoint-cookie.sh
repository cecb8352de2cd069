#!/bin/bash
# Gives every broker node the same Erlang cookie (nodes only cluster with a shared cookie),
# then hands over to the rabbitmq image's own entrypoint.
#
# The cookie comes from the environment variable ERLANG_COOKIE (set in docker-compose.yml)
# and is written to the file RabbitMQ reads, /var/lib/rabbitmq/.erlang.cookie, as the
# rabbitmq user with mode 0400. Writing the file ourselves works on every image version,
# whereas the image's own RABBITMQ_ERLANG_COOKIE handling has changed between releases.
# The image links /root/.erlang.cookie to the same file, so `docker compose exec rabbit-1
# rabbitmqctl cluster_status` and the healthcheck use the same cookie.
set -euo pipefail

cookie_file=/var/lib/rabbitmq/.erlang.cookie
if [ -z "${ERLANG_COOKIE:-}" ]; then
	echo "ERLANG_COOKIE is not set: the broker nodes cannot cluster without a shared cookie" >&2
	exit 1
fi
if [ ! -f "$cookie_file" ] || [ "$(cat "$cookie_file")" != "$ERLANG_COOKIE" ]; then
	rm -f "$cookie_file"
	(umask 077 && printf '%s' "$ERLANG_COOKIE" > "$cookie_file")
fi
chmod 0400 "$cookie_file"
if [ "$(id -u)" = 0 ]; then
	chown rabbitmq:rabbitmq "$cookie_file"
fi
unset ERLANG_COOKIE
exec docker-entrypoint.sh "$@"
