"""Remote-code files copied into a Hugging Face export (``tools/convert_checkpoint.py --to-hf``); they import
only torch and transformers, never megatron_ls."""
