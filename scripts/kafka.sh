#!/usr/bin/env bash
# Apache Kafka's own broker, single node in KRaft mode (combined broker + controller, no
# ZooKeeper), for the end-to-end tests and for trying clipqc against the reference broker.
#
#   scripts/kafka.sh fetch
#       Resolves Apache Kafka $KAFKA_VERSION's jars and their runtime dependencies from Maven
#       Central (scripts/kafka/pom.xml) into ~/.cache/clipqc/kafka-$KAFKA_VERSION/ once; prints
#       that folder. `start` does this itself.
#   scripts/kafka.sh start DIR [--port N] [--sasl-scram] [--user NAME:PASSWORD]... [--tls]
#                              [--heap SIZE] [--property K=V]...
#       Formats a KRaft store in DIR (if DIR holds none yet: a broker started again in the same
#       DIR keeps its topics, offsets and users), starts the broker in the background, waits
#       until it serves and prints its bootstrap address (127.0.0.1:PORT) on stdout.
#       --port: the clients' port (default: a free one). --sasl-scram: clients log in with
#       SCRAM-SHA-256 or -512 as one of the --user logins (default clipqc:clipqc-secret), made
#       when the store is formatted. --tls: clients connect over TLS, with DIR/tls/broker.pem
#       (the certificate chain and its PKCS#8 key) if it is there, else one signed by a CA made
#       in DIR/tls (ca.pem: what clients trust); the certificate names 127.0.0.1 and localhost.
#       --heap: the JVM's maximum heap (default 512m: the broker shares 2 cores and 24 GiB with
#       the worker and the tests). --property: more broker settings (server.properties lines).
#       DIR/kafka.pid, DIR/bootstrap, DIR/internal (a plaintext listener on loopback with no
#       login, for setup and Kafka's own tools), DIR/broker.log.
#   scripts/kafka.sh stop DIR
#       Stops the broker of DIR (SIGTERM: a controlled shutdown; SIGKILL after 30 s).
#   scripts/kafka.sh tool DIR CLASS [ARGS...]
#       Runs one of Kafka's command-line tools against DIR's broker (its internal listener),
#       e.g. `tool DIR consumer-groups --describe --group G` (kafka-consumer-groups.sh),
#       `tool DIR topics --list`; CLASS may also be a fully qualified main class.
set -euo pipefail

KAFKA_VERSION=4.1.1
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/clipqc"
KAFKA_HOME="$CACHE/kafka-$KAFKA_VERSION"

die() { echo "kafka.sh: $*" >&2; exit 1; }

fetch() {
  [ -f "$KAFKA_HOME/libs/.complete" ] && return 0
  command -v java >/dev/null || die "java not found: Apache Kafka $KAFKA_VERSION needs Java 17 or newer"
  command -v mvn >/dev/null || die "mvn not found: the broker's jars come from Maven Central through Maven"
  grep -q "<kafka.version>$KAFKA_VERSION</kafka.version>" "$HERE/kafka/pom.xml" ||
    die "scripts/kafka/pom.xml does not pin Kafka $KAFKA_VERSION"
  echo "==> resolving Apache Kafka $KAFKA_VERSION from Maven Central into $KAFKA_HOME (once)" >&2
  rm -rf "$KAFKA_HOME/libs.part"
  mkdir -p "$KAFKA_HOME"
  mvn -q -B -Dstyle.color=never -f "$HERE/kafka/pom.xml" dependency:copy-dependencies -DincludeScope=runtime \
    -DoutputDirectory="$KAFKA_HOME/libs.part" >&2 || die "Maven could not resolve Apache Kafka $KAFKA_VERSION"
  ls "$KAFKA_HOME/libs.part"/kafka_2.13-"$KAFKA_VERSION".jar >/dev/null ||
    die "kafka_2.13-$KAFKA_VERSION.jar missing after Maven's copy"
  touch "$KAFKA_HOME/libs.part/.complete"
  rm -rf "$KAFKA_HOME/libs"
  mv "$KAFKA_HOME/libs.part" "$KAFKA_HOME/libs"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

java_run() { # heap class args...
  local heap="$1"; shift
  # SerialGC and a small heap: a test broker's load is light, and on 2 shared cores G1's
  # concurrent threads would take cycles from the worker under test.
  java -Xms64m "-Xmx$heap" -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    -Dlog4j2.configurationFile="$LOG_CONFIG" -cp "$KAFKA_HOME/libs/*" "$@"
}

# A CA and a broker certificate for 127.0.0.1 and localhost, in DIR/tls.
make_certificates() {
  local tls="$1"
  mkdir -p "$tls"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
    -subj "/CN=clipqc kafka.sh CA" -keyout "$tls/ca.key" -out "$tls/ca.pem" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
    -keyout "$tls/broker.key" -out "$tls/broker.csr" 2>/dev/null
  openssl x509 -req -in "$tls/broker.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca.key" -CAcreateserial \
    -days 30 -out "$tls/broker.crt" \
    -extfile <(printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n') 2>/dev/null
  # Kafka's PEM key store: the PKCS#8 key, then the chain.
  { openssl pkcs8 -topk8 -nocrypt -in "$tls/broker.key"; cat "$tls/broker.crt"; } >"$tls/broker.pem"
  rm -f "$tls/broker.csr"
}

start() {
  [ $# -ge 1 ] || die "usage: kafka.sh start DIR [--port N] [--sasl-scram] [--user NAME:PASSWORD]... [--tls] [--heap SIZE] [--property K=V]..."
  local dir="$1"; shift
  local port="" sasl=0 tls=0 heap=512m users=() props=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --port) port="$2"; shift 2 ;;
      --sasl-scram) sasl=1; shift ;;
      --user) users+=("$2"); shift 2 ;;
      --tls) tls=1; shift ;;
      --heap) heap="$2"; shift 2 ;;
      --property) props+=("$2"); shift 2 ;;
      *) die "start: unknown argument $1" ;;
    esac
  done
  fetch
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  if [ -f "$dir/kafka.pid" ] && kill -0 "$(cat "$dir/kafka.pid")" 2>/dev/null; then
    die "a broker of $dir is running already (pid $(cat "$dir/kafka.pid"))"
  fi
  [ -n "$port" ] || port="$(free_port)"
  local internal controller
  internal="$(free_port)"
  controller="$(free_port)"
  local protocol=PLAINTEXT
  if [ "$sasl" = 1 ] && [ "$tls" = 1 ]; then protocol=SASL_SSL
  elif [ "$sasl" = 1 ]; then protocol=SASL_PLAINTEXT
  elif [ "$tls" = 1 ]; then protocol=SSL
  fi
  [ "$sasl" = 1 ] && [ ${#users[@]} -eq 0 ] && users=("clipqc:clipqc-secret")
  LOG_CONFIG="$dir/log4j2.yaml"
  cat >"$LOG_CONFIG" <<EOF
Configuration:
  Appenders:
    File:
      name: broker
      fileName: "$dir/broker.log"
      PatternLayout:
        pattern: "[%d] %p %m (%c)%n"
  Loggers:
    Root:
      level: INFO
      AppenderRef:
        - ref: broker
EOF
  {
    cat <<EOF
# Written by scripts/kafka.sh: one node, broker and controller in one process (KRaft).
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$controller
controller.listener.names=CONTROLLER
# CLIENT: where clients connect ($protocol); INTERNAL: plaintext on loopback, between the
# broker and itself and for Kafka's tools (kafka.sh tool).
listeners=CLIENT://127.0.0.1:$port,INTERNAL://127.0.0.1:$internal,CONTROLLER://127.0.0.1:$controller
advertised.listeners=CLIENT://127.0.0.1:$port,INTERNAL://127.0.0.1:$internal
listener.security.protocol.map=CLIENT:$protocol,INTERNAL:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=INTERNAL
log.dirs=$dir/data
# One node: every internal topic has one replica; few partitions, small segments.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=3
offsets.topic.segment.bytes=1048576
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=3
transaction.state.log.segment.bytes=1048576
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
num.partitions=3
log.segment.bytes=16777216
# A test starts its workers at once: no 3 s wait for more members before the first rebalance.
group.initial.rebalance.delay.ms=0
# The new consumer group protocol (KIP-848) beside the classic one; its heartbeats every
# second, so a hand-over takes seconds, not the 5 s default's tens of seconds.
group.coordinator.rebalance.protocols=classic,consumer
group.consumer.heartbeat.interval.ms=1000
group.consumer.min.heartbeat.interval.ms=500
group.consumer.session.timeout.ms=10000
group.consumer.min.session.timeout.ms=6000
EOF
    if [ "$sasl" = 1 ]; then
      local first="${users[0]}"
      cat <<EOF
sasl.enabled.mechanisms=SCRAM-SHA-256,SCRAM-SHA-512
listener.name.client.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="${first%%:*}" password="${first#*:}";
listener.name.client.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="${first%%:*}" password="${first#*:}";
EOF
    fi
    if [ "$tls" = 1 ]; then
      cat <<EOF
listener.name.client.ssl.keystore.type=PEM
listener.name.client.ssl.keystore.location=$dir/tls/broker.pem
EOF
    fi
    local p
    for p in ${props[@]+"${props[@]}"}; do echo "$p"; done
  } >"$dir/server.properties"
  if [ "$tls" = 1 ] && [ ! -f "$dir/tls/broker.pem" ]; then
    make_certificates "$dir/tls"
    echo "kafka.sh: TLS certificate signed by $dir/tls/ca.pem (clients: ssl.ca.location)" >&2
  fi
  if [ ! -f "$dir/data/meta.properties" ]; then
    local scram=() u m
    for u in ${users[@]+"${users[@]}"}; do
      for m in SCRAM-SHA-256 SCRAM-SHA-512; do
        scram+=(--add-scram "$m=[name=${u%%:*},password=${u#*:}]")
      done
    done
    local id
    id="$(java_run 128m kafka.tools.StorageTool random-uuid)"
    java_run 256m kafka.tools.StorageTool format --ignore-formatted -t "$id" \
      -c "$dir/server.properties" ${scram[@]+"${scram[@]}"} >"$dir/format.log" 2>&1 ||
      { cat "$dir/format.log" >&2; die "formatting the KRaft store in $dir/data failed"; }
  fi
  # A broker started again in DIR: its log starts afresh (the last one's is kept beside), so the
  # wait below sees this start's line, not the last one's.
  [ -f "$dir/broker.log" ] && mv "$dir/broker.log" "$dir/broker.log.1"
  # setsid: the broker outlives this script and is not in the caller's process group (a test
  # that stops or kills it names its pid, DIR/kafka.pid).
  setsid bash -c "exec java -Xms64m -Xmx$heap -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    -Dlog4j2.configurationFile='$LOG_CONFIG' -cp '$KAFKA_HOME/libs/*' \
    kafka.Kafka '$dir/server.properties'" >"$dir/stdout.log" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$dir/kafka.pid"
  echo "127.0.0.1:$port" >"$dir/bootstrap"
  echo "127.0.0.1:$internal" >"$dir/internal"
  # Serving: the broker logs "Kafka Server started" once its listeners accept and it is
  # unfenced; a minute is room for a loaded 2-core machine (an idle one takes 2–3 s).
  local waited=0
  until grep -q "Kafka Server started" "$dir/broker.log" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 30 "$dir/broker.log" "$dir/stdout.log" >&2 2>/dev/null || true
      die "the broker of $dir exited during its start"
    fi
    [ "$waited" -lt 1200 ] || { tail -n 30 "$dir/broker.log" >&2; die "the broker of $dir did not start within 120 s"; }
    sleep 0.1
    waited=$((waited + 1))
  done
  echo "127.0.0.1:$port"
}

stop() {
  [ $# -eq 1 ] || die "usage: kafka.sh stop DIR"
  local pidfile="$1/kafka.pid" pid i
  [ -f "$pidfile" ] || die "no broker started in $1 ($pidfile missing)"
  pid="$(cat "$pidfile")"
  if kill -TERM "$pid" 2>/dev/null; then
    for i in $(seq 1 300); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && { echo "kafka.sh: broker $pid ignored SIGTERM for 30 s; killing it" >&2; kill -KILL "$pid"; }
  fi
  rm -f "$pidfile"
}

tool() {
  [ $# -ge 2 ] || die "usage: kafka.sh tool DIR CLASS [ARGS...]"
  local dir="$1" class="$2"; shift 2
  fetch
  case "$class" in
    consumer-groups) class=org.apache.kafka.tools.consumer.group.ConsumerGroupCommand ;;
    topics) class=org.apache.kafka.tools.TopicCommand ;;
    configs) class=kafka.admin.ConfigCommand ;;
    transactions) class=org.apache.kafka.tools.TransactionsCommand ;;
  esac
  LOG_CONFIG="$dir/log4j2-tools.yaml"
  [ -f "$LOG_CONFIG" ] || printf 'Configuration:\n  Loggers:\n    Root:\n      level: ERROR\n' >"$LOG_CONFIG"
  java_run 256m "$class" --bootstrap-server "$(cat "$dir/internal")" "$@"
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  fetch) fetch; echo "$KAFKA_HOME" ;;
  start) start "$@" ;;
  stop) stop "$@" ;;
  tool) tool "$@" ;;
  *) die "usage: kafka.sh fetch | start DIR [options] | stop DIR | tool DIR CLASS [ARGS...]" ;;
esac
