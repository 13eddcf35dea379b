"""Work-item sync: normalised incidents and change requests, the sync engine and its sinks."""
