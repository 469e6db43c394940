"""The application: protocol, accounts, dispatch and access rules, sessions, presence. Knows
nothing of peers or Kafka."""
