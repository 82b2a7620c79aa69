"""Security: Ed25519 bundle-signing keys and the federation PKI (CA, TLS, SuperNode keys)."""
