"""The `blockstore` command: parses arguments, prints results (rich or --json), maps errors to exit codes."""
