#!/bin/bash
# Kafka's own tools by their usual names (kafka-topics.sh, kafka-consumer-groups.sh, ...): symlinks here.
set -euo pipefail
case "$(basename "$0")" in
  kafka-topics.sh) main=org.apache.kafka.tools.TopicCommand ;;
  kafka-consumer-groups.sh) main=org.apache.kafka.tools.consumer.group.ConsumerGroupCommand ;;
  kafka-console-consumer.sh) main=org.apache.kafka.tools.consumer.ConsoleConsumer ;;
  kafka-console-producer.sh) main=kafka.tools.ConsoleProducer ;;
  kafka-configs.sh) main=kafka.admin.ConfigCommand ;;
  kafka-get-offsets.sh) main=org.apache.kafka.tools.GetOffsetShell ;;
  kafka-broker-api-versions.sh) main=kafka.admin.BrokerApiVersionsCommand ;;
  *) echo "usage: kafka-topics.sh|kafka-consumer-groups.sh|... ARGS" >&2; exit 2 ;;
esac
exec java -Xmx256m -XX:+UseSerialGC -Dlog4j.configuration=file:/opt/kafka/config/tools-log4j.properties \
  -cp '/opt/kafka/libs/*' "$main" "$@"
