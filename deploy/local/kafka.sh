#!/usr/bin/env bash
# A real single-node Apache Kafka broker (KRaft) from Maven Central jars: no Docker needed.
#
#   deploy/local/kafka.sh jars                 fetch the broker + tools jars (idempotent)
#   deploy/local/kafka.sh start                start (format once); prints KAFKA_BOOTSTRAP_SERVERS=... when ready
#   deploy/local/kafka.sh stop | status
#   deploy/local/kafka.sh topics|consumer-groups|console-consumer|console-producer|configs|get-offsets ARGS...
#                                              Kafka's own ops tools against this broker
#
# Environment:
#   KAFKA_PORT        PLAINTEXT port on 127.0.0.1 (default 19092); the controller listens on PORT+1
#   KAFKA_STATE_DIR   data, logs and pid (default <repo>/.state/kafka-PORT)
#   KAFKA_SASL_PORT   when set, also a SASL_PLAINTEXT listener (PLAIN and SCRAM-SHA-256/512) on that port
#   KAFKA_SASL_USERS  user:password,... accepted on the SASL listeners (default admin:admin-secret)
#   KAFKA_SSL_PORT    when set, also an SSL listener (server certificate only) on that port
#   KAFKA_SASL_SSL_PORT  when set, also a SASL_SSL listener (PLAIN, SCRAM-SHA-256/512; KAFKA_SASL_USERS)
#   KAFKA_MTLS_PORT   when set, also an SSL listener that requires a client certificate signed by the CA
#   KAFKA_SSL_EXPIRED_PORT  when set, also an SSL listener whose certificate has expired (for tests)
#                     With any of the four, a CA and certificates are made at the first start (openssl, keytool)
#                     under STATE/tls: ca.pem (trust it: KAFKA_SSL_CAFILE), client.pem + client.key (mTLS),
#                     other-ca.pem (a CA that signed nothing here). The broker's certificate names only
#                     IP 127.0.0.1 (connecting as "localhost" is a hostname mismatch).
#   KAFKA_HEAP_OPTS   broker heap (default -Xms256m -Xmx768m)
#   KAFKA_BOOTSTRAP_SERVERS  used by the tool commands when --bootstrap-server is not given
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
LIB="$HERE/lib"
PORT="${KAFKA_PORT:-19092}"
CPORT="$((PORT + 1))"
STATE="${KAFKA_STATE_DIR:-$REPO/.state/kafka-$PORT}"
PIDFILE="$STATE/kafka.pid"
LOG="$STATE/server.log"
CLUSTER_ID="Y2xzLXdvcmtlcnMtbG9jYQ"   # 22 characters, base64 of 16 bytes; fixed so restarts reuse the data

TLS="$STATE/tls"
die() { echo "kafka.sh: $*" >&2; exit 1; }

tls_wanted() { [[ -n "${KAFKA_SSL_PORT:-}${KAFKA_SASL_SSL_PORT:-}${KAFKA_MTLS_PORT:-}${KAFKA_SSL_EXPIRED_PORT:-}" ]]; }
sasl_wanted() { [[ -n "${KAFKA_SASL_PORT:-}${KAFKA_SASL_SSL_PORT:-}" ]]; }

make_tls() {  # a CA, the broker's keystores, a client certificate; once per state folder
  if [[ -f "$TLS/.complete" ]]; then return 0; fi
  command -v openssl >/dev/null || die "openssl is needed for the TLS listeners"
  command -v keytool >/dev/null || die "keytool (Java) is needed for the TLS listeners"
  rm -rf "$TLS"; mkdir -p "$TLS"; chmod 700 "$TLS"
  (
    cd "$TLS"
    local pw; pw="$(openssl rand -hex 16)"; printf '%s' "$pw" >store-password
    local ca_ext=(-addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign")
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 -days 3650 -subj "/CN=cls-workers local CA" \
      -keyout ca.key -out ca.pem "${ca_ext[@]}"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 -days 3650 -subj "/CN=some other CA" \
      -keyout other-ca.key -out other-ca.pem "${ca_ext[@]}"
    printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
      "extendedKeyUsage=serverAuth" "subjectAltName=IP:127.0.0.1" "authorityKeyIdentifier=keyid" >server.ext
    printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
      "extendedKeyUsage=clientAuth" "authorityKeyIdentifier=keyid" >client.ext
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=127.0.0.1" -keyout broker.key -out broker.csr
    openssl x509 -req -sha256 -days 825 -in broker.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
      -extfile server.ext -out broker.pem
    openssl pkcs12 -export -in broker.pem -inkey broker.key -certfile ca.pem -name broker \
      -out broker.p12 -passout "pass:$pw"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=cls-worker" -keyout client.key -out client.csr
    openssl x509 -req -sha256 -days 825 -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
      -extfile client.ext -out client.pem
    # expired: valid for one day, thirty days ago (openssl x509 cannot back-date; keytool -gencert can)
    openssl pkcs12 -export -in ca.pem -inkey ca.key -name ca -out ca.p12 -passout "pass:$pw"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=127.0.0.1" -keyout expired.key -out expired.csr
    keytool -gencert -keystore ca.p12 -storetype PKCS12 -storepass "$pw" -alias ca -infile expired.csr \
      -outfile expired.pem -rfc -startdate -30d -validity 1 -ext san=ip:127.0.0.1 -ext eku=serverAuth
    openssl pkcs12 -export -in expired.pem -inkey expired.key -certfile ca.pem -name broker \
      -out expired.p12 -passout "pass:$pw"
    rm -f ./*.csr ca.p12
    chmod 600 ./*.key ./*.p12 store-password
  ) >"$STATE/tls.log" 2>&1 || { cat "$STATE/tls.log" >&2; die "making the TLS certificates failed"; }
  touch "$TLS/.complete"
}

ensure_jars() {
  if [[ -f "$LIB/.complete" ]]; then return 0; fi
  command -v mvn >/dev/null || die "Maven (mvn) is needed to fetch the Kafka jars"
  command -v java >/dev/null || die "Java 17+ is needed to run Kafka"
  echo "kafka.sh: fetching Apache Kafka jars from Maven Central (once)..." >&2
  rm -rf "$LIB"
  (cd "$HERE" && mvn -q -B package) >&2 || die "mvn failed to fetch the Kafka jars"
  ls "$LIB"/kafka_2.13-*.jar >/dev/null 2>&1 || die "Kafka jars missing after mvn"
  touch "$LIB/.complete"
}

java_run() {  # java_run MAIN_CLASS ARGS...  (tools: small heap, warnings only)
  local main="$1"; shift
  exec java -Xmx256m -XX:+UseSerialGC -Dlog4j.configuration="file:$HERE/tools-log4j.properties" \
    -cp "$LIB/*" "$main" "$@"
}

is_running() {
  [[ -f "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null
}

port_open() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && exec 3>&- 3<&- 2>/dev/null
}

write_config() {
  local listeners="PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CPORT"
  local advertised="PLAINTEXT://127.0.0.1:$PORT"
  local protomap="CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
  local sasl_block=""
  local name port
  for name in SASL_PLAINTEXT:SASL_PLAINTEXT:"${KAFKA_SASL_PORT:-}" SSL:SSL:"${KAFKA_SSL_PORT:-}" \
      SASL_SSL:SASL_SSL:"${KAFKA_SASL_SSL_PORT:-}" MTLS:SSL:"${KAFKA_MTLS_PORT:-}" EXPIRED:SSL:"${KAFKA_SSL_EXPIRED_PORT:-}"; do
    port="${name##*:}"
    [[ -n "$port" ]] || continue
    listeners="$listeners,${name%%:*}://127.0.0.1:$port"
    advertised="$advertised,${name%%:*}://127.0.0.1:$port"
    name="${name%:*}"
    protomap="$protomap,$name"
  done
  if sasl_wanted; then
    local users="${KAFKA_SASL_USERS:-admin:admin-secret}" plain_users="" u l
    IFS=',' read -ra pairs <<<"$users"
    for u in "${pairs[@]}"; do plain_users="$plain_users user_${u%%:*}=\"${u#*:}\""; done
    sasl_block="sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512"
    for l in sasl_plaintext sasl_ssl; do
      sasl_block="$sasl_block
listener.name.$l.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required$plain_users;
listener.name.$l.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.$l.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;"
    done
  fi
  local tls_block=""
  if tls_wanted; then
    local pw; pw="$(cat "$TLS/store-password")"
    tls_block="ssl.keystore.type=PKCS12
ssl.keystore.location=$TLS/broker.p12
ssl.keystore.password=$pw
ssl.key.password=$pw
ssl.truststore.type=PEM
ssl.truststore.location=$TLS/ca.pem
listener.name.mtls.ssl.client.auth=required
listener.name.expired.ssl.keystore.type=PKCS12
listener.name.expired.ssl.keystore.location=$TLS/expired.p12
listener.name.expired.ssl.keystore.password=$pw
listener.name.expired.ssl.key.password=$pw"
  fi
  cat >"$STATE/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$CPORT
listeners=$listeners
advertised.listeners=$advertised
listener.security.protocol.map=$protomap
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
log.dirs=$STATE/data
num.partitions=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=12
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
group.initial.rebalance.delay.ms=0
log.retention.hours=24
log.segment.bytes=16777216
log.cleaner.dedupe.buffer.size=16777216
num.network.threads=2
num.io.threads=4
$sasl_block
$tls_block
EOF
}

cmd_start() {
  ensure_jars
  if is_running; then
    echo "KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$PORT"
    return 0
  fi
  if port_open "$PORT"; then die "port $PORT is taken by another process (set KAFKA_PORT)"; fi
  mkdir -p "$STATE/data"
  if tls_wanted; then make_tls; fi
  write_config
  if [[ ! -f "$STATE/data/meta.properties" ]]; then
    local scram=()
    if sasl_wanted; then
      local users="${KAFKA_SASL_USERS:-admin:admin-secret}" u
      IFS=',' read -ra pairs <<<"$users"
      for u in "${pairs[@]}"; do
        scram+=(--add-scram "SCRAM-SHA-256=[name=${u%%:*},password=${u#*:}]" --add-scram "SCRAM-SHA-512=[name=${u%%:*},password=${u#*:}]")
      done
    fi
    java -Xmx256m -Dlog4j.configuration="file:$HERE/tools-log4j.properties" -cp "$LIB/*" kafka.tools.StorageTool \
      format -t "$CLUSTER_ID" -c "$STATE/server.properties" "${scram[@]}" >"$STATE/format.log" 2>&1 \
      || { cat "$STATE/format.log" >&2; die "storage format failed"; }
  fi
  : >"$LOG"
  # setsid: the broker survives the shell that started it, and gets its own process group.
  KAFKA_LOG_DIR="$STATE" setsid nohup java ${KAFKA_HEAP_OPTS:--Xms256m -Xmx768m} -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -Djava.awt.headless=true -Dkafka.logs.dir="$STATE" \
    -Dlog4j.configuration="file:$HERE/broker-log4j.properties" \
    -cp "$LIB/*" kafka.Kafka "$STATE/server.properties" >>"$LOG" 2>&1 </dev/null &
  echo $! >"$PIDFILE"
  local deadline=$((SECONDS + ${KAFKA_START_TIMEOUT:-120}))
  while ((SECONDS < deadline)); do
    if ! is_running; then
      tail -n 40 "$LOG" >&2
      die "broker exited during start-up (log: $LOG)"
    fi
    if grep -q "Kafka Server started" "$LOG" && port_open "$PORT"; then
      echo "KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$PORT"
      return 0
    fi
    sleep 0.5
  done
  tail -n 40 "$LOG" >&2
  cmd_stop >/dev/null 2>&1 || true
  die "broker not ready within ${KAFKA_START_TIMEOUT:-120}s (log: $LOG)"
}

cmd_stop() {
  if ! is_running; then
    rm -f "$PIDFILE"
    echo "kafka.sh: not running"
    return 0
  fi
  local pid
  pid="$(cat "$PIDFILE")"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$PIDFILE"; echo "kafka.sh: stopped"; return 0; }
    sleep 0.5
  done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$PIDFILE"
  echo "kafka.sh: killed after 30 s"
}

cmd_status() {
  if is_running && port_open "$PORT"; then
    echo "running pid=$(cat "$PIDFILE") KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$PORT state=$STATE"
  else
    echo "not running (port $PORT)"
    return 1
  fi
}

with_bootstrap() {  # adds --bootstrap-server unless the caller gave one
  local arg
  for arg in "$@"; do
    if [[ "$arg" == "--bootstrap-server" || "$arg" == --bootstrap-server=* ]]; then return 1; fi
  done
  return 0
}

run_tool() {
  local main="$1"; shift
  ensure_jars
  if with_bootstrap "$@"; then
    java_run "$main" --bootstrap-server "${KAFKA_BOOTSTRAP_SERVERS:-127.0.0.1:$PORT}" "$@"
  else
    java_run "$main" "$@"
  fi
}

case "${1:-}" in
  jars) ensure_jars ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  topics) shift; run_tool org.apache.kafka.tools.TopicCommand "$@" ;;
  consumer-groups) shift; run_tool org.apache.kafka.tools.consumer.group.ConsumerGroupCommand "$@" ;;
  console-consumer) shift; run_tool org.apache.kafka.tools.consumer.ConsoleConsumer "$@" ;;
  console-producer) shift; run_tool kafka.tools.ConsoleProducer "$@" ;;
  configs) shift; run_tool kafka.admin.ConfigCommand "$@" ;;
  get-offsets) shift; run_tool org.apache.kafka.tools.GetOffsetShell "$@" ;;
  *)
    sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
