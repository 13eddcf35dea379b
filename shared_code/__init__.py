"""Domain code of the ITSM connector: everything the Functions triggers and the CLI call."""
