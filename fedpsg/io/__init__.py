"""Writing files atomically and reporting progress: what every layer above uses."""
