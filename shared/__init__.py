"""Pipeline stages, bundle handling, metrics and configuration used by both server and client."""
