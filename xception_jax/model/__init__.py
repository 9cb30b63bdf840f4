"""The model: ops (per-platform implementations), layers, the Xception variants, the registry."""
