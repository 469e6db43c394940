"""History beyond the node: Kafka forwarding, the indexer and the views databases."""
