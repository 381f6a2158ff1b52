"""Communication between ranks: halo exchange and gradient reduction."""
