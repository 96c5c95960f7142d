"""T5's special token ids, the one place they are defined.

SentencePiece vocabularies trained by ul2lab (and T5's public ones) put padding at 0, EOS at 1 and
unknown at 2; the decoder starts from the padding id, as in t5x and Hugging Face T5. Sentinels
(`<extra_id_N>`) are counted down from the top of the vocabulary and live with the objectives.
"""
PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
DECODER_START_ID = PAD_ID
