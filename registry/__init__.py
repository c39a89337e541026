"""What exists: function and model specs stored in the ObjectStore."""
