"""From raw text to samples: corpus reading, tokenizer, the prepared format, the objectives' corruptions,
the two stages' sample builders and the samplers that batch them."""
