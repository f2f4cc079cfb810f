"""Model optimization: structured pruning, distillation, export and quantization."""
