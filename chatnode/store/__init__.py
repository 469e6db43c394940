"""Storage: the RocksDB engine (group commit) and the room/history layout."""
