"""tpm-faas: serverless functions for calls to trillion-parameter models."""
