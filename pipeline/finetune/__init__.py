"""Fine-tuning data: chat/instruction examples with a loss mask on prompt tokens (SFT), and
labeled texts for sequence classification. Pure Python/torch; training reuses the pretraining
loop through ``pipeline.train.runner``."""
