"""What one invocation needs: wire models, serialisation, stores, the Model handle."""
