"""Live migration: pre-dump iterations streamed in CRIU's page-server protocol, restored by CRIU on the destination."""
