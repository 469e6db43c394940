"""The cluster: membership and its gossip transport, discovery, keyring, peer links,
replication, registry, runtime."""
