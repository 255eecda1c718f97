"""Benchmarks and evaluation: the engine alone (`engine`), a served model (`served`), ROUGE (`eval`)."""
