#!/bin/bash
# Write server.properties from KAFKA_* variables (apache/kafka's convention), format the storage once,
# then exec the broker (PID 1 gets SIGTERM and shuts down cleanly).
set -euo pipefail
CONFIG=/opt/kafka/config/server.properties
declare -A props=(
  [process.roles]=broker,controller
  [node.id]=1
  [listeners]=PLAINTEXT://:9092,CONTROLLER://:9093
  [advertised.listeners]="PLAINTEXT://$(hostname):9092"
  [listener.security.protocol.map]=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
  [controller.listener.names]=CONTROLLER
  [inter.broker.listener.name]=PLAINTEXT
  [controller.quorum.voters]=1@localhost:9093
  [log.dirs]=/var/lib/kafka/data
  [num.partitions]=1
  [auto.create.topics.enable]=false
  [offsets.topic.replication.factor]=1
  [offsets.topic.num.partitions]=12
  [transaction.state.log.replication.factor]=1
  [transaction.state.log.min.isr]=1
  [group.initial.rebalance.delay.ms]=0
  [log.segment.bytes]=16777216
  [log.cleaner.dedupe.buffer.size]=16777216
  [num.network.threads]=2
  [num.io.threads]=4
)
skip=" KAFKA_HEAP_OPTS KAFKA_OPTS KAFKA_JVM_OPTS "
while IFS='=' read -r name value; do
  [[ "$name" == KAFKA_* && "$skip" != *" $name "* ]] || continue
  key="${name#KAFKA_}"
  key="${key//___/-}"; key="${key//__/@}"; key="${key//_/.}"; key="${key//@/_}"
  props["${key,,}"]="$value"
done < <(env)
: >"$CONFIG"
for key in "${!props[@]}"; do echo "$key=${props[$key]}" >>"$CONFIG"; done
if [[ ! -f "${props[log.dirs]%%,*}/meta.properties" ]]; then
  java -Xmx256m -Dlog4j.configuration=file:/opt/kafka/config/tools-log4j.properties -cp '/opt/kafka/libs/*' \
    kafka.tools.StorageTool format -t "${CLUSTER_ID:-Y2xzLXdvcmtlcnMtbG9jYQ}" -c "$CONFIG" >/dev/null
fi
exec java ${KAFKA_HEAP_OPTS:--Xms256m -Xmx768m} -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
  ${KAFKA_OPTS:-} -Dlog4j.configuration=file:/opt/kafka/config/broker-log4j.properties \
  -cp '/opt/kafka/libs/*' kafka.Kafka "$CONFIG"
