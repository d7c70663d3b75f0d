"""Reader and door-I/O drivers behind small interfaces, chosen through an explicit registry."""
