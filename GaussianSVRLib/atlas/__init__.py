"""The bundled fetal brain atlases and the rigid registration of a volume to them (standard space)."""
