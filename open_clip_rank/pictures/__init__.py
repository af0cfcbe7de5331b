"""Pictures: contact sheets of ranked images and heat maps (Pillow only)."""
