"""Arrays and metadata in, a first-pass-effect prediction out (no sockets, no database)."""
