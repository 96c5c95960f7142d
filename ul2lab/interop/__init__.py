"""Other formats: Hugging Face T5 directories in and out (hf.py, convert.py). Imports ul2lab.models
and ul2lab.train (checkpoints); torch / transformers / safetensors only when a conversion runs.
"""
