"""Using a card: loading and generating, `mmadapt info`, and what the Gradio demos share."""
