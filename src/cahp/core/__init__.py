"""Infrastructure: dataclass configs, files and environment, torchrun helpers, memory allocator."""
