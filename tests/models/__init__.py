"""Tests for models/: manifests, the loader, the dlib conversion, the embedder."""
