"""Backbone features: loading DINOv3 (`backbone`, `fused_vit`), extracting them chunk by chunk (`extract`) and caching
them on disk (`cache`).
"""
