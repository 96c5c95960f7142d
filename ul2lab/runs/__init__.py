"""What each command does, composed from the floors below: train / anneal / demo (train.py),
eval (evaluate.py), infer (infer.py), and gin configs -> settings (gin_config.py, settings.py),
as t5x's train.py / eval.py / infer.py. The CLI parses flags and calls one function here.
"""
