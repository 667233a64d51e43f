#!/usr/bin/env bash
# RabbitMQ users for Mailroom: one per service and one per publisher of send commands, each
# with the least permissions it needs on the vhost (configure, write, read regexes).
#
#   MAILROOM_VHOST=/ \
#   MAILROOM_CONFIG_API_AMQP_PASSWORD=... MAILROOM_FETCHER_AMQP_PASSWORD=... \
#   MAILROOM_SENDER_AMQP_PASSWORD=... MAILROOM_STATUS_AMQP_PASSWORD=... \
#   MAILROOM_SEND_PUBLISHERS_AMQP="helpdesk:<password> alerts:<password>" \
#   MAILROOM_RESULT_READERS_AMQP="helpdesk:<password>" \
#   deploy/rabbitmq/users.sh
#
# Safe to run again: existing users get the password and permissions given here. RABBITMQCTL
# names the command (e.g. "rabbitmqctl -n rabbit@rabbitmq" from another container);
# MAILROOM_BROKER_USER_PREFIX is put before the services' user names (several installations on
# one broker, each on its own vhost). A publisher and a reader of results are separate users.
# Passwords go into AMQP URLs: use URL-safe ones (python3 -c 'import secrets;
# print(secrets.token_urlsafe(24))').
set -euo pipefail

ctl=(${RABBITMQCTL:-rabbitmqctl})
vhost=${MAILROOM_VHOST:-/}
prefix=${MAILROOM_BROKER_USER_PREFIX:-}

user() {  # name password configure write read
  "${ctl[@]}" -q add_user "$1" "$2" 2>/dev/null || "${ctl[@]}" -q change_password "$1" "$2"
  "${ctl[@]}" -q set_permissions -p "$vhost" "$1" "$3" "$4" "$5"
}

# Every worker's own copy of the config events: its queue, bound to mailroom.config, which it
# declares as well (so that no start order is needed between the config API and the workers).
own_events() { printf '^mailroom\\.config$|^mailroom\\.config\\.%s\\..*' "$1"; }

# The config API: publishes config events, declares each routing plan's inbound queue and
# binds it to mailroom.inbound.
user "${prefix}mailroom-config-api" "${MAILROOM_CONFIG_API_AMQP_PASSWORD:?}" \
  '^mailroom\.config$|^mailroom\.inbound$|^mailroom\.inbound\..*' \
  '^mailroom\.config$|^mailroom\.inbound\..*' \
  '^mailroom\.inbound$'

# The fetcher: publishes mail to mailroom.inbound (one transaction with the batch's marker in
# its own mailroom.fetcher.commits.<server> queue), quarantined mail and status reports.
user "${prefix}mailroom-fetcher" "${MAILROOM_FETCHER_AMQP_PASSWORD:?}" \
  "$(own_events fetcher)"'|^mailroom\.inbound$|^mailroom\.inbound\..*|^mailroom\.fetcher\.commits\..*|^mailroom\.status\.reports$' \
  "$(own_events fetcher)"'|^mailroom\.inbound$|^mailroom\.inbound\.quarantine$|^mailroom\.fetcher\.commits\..*|^mailroom\.status\.reports$|^amq\.default$' \
  "$(own_events fetcher)"'|^mailroom\.config$|^mailroom\.fetcher\.commits\..*'

# The sender: consumes mailroom.send, keeps retries in dramatiq's mailroom.sender.deliver
# queues, publishes results, dead letters and status reports.
user "${prefix}mailroom-sender" "${MAILROOM_SENDER_AMQP_PASSWORD:?}" \
  "$(own_events sender)"'|^mailroom\.send$|^mailroom\.send\.results$|^mailroom\.send\.dead$|^mailroom\.sender\.deliver(\.DQ|\.XQ)?$|^mailroom\.status\.reports$' \
  "$(own_events sender)"'|^mailroom\.send\.results$|^mailroom\.send\.dead$|^mailroom\.sender\.deliver(\.DQ|\.XQ)?$|^mailroom\.status\.reports$|^amq\.default$' \
  "$(own_events sender)"'|^mailroom\.config$|^mailroom\.send$|^mailroom\.sender\.deliver(\.DQ|\.XQ)?$'

# The status service: consumes the workers' reports, publishes status changes.
user "${prefix}mailroom-status" "${MAILROOM_STATUS_AMQP_PASSWORD:?}" \
  "$(own_events status)"'|^mailroom\.status$|^mailroom\.status\.reports$' \
  "$(own_events status)"'|^mailroom\.status$' \
  "$(own_events status)"'|^mailroom\.config$|^mailroom\.status\.reports$'

# Publishers of send commands: only the default exchange (routing key mailroom.send) and the
# declaration of mailroom.send. RabbitMQ checks the default exchange, not the queue a
# routing key names: the sender's MAILROOM_SEND_PUBLISHERS decides which tenants each may
# send for (by the AMQP user_id, which RabbitMQ checks against the connection's user).
for entry in ${MAILROOM_SEND_PUBLISHERS_AMQP:-}; do
  user "${entry%%:*}" "${entry#*:}" '^mailroom\.send$' '^amq\.default$' '^$'
done

# Readers of send results: their own queues (named <user>.<anything>), bound to
# mailroom.send.results.
for entry in ${MAILROOM_RESULT_READERS_AMQP:-}; do
  name="${entry%%:*}"
  mine="^${name//./\\.}\\..*"
  user "$name" "${entry#*:}" "$mine" "$mine" "$mine|^mailroom\\.send\\.results$"
done
